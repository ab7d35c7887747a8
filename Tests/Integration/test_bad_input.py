"""Each kind of bad input gets the right reply, and the next good transaction works."""
import re
import time

import pytest

from conftest import RawClient, authenticated_outsider, good_transaction, open_transaction


@pytest.fixture
def tern(make_tern):
    return make_tern(
        mynetworks=["127.0.0.1/32"],
        limits="{ max_message_size: 64KB, max_recipients: 3, max_errors: 4, max_connections: 20, max_connections_per_client: 3 }",
    )


def session(port, source="127.0.0.1"):
    c = RawClient(port, source=source)
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def test_declared_size_over_limit(tern):
    c = session(tern.port("mx"))
    code, text = c.cmd("MAIL FROM:<a@client.test> SIZE=100000")
    assert code == 552 and text.startswith("5.3.4")
    assert c.cmd("MAIL FROM:<a@client.test> SIZE=1000")[0] == 250
    good_transaction(tern.port("mx"))


def test_actual_size_over_limit_queues_nothing(tern):
    c = open_transaction(tern.port("mx"))
    assert c.cmd("DATA")[0] == 354
    line = b"x" * 998 + b"\r\n"
    c.send(b"Subject: big\r\n\r\n" + line * 100 + b".\r\n")
    code, text = c.reply()
    assert code == 552 and text.startswith("5.3.4")
    assert tern.queue() == [] and tern.spool_files() == []
    # Logged as Postfix does, with the reply the client got, never an internal name.
    assert re.search(r"\w+: reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: 552 5\.3\.4 Error: message file too big; "
                     r"from=<a@client\.test> to=<u@example\.org> proto=ESMTP helo=<client\.test>", tern.log()), tern.log()[-1500:]
    assert "tooBig" not in tern.log()
    # Same connection goes on.
    assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250
    good_transaction(tern.port("mx"))
    assert len(tern.queue()) == 1


def test_too_many_recipients(tern):
    c = session(tern.port("mx"))
    c.cmd("MAIL FROM:<a@client.test>")
    for i in range(3):
        assert c.cmd(f"RCPT TO:<u{i}@example.org>")[0] == 250
    code, text = c.cmd("RCPT TO:<u4@example.org>")
    assert code == 452 and text.startswith("4.5.3")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: three\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    assert len(tern.queue()[0]["envelope"]["recipients"]) == 3


def test_line_too_long(tern):
    c = session(tern.port("mx"))
    code, text = c.cmd("NOOP " + "x" * 5000)
    assert code == 500 and text.startswith("5.5.2")
    assert c.cmd("NOOP")[0] == 250
    good_transaction(tern.port("mx"))


def test_unknown_and_out_of_order_commands(tern):
    c = RawClient(tern.port("mx"))
    code, text = c.cmd("MAIL FROM:<a@client.test>")
    assert code == 503 and text.startswith("5.5.1")
    c.cmd("EHLO client.test")
    code, text = c.cmd("RCPT TO:<u@example.org>")
    assert code == 503 and text.startswith("5.5.1")
    code, text = c.cmd("FROBNICATE")
    assert code == 500 and text.startswith("5.5.2")
    good_transaction(tern.port("mx"))


def test_bad_command_cap_closes(tern):
    c = session(tern.port("mx"))
    for _ in range(3):
        assert c.cmd("BOGUS")[0] == 500
    code, text = c.cmd("BOGUS")
    assert code == 421
    assert c.closed()
    good_transaction(tern.port("mx"))


def test_malformed_addresses(make_tern):
    tern = make_tern()
    c = session(tern.port("mx"))
    for bad in ["MAIL FROM:<a@>", "MAIL FROM:<@b.test>", "MAIL FROM:<a b@c.test>", "MAIL FROM:<" + "a" * 65 + "@c.test>"]:
        code, text = c.cmd(bad)
        assert code == 501 and text.startswith("5.1.7"), (bad, text)
    assert c.cmd("MAIL FROM:<\"quoted local\"@[127.0.0.1]>")[0] == 250
    code, text = c.cmd("RCPT TO:<u@-bad-.test>")
    assert code == 501 and text.startswith("5.1.3")
    code, text = c.cmd("RCPT TO:<u@example.org> FOO=BAR")
    assert code == 555 and text.startswith("5.5.4")
    assert c.cmd("RCPT TO:<@relay.test:u@example.org>")[0] == 250  # source route ignored


@pytest.mark.parametrize("body,what", [
    # "LF . CRLF" would not end the data: a bare LF is no line ending.
    (b"Subject: lf\n\nbare LF\n\r\n.\r\n", "bare LF"),
    (b"Subject: cr\r\n\r\nbare\rCR\r\n.\r\n", "bare CR"),
])
def test_bare_line_endings_from_untrusted_client(make_tern, certs, users_file, body, what):
    # Outside mynetworks but authenticated: bare CR/LF is still rejected (smuggling).
    tern = make_tern(mynetworks=["127.0.0.1/32"], tls=certs, users=users_file)
    s = authenticated_outsider(tern, certs)
    s.mail("alice@client.test")
    s.rcpt("u@example.org")
    s.putcmd("DATA")
    assert s.getreply()[0] == 354
    s.send(body)
    code, text = s.getreply()
    assert code == 550 and text.startswith(b"5.6.2"), (what, text)
    assert tern.queue() == []
    s.sendmail("alice@client.test", ["u@example.org"], b"Subject: fine\r\n\r\nok\r\n")
    assert len(tern.queue()) == 1


def test_bare_lf_is_normalised_for_trusted_client(tern):
    c = open_transaction(tern.port("mx"))
    c.cmd("DATA")
    c.send(b"Subject: lf\n\nline one\nline two\r\n.\r\n")
    code, text = c.reply()
    assert code == 250
    queued = tern.queue()[0]
    content = tern.message_bytes(queued["id"])
    assert b"Subject: lf\r\n\r\nline one\r\nline two\r\n" in content
    assert b"\n" not in content.replace(b"\r\n", b"")


def test_smuggling_terminators_are_message_text(tern):
    """Only CRLF.CRLF ends DATA: LF.LF, CR.CR and mixtures are text, never an end."""
    c = open_transaction(tern.port("mx"))
    c.cmd("DATA")
    c.send(b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@attacker.test>\r\n"
           b"hello\r.\rRCPT TO:<x@y.test>\r\n"
           b"hello\r\n.\nDATA\r\n"
           b".\r\n")
    code, text = c.reply()
    # The trusted client's bare endings are normalised; what matters is that one message
    # came out, holding the would-be commands as text.
    assert code == 250, text
    [queued] = tern.queue()
    content = tern.message_bytes(queued["id"])
    assert b"MAIL FROM:<evil@attacker.test>" in content and b"DATA" in content
    assert c.cmd("NOOP")[0] == 250


def test_smuggling_from_untrusted_is_rejected(make_tern, certs, users_file):
    tern = make_tern(mynetworks=["127.0.0.1/32"], tls=certs, users=users_file)
    s = authenticated_outsider(tern, certs)
    s.mail("alice@client.test")
    s.rcpt("u@example.org")
    s.putcmd("DATA")
    s.getreply()
    s.send(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<v@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n")
    code, text = s.getreply()
    assert code == 550 and text.startswith(b"5.6.2")
    # Nothing after the bare LF was run as a command, and nothing was queued.
    assert s.docmd("RCPT TO:<w@example.org>")[0] == 503
    assert tern.queue() == []


def test_nul_bytes_are_rejected(tern):
    c = open_transaction(tern.port("mx"))
    c.cmd("DATA")
    c.send(b"Subject: nul\r\n\r\nbad\x00byte\r\n.\r\n")
    code, text = c.reply()
    assert code == 550 and text.startswith("5.6.0")
    assert tern.queue() == []
    good_transaction(tern.port("mx"))


def test_dot_stuffing_is_removed(tern):
    c = open_transaction(tern.port("mx"))
    c.cmd("DATA")
    c.send(b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\n.\r\n")
    assert c.reply()[0] == 250
    content = tern.message_bytes(tern.queue()[0]["id"])
    assert content.endswith(b"\r\n.leading dot\r\n..two\r\n")


def test_connection_limit_per_client(tern):
    port = tern.port("mx")
    held = [RawClient(port) for _ in range(3)]
    extra = RawClient(port)
    assert extra.greeting[0] == 421 and extra.greeting[1].startswith("4.7.0")
    assert extra.closed()
    # Another address is not affected.
    other = RawClient(port, source="127.0.0.3")
    assert other.greeting[0] == 220
    other.close()
    for c in held:
        c.cmd("QUIT")
        c.close()
    time.sleep(0.2)
    good_transaction(port)


def test_total_connection_limit(make_tern):
    tern = make_tern(limits="{ max_connections: 4, max_connections_per_client: 4 }")
    port = tern.port("mx")
    held = [RawClient(port, source=f"127.0.0.{i + 1}") for i in range(4)]
    extra = RawClient(port, source="127.0.0.9")
    assert extra.greeting[0] == 421 and extra.greeting[1].startswith("4.7.0")
    for c in held:
        c.close()
    time.sleep(0.3)
    good_transaction(port)


def test_command_and_data_timeouts(make_tern):
    tern = make_tern(limits="{ command_timeout: 1s, data_timeout: 2s }")
    port = tern.port("mx")
    c = RawClient(port)
    started = time.monotonic()
    code, text = c.reply()
    assert code == 421 and text.startswith("4.4.2")
    assert 0.8 < time.monotonic() - started < 5
    assert c.closed()

    c = open_transaction(port)
    c.cmd("DATA")
    c.send(b"Subject: slow\r\n\r\npartial")
    started = time.monotonic()
    code, text = c.reply()
    assert code == 421 and text.startswith("4.4.2")
    assert 1.5 < time.monotonic() - started < 6
    assert tern.queue() == [] and tern.spool_files() == []
    good_transaction(port)


def test_helo_disables_esmtp_parameters(tern):
    c = RawClient(tern.port("mx"))
    assert c.cmd("HELO client.test")[0] == 250
    code, _ = c.cmd("MAIL FROM:<a@client.test> SIZE=10")
    assert code == 555
    assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert c.cmd("VRFY root")[0] == 252
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("QUIT")[0] == 221


def test_client_vanishing_in_data_queues_nothing(tern):
    c = open_transaction(tern.port("mx"))
    c.cmd("DATA")
    c.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
    c.close()
    time.sleep(0.5)
    assert tern.queue() == [] and tern.spool_files() == []
    assert "nothing queued" in tern.log()
    good_transaction(tern.port("mx"))


def test_relay_probing_hits_the_error_cap(make_tern):
    tern = make_tern(mynetworks=["127.0.0.1/32"], limits="{ max_errors: 3 }")
    c = RawClient(tern.port("mx"), source="127.0.0.2")
    c.cmd("EHLO probe.test")
    c.cmd("MAIL FROM:<x@probe.test>")
    assert c.cmd("RCPT TO:<a@example.org>")[0] == 554
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 554
    assert c.cmd("RCPT TO:<c@example.org>")[0] == 421
    assert c.closed()
