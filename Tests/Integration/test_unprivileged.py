"""Tern run as an ordinary user, as a new user and a service that dropped root would run it:
every listener kind takes mail, one message is delivered to a receiving server, and the queue
commands work against the running daemon, from a spool that user owns.

The rest of the suite runs as root (CI too), where a socket option that needs a capability
still works; here nothing the daemon does has root behind it.
"""
import os
import pwd
import shutil
import smtplib
import ssl
import tempfile
from pathlib import Path

import pytest

from conftest import BINARY, Tern, tls_client_context
from peers import delivery, wait_empty, wait_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def unprivileged_home():
    """A directory owned by `nobody` (uid, gid, path), with its own copy of the binary, so
    that nothing on the way to it needs root's permissions. Removed afterwards."""
    if os.geteuid() != 0:
        # Not root: the whole suite already runs unprivileged; run these as the current user.
        d = Path(tempfile.mkdtemp(prefix="tern-user-"))
        yield None, d
        shutil.rmtree(d, ignore_errors=True)
        return
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="tern-nobody-"))
    os.chmod(d, 0o755)
    shutil.copy2(BINARY, d / "tern")
    os.chmod(d / "tern", 0o755)
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    yield (nobody.pw_uid, nobody.pw_gid), d
    shutil.rmtree(d, ignore_errors=True)


def own(user, path, mode):
    os.chmod(path, mode)
    if user:
        os.chown(path, *user)


def start(user, home, config):
    binary = str(home / "tern") if user else BINARY
    return Tern(home, config, user=user, binary=binary).start()


def test_default_config_as_an_ordinary_user(unprivileged_home, dns):
    """config/tern.yaml as shipped, only its port moved to one the kernel picks and its DNS
    pointed at the test's server: the first connection must get a reply, and the daemon live on."""
    user, home = unprivileged_home
    (home / "config").mkdir()
    shutil.copy(ROOT / "config/providers.yaml", home / "config/providers.yaml")
    text = (ROOT / "config/tern.yaml").read_text()
    assert '"127.0.0.1:2525"' in text
    text = text.replace('"127.0.0.1:2525"', '"127.0.0.1:0"')
    text = text.replace("\ndelivery:\n", f'\ndelivery:\n  paused: true\n  resolver: "127.0.0.1:{dns.port}"\n', 1)
    for p in (home / "config", home / "config/providers.yaml"):
        own(user, p, 0o755 if p.is_dir() else 0o644)
    tern = start(user, home, text)
    try:
        for _ in range(3):
            with smtplib.SMTP("127.0.0.1", tern.port("local"), timeout=10) as s:
                s.sendmail("cron@app.example", ["ops@example.org"], b"Subject: as nobody\r\n\r\nhello\r\n")
        assert tern.proc.poll() is None, tern.log()
        assert "Permission denied" not in tern.log()
        assert len(tern.queue()) == 3
    finally:
        tern.stop()
    assert tern.proc.returncode == 0, tern.log()


def test_every_listener_kind_delivery_and_queue_commands(unprivileged_home, certs, users_file, dns, mx_port, sinks):
    user, home = unprivileged_home
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, home / name)
        own(user, home / name, 0o600 if name.endswith(".key") else 0o644)
    shutil.copy(users_file, home / "users")
    own(user, home / "users", 0o600)
    dns.add("held.example", ("A", "127.0.0.11"))
    dns.add("sent.example", ("A", "127.0.0.11"))
    receiver = sinks("127.0.0.11")
    config = "\n".join([
        "hostname: relay.test",
        "spool: var/spool",
        "listeners:",
        '  - { name: mx, kind: smtp, address: "127.0.0.1:0" }',
        '  - { name: sub, kind: submission, address: "127.0.0.1:0" }',
        '  - { name: tls, kind: smtps, address: "127.0.0.1:0" }',
        f"tls: {{ certificate: {home / 'server.crt'}, key: {home / 'server.key'} }}",
        "access:",
        '  mynetworks: ["127.0.0.0/8"]',
        f"  users_file: {home / 'users'}",
        "delivery: " + delivery(dns, mx_port).replace("retry_first: 1s, retry_maximum: 2s", "retry_first: 1h, retry_maximum: 2h"),
    ]) + "\n"
    tern = start(user, home, config)
    try:
        spool = home / "var/spool"
        if user:
            assert spool.stat().st_uid == user[0], "the spool belongs to the user the daemon runs as"

        # The queue commands against the live daemon, over its control socket: the first
        # message is deferred once, then held, listed, shown, released and delivered.
        receiver.replies["a@held.example"] = ["451 4.3.0 not now", "250 ok"]
        context = tls_client_context(certs)
        with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
            s.sendmail("app@client.example", ["a@held.example"], b"Subject: deferred\r\n\r\nwaits\r\n")
        with smtplib.SMTP("127.0.0.1", tern.port("sub"), timeout=10) as s:
            s.starttls(context=context)
            s.login("alice", "wonderland")
            s.sendmail("alice@client.example", ["b@sent.example"], b"Subject: submitted\r\n\r\nhello\r\n")
        with smtplib.SMTP_SSL("127.0.0.1", tern.port("tls"), timeout=10, context=context) as s:
            s.login("bob", "builder")
            s.sendmail("bob@client.example", ["c@sent.example"], b"Subject: implicit tls\r\n\r\nhello\r\n")

        wait_log(tern, r"to=<a@held\.example>, relay=\S+\[127\.0\.0\.11\]:\d+, .*status=deferred")
        wait_log(tern, r"to=<b@sent\.example>, relay=\S+\[127\.0\.0\.11\]:\d+, .*status=sent")
        wait_log(tern, r"to=<c@sent\.example>, relay=\S+\[127\.0\.0\.11\]:\d+, .*status=sent")
        tern.run("queue", "hold", "--domain", "held.example")
        listed = tern.queue()
        assert [r["address"] for m in listed for r in m["recipients"]] == ["a@held.example"], listed
        assert listed[0]["held"] is True
        assert "a@held.example" in tern.run("queue", "show", listed[0]["id"]).stdout
        tern.run("queue", "release", "--all")
        wait_log(tern, r"to=<a@held\.example>, relay=\S+\[127\.0\.0\.11\]:\d+, .*status=sent")
        wait_empty(tern)
        assert sorted(r for m in receiver.received for r in m.rcpt_tos) == ["a@held.example", "b@sent.example", "c@sent.example"]

        # delete and flush reach the daemon too.
        receiver.replies["gone@held.example"] = "451 4.3.0 not now"
        with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
            s.sendmail("app@client.example", ["gone@held.example"], b"Subject: deleted\r\n\r\nx\r\n")
        wait_log(tern, r"to=<gone@held\.example>, .*status=deferred")
        assert len(tern.queue()) == 1
        tern.run("queue", "delete", "--all")
        wait_empty(tern)
        tern.run("queue", "flush")
        assert tern.proc.poll() is None, tern.log()
        assert "Permission denied" not in tern.log()
    finally:
        tern.stop()
    assert tern.proc.returncode == 0, tern.log()
