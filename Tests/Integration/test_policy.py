"""Never an open relay; AUTH abuse; per-user senders; SMTPUTF8."""
import re
import smtplib
import time

import pytest

from conftest import RawClient, authenticated_outsider, good_transaction, tls_client_context


def test_outside_mynetworks_is_refused_at_rcpt(make_tern, certs, users_file):
    tern = make_tern(mynetworks=["127.0.0.1/32"], tls=certs, users=users_file)
    port = tern.port("mx")
    c = RawClient(port, source="127.0.0.2")
    c.cmd("EHLO outsider.test")
    assert c.cmd("MAIL FROM:<spammer@outsider.test>")[0] == 250
    code, text = c.cmd("RCPT TO:<victim@example.org>")
    assert code == 554 and text.startswith("5.7.1") and "Relay access denied" in text
    assert c.cmd("DATA")[0] == 554  # no valid recipients
    c.close()
    assert tern.queue() == []
    assert re.search(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 <\S+>: Relay access denied; from=<\S*> to=<\S+> proto=ESMTP helo=<\S+>", tern.log()), tern.log()

    # The same client after AUTH may relay.
    s = authenticated_outsider(tern, certs)
    s.sendmail("alice@client.test", ["victim@example.org"], b"Subject: ok\r\n\r\nfine\r\n")
    s.quit()
    assert len(tern.queue()) == 1

    # And a client inside mynetworks may relay without AUTH.
    good_transaction(port, source="127.0.0.1")
    assert len(tern.queue()) == 2


def test_null_sender_and_postmaster(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<>")[0] == 250
    code, text = c.cmd("RCPT TO:<Postmaster>")
    assert code == 550
    assert c.cmd("RCPT TO:<user@example.org>")[0] == 250


def test_failed_auth_is_slowed_then_disconnected(make_tern, certs, users_file):
    tern = make_tern(tls=certs, users=users_file, mynetworks=["192.0.2.0/24"], limits="{ max_auth_failures: 3 }")
    port = tern.port("mx")
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.starttls(context=tls_client_context(certs))
    s.ehlo("client.test")
    started = time.monotonic()
    code, text = s.docmd("AUTH PLAIN " + "AGFsaWNlAHdyb25n")  # alice / wrong
    assert (code, text[:5]) == (535, b"5.7.8")
    code, _ = s.docmd("AUTH PLAIN " + "AG5vYm9keQB3cm9uZw==")  # unknown user
    assert code == 535
    assert time.monotonic() - started >= 3  # 1 s, then 2 s
    code, _ = s.docmd("AUTH PLAIN AGFsaWNlAHdyb25n")
    assert code == 535
    # The server follows the third 535 with 421 and closes.
    try:
        code, text = s.docmd("NOOP")
        assert code == 421 and text.startswith(b"4.7.0"), text
    except smtplib.SMTPServerDisconnected:
        pass
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.docmd("NOOP")
    # The address is now refused at connect, even with the right password.
    c = RawClient(port)
    assert c.greeting[0] == 421 and "4.7.0" in c.greeting[1]
    assert c.closed()
    log = tern.log()
    assert "SASL authentication failed" in log
    assert "wonderland" not in log and "AGFsaWNl" not in log  # no secrets in logs


def test_allowed_senders_per_user(make_tern, certs, users_file):
    tern = make_tern(tls=certs, users=users_file, mynetworks=["192.0.2.0/24"],
                     access_extra='  allowed_senders: { alice: ["alice@client.test", "@shop.test"] }')
    s = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10)
    s.starttls(context=tls_client_context(certs))
    s.login("alice", "wonderland")
    code, text = s.docmd("MAIL FROM:<ceo@bank.test>")
    assert code == 553 and text.startswith(b"5.7.1")
    assert s.docmd("MAIL FROM:<orders@shop.test>")[0] == 250
    s.rset()
    assert s.docmd("MAIL FROM:<Alice@Client.test>")[0] == 250
    s.rset()
    assert s.docmd("MAIL FROM:<>")[0] == 250


def test_smtputf8_addresses(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    c.cmd("EHLO client.test")
    code, text = c.cmd("MAIL FROM:<jörg@bücher.test>")
    assert code == 553 and text.startswith("5.6.7")
    assert c.cmd("MAIL FROM:<jörg@bücher.test> SMTPUTF8")[0] == 250
    assert c.cmd("RCPT TO:<用户@例子.广告>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: ünïcödé\r\n\r\nbody\r\n.\r\n".encode())
    assert c.reply()[0] == 250
    [queued] = tern.queue()
    assert queued["envelope"]["smtpUTF8"] is True
    assert queued["envelope"]["recipients"][0]["address"] == "用户@例子.广告"


def test_dsn_parameters_are_queued(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<app@client.test> RET=HDRS ENVID=QQ+2B1 BODY=8BITMIME SIZE=100")[0] == 250
    assert c.cmd("RCPT TO:<u@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;u+40example.org")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: dsn\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    [q] = tern.queue()
    env = q["envelope"]
    assert env["ret"] == "HDRS" and env["envid"] == "QQ+1" and env["body"] == "8BITMIME"
    assert env["recipients"][0]["orcpt"] == {"addressType": "rfc822", "address": "u@example.org"}
    assert env["recipients"][0]["notify"] == 4 | 8  # FAILURE | DELAY


def test_reject_senders(make_tern):
    tern = make_tern(access_extra='  reject_senders: ["spam@bad.example", "@worse.example"]')
    c = RawClient(tern.port("mx"))
    assert c.cmd("EHLO client.test")[0] == 250
    for sender in ("spam@bad.example", "anyone@worse.example", "ANYONE@WORSE.example"):
        code, text = c.cmd(f"MAIL FROM:<{sender}>")
        assert code == 553 and text.startswith("5.7.1") and "Sender address rejected" in text, (code, text)
    assert c.cmd("MAIL FROM:<fine@bad.example>")[0] == 250
    assert "reject: MAIL from" in tern.log()
