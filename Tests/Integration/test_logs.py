"""Where the log goes: a file that SIGUSR1 reopens (logrotate), or the local syslog socket
with facility mail."""
import os
import re
import signal
import smtplib
import socket
import subprocess
import time

import shutil

import pytest

from conftest import BINARY, Tern
from peers import HOSTS, delivery, wait_log


def config(extra_log, port="0"):
    return "\n".join([
        "hostname: relay.test",
        "spool: var/spool",
        "listeners:",
        f'  - {{ name: mx, kind: smtp, address: "127.0.0.1:{port}" }}',
        "access:",
        '  mynetworks: ["127.0.0.0/8"]',
        "delivery: { paused: true }",
        f"log: {{ level: info, {extra_log} }}",
    ]) + "\n"


def send(port, subject):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("app@client.example", ["u@example.org"], f"Subject: {subject}\r\n\r\nx\r\n".encode())


def test_file_output_is_reopened_on_sigusr1(tmp_path):
    tern = Tern(tmp_path, config("output: file, file: mail.log"))
    tern.log_path = tmp_path / "mail.log"  # the harness reads the file Tern writes
    tern.start()
    try:
        send(tern.port("mx"), "before rotation")
        os.rename(tmp_path / "mail.log", tmp_path / "mail.log.1")
        tern.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 10
        while not (tmp_path / "mail.log").exists() and time.time() < deadline:
            time.sleep(0.05)
        send(tern.port("mx"), "after rotation")
        time.sleep(0.3)
        old = (tmp_path / "mail.log.1").read_text()
        new = (tmp_path / "mail.log").read_text()
        assert old.count("from=<app@client.example>") == 1
        assert new.count("from=<app@client.example>") == 1, new
        assert "SIGUSR1: log reopened" in new
        assert re.search(r"^\d{4}-\d\d-\d\dT\S+Z tern\[\d+\]: info: \w+: from=<app@client\.example>", new, re.M)
    finally:
        tern.stop()


def test_syslog_output_has_facility_mail(tmp_path):
    path = str(tmp_path / "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(10)
    (tmp_path / "tern.yaml").write_text(config(f'output: syslog, syslog_socket: "{path}"'))
    proc = subprocess.Popen([BINARY, "serve", "--config", str(tmp_path / "tern.yaml")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lines = []
        port = None
        deadline = time.time() + 15
        while port is None and time.time() < deadline:
            line = sink.recv(65536).decode()
            lines.append(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, lines
        # RFC 3164 as syslog(3) sends it: <PRI>Mmm dd hh:mm:ss tag[pid]: text; mail.info is 22.
        assert re.fullmatch(rf"<22>[A-Z][a-z]{{2}} [ \d]\d \d\d:\d\d:\d\d tern\[{proc.pid}\]: listening on .*", lines[-1]), lines[-1]
        send(port, "via syslog")
        received = ""
        while "from=<app@client.example>" not in received:
            received = sink.recv(65536).decode()
        # The service is in the tag, as Postfix's: pflogsumm --syslog-name=tern reads it.
        assert re.fullmatch(rf"<22>.{{15}} tern/qmgr\[{proc.pid}\]: \w+: from=<app@client\.example>, .*", received), received
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        sink.close()


def test_bad_output_names_the_key(tmp_path):
    path = tmp_path / "tern.yaml"
    path.write_text(config("output: journal"))
    out = subprocess.run([BINARY, "check", "--config", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 78 and "log.output: must be one of stderr, syslog, file" in out.stderr, out.stderr


def pflogsumm(log):
    out = subprocess.run(["pflogsumm", "--syslog-name=tern", str(log)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def figure(report, label):
    m = re.search(rf"^\s+(\d+)\s+{label}\b", report, re.M)
    assert m, f"no '{label}' in:\n{report}"
    return int(m.group(1))


def test_pflogsumm_counts_what_was_sent(tmp_path, dns, mx_port, sinks):
    """The real pflogsumm on Tern's log (`log.style: postfix`), figures against the traffic."""
    if shutil.which("pflogsumm") is None:
        pytest.skip("pflogsumm is not installed (scripts/setup --test installs it)")
    sink = sinks(HOSTS[0])
    for domain in ("a.example", "client.example"):
        dns.add(domain, ("A", HOSTS[0]))
    dns.add("down.example", ("A", HOSTS[1]))  # nothing listens there: deferred
    text = "\n".join([
        "hostname: relay.test",
        "spool: var/spool",
        "listeners:",
        '  - { name: mx, kind: smtp, address: "127.0.0.1:0" }',
        "access:",
        '  mynetworks: ["127.0.0.1/32"]',
        '  reject_senders: ["@bad.example"]',
        "delivery: " + delivery(dns, mx_port),
        "log: { output: file, file: mail.log, style: postfix }",
    ]) + "\n"
    tern = Tern(tmp_path, text)
    tern.log_path = tmp_path / "mail.log"
    tern.start()
    try:
        port = tern.port("mx")

        def mail(sender, recipients, source="127.0.0.1"):
            with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as s:
                s.sendmail(sender, recipients, f"From: {sender}\r\nSubject: s\r\n\r\nbody\r\n".encode())

        mail("app@client.example", ["u1@a.example"])
        mail("app@client.example", ["u2@a.example", "u3@a.example"])
        mail("cron@client.example", ["x@nxdomain.example"])  # bounced; its DSN is delivered
        mail("app@client.example", ["y@down.example"])
        with pytest.raises(smtplib.SMTPSenderRefused):
            mail("spam@bad.example", ["u1@a.example"])  # rejected at MAIL
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            mail("app@client.example", ["u1@a.example"], source="127.0.0.2")  # not in mynetworks: relay denied
        sink.wait(3)  # two messages (one with two recipients) and the bounce
        wait_log(tern, r"status=deferred")
    finally:
        tern.stop()
    log = (tmp_path / "mail.log").read_text()
    assert re.search(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d relay\.test tern/smtp\[\d+\]: \w+: to=<u1@a\.example>, relay=", log, re.M), log
    report = pflogsumm(tmp_path / "mail.log")
    assert figure(report, "received") == 4, report
    assert figure(report, "delivered") == 4, report  # u1, u2, u3 and the bounce to cron@
    assert figure(report, "deferred") == 1, report
    assert figure(report, "bounced") == 1, report
    assert figure(report, "rejected") == 2, report
    assert figure(report, "senders") == 2, report
    assert figure(report, "sending hosts/domains") == 1, report
    assert figure(report, "recipients") == 4, report
    assert figure(report, "recipient hosts/domains") == 2, report
    # The per-domain table and the reject detail name what happened.
    assert re.search(r"^\s+3\s+\d+\s+0\s+.*\ba\.example$", report, re.M), report  # sent cnt, bytes, defers
    assert re.search(r"^\s+0\s+0\s+\d+\s+.*\bdown\.example$", report, re.M), report
    assert "Relay access denied" in report and "spam@bad.example" in report
    assert "Messages with no size data" not in report  # the bounce has its from=<>, size= line too

    # tern report reads the same log, and agrees.
    import json
    out = subprocess.run([BINARY, "report", "--json", "--config", str(tern.config_path)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    assert (ours["received"], ours["delivered"], ours["deferredMessages"], ours["bounced"], ours["rejected"]) == (4, 4, 1, 1, 2)
    assert ours["notifications"] == 1
    assert {c["name"]: c["count"] for c in ours["topSenders"]} == {"app@client.example": 3, "cron@client.example": 1}
    a = next(r for r in ours["byDomain"] if r["name"] == "a.example")
    assert (a["sent"], a["deferred"], a["bounced"]) == (3, 0, 0)
    lane = next(r for r in ours["byLane"] if r["name"] == "down.example")
    assert lane["sent"] == 0 and lane["deferred"] == ours["deferrals"] >= 1
    assert any(c["name"].startswith("RCPT 554 5.7.1 Relay access denied") for c in ours["rejectReasons"]), ours["rejectReasons"]
    assert any("no such domain" in c["name"] for c in ours["bounceReasons"]), ours["bounceReasons"]
    assert ours["queued"] == 1  # the deferred message
    # As text, mailed from cron: `tern report | tern sendmail admin@…` (the daemon is down: the maildrop).
    text = subprocess.run([BINARY, "report", "--config", str(tern.config_path)], cwd=tmp_path, capture_output=True, timeout=30)
    assert text.returncode == 0 and text.stdout.startswith(b"Subject: Tern report for relay.test: ")
    mailed = subprocess.run([BINARY, "sendmail", "-C", str(tern.config_path), "admin@relay.test"], input=text.stdout,
                            cwd=tmp_path, capture_output=True, timeout=30)
    assert mailed.returncode == 0, mailed.stderr
    [drop] = list((tmp_path / "var/spool/maildrop").iterdir())
    content = drop.read_bytes()
    assert b"recipient admin@relay.test\n" in content and b"\r\nSubject: Tern report for relay.test" in content
    assert b"       4  received" in content
