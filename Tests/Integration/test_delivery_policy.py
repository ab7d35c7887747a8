"""What each delivery outcome leads to: retries, bounces (RFC 3464), lifetime expiry, NOTIFY,
bounces of bounces, delay warnings. Receiving servers: aiosmtpd and Postfix's smtp-sink."""
import os
import shutil
import subprocess
import time

import pytest

from peers import delivery, dsn_parts, free_port, send, wait_empty, wait_log


@pytest.fixture
def world(dns, mx_port, sinks):
    """rcpt.example's MX is 127.0.0.11; the senders' domain client.example's MX is 127.0.0.14."""
    dns.add("rcpt.example", ("MX", 10, "mx.rcpt.example"))
    dns.add("mx.rcpt.example", ("A", "127.0.0.11"))
    dns.add("client.example", ("MX", 10, "mx.client.example"))
    dns.add("mx.client.example", ("A", "127.0.0.14"))
    return sinks("127.0.0.11"), sinks("127.0.0.14")


def test_4xx_is_retried_then_delivered(make_tern, dns, mx_port, world):
    receiver, _ = world
    receiver.replies["later@rcpt.example"] = ["451 4.3.0 come back later", "250 ok"]
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["later@rcpt.example"])
    wait_log(tern, r"to=<later@rcpt\.example>, relay=mx\.rcpt\.example\[127\.0\.0\.11\]:\d+, .*dsn=4\.3\.0, "
                   r"status=deferred \(smtp; 451 4\.3\.0 come back later\)")
    [queued] = tern.queue()
    assert queued["recipients"][0]["state"] == "deferred" and queued["recipients"][0]["attempts"] == 1
    [m] = receiver.wait(1, timeout=15)
    assert m.rcpt_tos == ["later@rcpt.example"]
    wait_log(tern, r"to=<later@rcpt\.example>, .*status=sent")
    wait_empty(tern)


def test_5xx_bounces_that_recipient_with_an_rfc3464_report(make_tern, dns, mx_port, world):
    receiver, sender_side = world
    receiver.replies["gone@rcpt.example"] = "550 5.1.1 no such user"
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["gone@rcpt.example", "here@rcpt.example"], subject="quarterly report",
         options=["ORCPT=rfc822;gone@rcpt.example"])
    assert receiver.wait(1)[0].rcpt_tos == ["here@rcpt.example"], "the other recipient is delivered"
    [bounce] = sender_side.wait(1)
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == ["app@client.example"]
    msg = bounce.message()
    assert msg["Auto-Submitted"] == "auto-replied"
    per_message, per_recipient, parts = dsn_parts(bounce)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert len(per_recipient) == 1, "only the failed recipient is reported"
    r = per_recipient[0]
    assert r["Final-Recipient"] == "rfc822; gone@rcpt.example"
    assert r["Original-Recipient"] == "rfc822; gone@rcpt.example"
    assert (r["Action"], r["Status"]) == ("failed", "5.1.1")
    assert r["Remote-MTA"] == "dns; mx.rcpt.example"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2].get_payload()[0]["Subject"] == "quarterly report", "the original message is returned"
    wait_empty(tern)


def test_ret_hdrs_returns_headers_only(make_tern, dns, mx_port, world):
    receiver, sender_side = world
    receiver.replies["gone@rcpt.example"] = "550 5.1.1 no such user"
    tern = make_tern(delivery=delivery(dns, mx_port))
    import smtplib
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        s.sendmail("app@client.example", ["gone@rcpt.example"], b"Subject: secret\r\n\r\nthe body stays here\r\n",
                   mail_options=["RET=HDRS", "ENVID=batch42"])
    [bounce] = sender_side.wait(1)
    per_message, _, parts = dsn_parts(bounce)
    assert per_message["Original-Envelope-Id"] == "batch42"
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"the body stays here" not in bounce.content


def test_lifetime_expiry_bounces(make_tern, dns, mx_port, world):
    receiver, sender_side = world
    receiver.replies["stuck@rcpt.example"] = "452 4.2.2 mailbox full"
    tern = make_tern(delivery=delivery(dns, mx_port, ", queue_lifetime: 3s"))
    start = time.time()
    send(tern, "app@client.example", ["stuck@rcpt.example"])
    [bounce] = sender_side.wait(1, timeout=20)
    assert time.time() - start >= 3, "bounced only after the queue lifetime"
    _, [r], _ = dsn_parts(bounce)
    assert r["Action"] == "failed" and r["Status"] == "5.2.2"
    assert "452 4.2.2 mailbox full" in r["Diagnostic-Code"] and "queue lifetime" in r["Diagnostic-Code"]
    assert tern.log().count("status=deferred") >= 2, "it was retried until then"
    wait_empty(tern)


def test_notify_never_and_bounce_of_a_bounce(make_tern, dns, mx_port, world, sinks):
    receiver, sender_side = world
    receiver.replies["gone@rcpt.example"] = "550 5.1.1 no such user"
    dns.add("ops.example", ("A", "127.0.0.15"))
    postmaster = sinks("127.0.0.15")
    tern = make_tern(delivery=delivery(dns, mx_port, ', postmaster: "postmaster@ops.example"'))
    send(tern, "app@client.example", ["gone@rcpt.example"], options=["NOTIFY=NEVER"])
    wait_log(tern, r"to=<gone@rcpt\.example>, .*status=bounced")
    # Mail from <> that bounces goes to the postmaster, never back to <>.
    send(tern, "", ["gone@rcpt.example"], subject="a bounce")
    [notice] = postmaster.wait(1)
    assert notice.rcpt_tos == ["postmaster@ops.example"]
    _, [r], _ = dsn_parts(notice)
    assert r["Status"] == "5.1.1"
    time.sleep(1)
    assert sender_side.received == [], "NOTIFY=NEVER: no report to the sender"
    wait_empty(tern)


def test_delay_warning_once(make_tern, dns, mx_port, world):
    receiver, sender_side = world
    receiver.replies["slow@rcpt.example"] = "450 4.2.1 try later"
    tern = make_tern(delivery=delivery(dns, mx_port, ", delay_warning: 2s"))
    send(tern, "app@client.example", ["slow@rcpt.example"])
    [warning] = sender_side.wait(1, timeout=15)
    msg = warning.message()
    assert msg["Subject"].startswith("Delayed Mail")
    _, [r], _ = dsn_parts(warning)
    assert r["Action"] == "delayed" and r["Status"].startswith("4.")
    time.sleep(3)
    assert len(sender_side.received) == 1, "one warning per message"
    assert tern.queue(), "the message itself stays queued"


@pytest.fixture
def smtp_sink(tmp_path):
    """Postfix's smtp-sink on 127.0.0.16:<port>, started with the given options."""
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    procs = []

    def start(port, *options):
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        p = subprocess.Popen([binary, *user, *options, f"127.0.0.16:{port}", "64"], stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "smtp-sink.log", "ab"), cwd=tmp_path)
        procs.append(p)
        time.sleep(0.3)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_postfix_smtp_sink_accepts_and_hard_rejects(make_tern, dns, mx_port, world, smtp_sink, tmp_path):
    _, sender_side = world
    dns.add("sink.example", ("A", "127.0.0.16"))
    # smtp-sink writes as user postfix, which cannot enter pytest's private directories.
    import tempfile
    from pathlib import Path
    dumps = Path(tempfile.mkdtemp(prefix="tern-smtp-sink-"))
    os.chmod(dumps, 0o777)
    sink = smtp_sink(mx_port, "-d", str(dumps) + "/%M%S.")
    tern = make_tern(delivery=delivery(dns, mx_port))
    for i in range(3):
        send(tern, "app@client.example", [f"u{i}@sink.example"], subject=f"to smtp-sink {i}")
    wait_log(tern, r"to=<u2@sink\.example>, relay=sink\.example\[127\.0\.0\.16\]:\d+, .*status=sent")
    wait_empty(tern)
    assert len(list(dumps.iterdir())) == 3
    shutil.rmtree(dumps)
    sink.kill()
    sink.wait()
    # The same sink rejecting every RCPT with 5xx: each recipient bounces.
    smtp_sink(mx_port, "-f", "RCPT")
    send(tern, "app@client.example", ["x@sink.example"])
    [bounce] = sender_side.wait(1)
    _, [r], _ = dsn_parts(bounce)
    assert r["Final-Recipient"] == "rfc822; x@sink.example" and r["Status"].startswith("5.")
    wait_empty(tern)


def test_size_and_smtputf8_limits_of_the_receiver_bounce(make_tern, dns, mx_port, sinks, world):
    _, sender_side = world
    dns.add("small.example", ("A", "127.0.0.12"))
    # A receiver that declares SIZE 2000 and does not offer SMTPUTF8 (aiosmtpd's default).
    from peers import Sink
    tiny = Sink(host="127.0.0.12", port=mx_port, data_size_limit=2000)
    try:
        tern = make_tern(delivery=delivery(dns, mx_port))
        send(tern, "app@client.example", ["big@small.example"], body=("x" * 70 + "\r\n") * 70)
        import smtplib
        with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
            s.sendmail("app@client.example", ["j\u00fcrgen@small.example"], "Subject: gr\u00fc\u00dfe\r\n\r\nhi\r\n".encode(),
                       mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        bounces = sender_side.wait(2)
        statuses = sorted(dsn_parts(b)[1][0]["Status"] for b in bounces)
        assert statuses == ["5.3.4", "5.6.7"], statuses
        assert tiny.received == [], "nothing was sent that the server said it cannot take"
    finally:
        tiny.stop()


def test_restart_keeps_the_retry_schedule(make_tern, dns, mx_port, world):
    receiver, _ = world
    receiver.replies["later@rcpt.example"] = ["451 4.3.0 come back later", "250 ok"]
    tern = make_tern(delivery=delivery(dns, mx_port).replace("retry_first: 1s, retry_maximum: 2s", "retry_first: 1h, retry_maximum: 2h"))
    send(tern, "app@client.example", ["later@rcpt.example"])
    wait_log(tern, r"to=<later@rcpt\.example>, .*status=deferred")
    [before] = tern.queue()
    tern.stop()
    tern.start()
    time.sleep(2)
    [after] = tern.queue()
    assert after["recipients"] == before["recipients"], "attempts, next attempt and last error survive a restart"
    assert receiver.received == [], "deferred mail is not retried early after a restart"


def test_notify_success_to_a_server_without_dsn_gets_a_relayed_report(make_tern, dns, mx_port, world):
    receiver, sender_side = world
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["asked@rcpt.example"], subject="tell me", options=["NOTIFY=SUCCESS,FAILURE"])
    send(tern, "app@client.example", ["quiet@rcpt.example"], options=["NOTIFY=FAILURE"])
    receiver.wait(2)
    [report] = sender_side.wait(1)
    assert report.message()["Subject"] == "Successful Mail Delivery Report"
    _, [r], parts = dsn_parts(report)
    assert r["Final-Recipient"] == "rfc822; asked@rcpt.example"
    assert (r["Action"], r["Status"]) == ("relayed", "2.0.0")
    assert parts[2].get_content_type() == "text/rfc822-headers"
    time.sleep(1)
    assert len(sender_side.received) == 1, "no report for NOTIFY=FAILURE when delivered"
