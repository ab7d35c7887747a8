"""The milter bridge against a real libmilter milter (pymilter) and against a dead one."""
import ast
import os
import smtplib
import socket as sock
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers import Blackhole, free_port

PEER = Path(__file__).parent / "Peers" / "milter_peer.py"


@pytest.fixture
def milter(tmp_path):
    port = free_port()
    macros = tmp_path / "macros.txt"
    p = subprocess.Popen([sys.executable, str(PEER), f"inet:{port}@127.0.0.1", str(macros)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert p.stdout.readline().strip() == "ready"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            sock.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port, macros
    p.kill()
    p.wait()


def filters(socket, extra=""):
    return f"""filters:
  - name: test-milter
    type: milter
    on_failure: {extra or "tempfail"}
    settings: {{ socket: "{socket}", connect_timeout: 2s, timeout: 3s, content_timeout: 3s }}
"""


def submit(tern, subject, sender="app@client.example", rcpts=("u@example.org",)):
    s = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=15)
    s.ehlo("client.example")
    s.mail(sender)
    for r in rcpts:
        s.rcpt(r)
    code, text = s.data(f"Subject: {subject}\r\nX-Change: old\r\nX-Delete: bye\r\n\r\noriginal body\r\n".encode())
    s.quit()
    return code, text.decode()


def test_reject_tempfail_custom_and_discard_reach_the_client(make_tern, milter):
    port, _ = milter
    tern = make_tern(extra=filters(f"inet:127.0.0.1:{port}"))
    assert submit(tern, "reject") == (550, "5.7.1 Go away, said the milter")
    code, text = submit(tern, "tempfail")
    assert code == 451 and text.startswith("4.7.1")
    assert submit(tern, "custom") == (554, "5.7.0 Custom refusal text")
    code, text = submit(tern, "discard")
    assert code == 250 and "queued as" in text
    assert tern.queue() == [], "nothing refused or discarded is queued"
    assert "discarded by filter test-milter" in tern.log()


def test_modifications_and_macros(make_tern, milter):
    port, macros = milter
    tern = make_tern(extra=filters(f"inet:{port}@127.0.0.1"))
    code, text = submit(tern, "edit", rcpts=("u@example.org", "removed@example.org"))
    assert code == 250
    qid = text.split("queued as ")[1]
    [m] = tern.queue()
    assert m["envelope"]["sender"] == "new-sender@example.net"
    assert [r["address"] for r in m["envelope"]["recipients"]] == ["u@example.org", "added@example.org"]
    content = tern.message_bytes(qid).decode()
    head, body = content.split("\r\n\r\n", 1)
    lines = head.split("\r\n")
    assert lines[0] == "X-Inserted-First: top"
    assert "X-Added: yes" in lines and "X-Change: new value" in lines
    assert not any(l.startswith("X-Delete") for l in lines)
    assert body == "replaced body\r\n"
    seen = ast.literal_eval(macros.read_text().splitlines()[-1])
    assert seen["i"] == qid and seen["j"] == "relay.test" and seen["{daemon_name}"] == "mx" and seen["v"] == "Tern"
    assert seen["{daemon_addr}"] == "127.0.0.1"
    assert seen["{client_addr}"] == "127.0.0.1" and seen["{mail_addr}"] == "app@client.example"
    assert seen["helo"] == "client.example" and seen["rcpts"] == ["<u@example.org>", "<removed@example.org>"]


def test_quarantine_queues_on_hold(make_tern, milter):
    port, _ = milter
    tern = make_tern(extra=filters(f"inet:127.0.0.1:{port}"))
    assert submit(tern, "quarantine")[0] == 250
    [m] = tern.queue()
    assert m["held"]
    assert "held by filter test-milter" in tern.log()


def test_untouched_message_passes(make_tern, milter):
    port, _ = milter
    tern = make_tern(extra=filters(f"inet:127.0.0.1:{port}"))
    assert submit(tern, "hello")[0] == 250
    [m] = tern.queue()
    assert "original body" in tern.message_bytes(m["id"]).decode()


@pytest.mark.parametrize("action,code", [("tempfail", 451), ("accept", 250), ("reject", 550)])
def test_dead_or_hanging_milter_applies_the_default_action(make_tern, action, code):
    hole_port = free_port()
    hole = Blackhole("127.0.0.1", hole_port)  # accepts, never answers: a hung milter
    try:
        tern = make_tern(extra=filters(f"inet:127.0.0.1:{hole_port}", action))
        start = time.time()
        assert submit(tern, "x")[0] == code
        assert time.time() - start < 10, "the timeout applies"
        # The server stays responsive meanwhile and afterwards.
        c = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=5)
        assert c.noop()[0] == 250
        c.quit()
        assert "filter test-milter:" in tern.log() and f"; {action}" in tern.log()
    finally:
        hole.stop()
    # Nothing listening at all: refused at connect, same default. (One daemon per spool: the
    # first one stops before the second starts in the same directory.)
    tern.stop()
    dead = make_tern(extra=filters(f"inet:127.0.0.1:{free_port()}", action))
    assert submit(dead, "x")[0] == code


@pytest.fixture
def opendkim(tmp_path):
    """OpenDKIM, the Debian package, as a signing milter on a loopback port, with its own
    config and a key made by opendkim-genkey."""
    import re
    keys = tmp_path / "odk"
    keys.mkdir()
    subprocess.run(["opendkim-genkey", "-D", str(keys), "-d", "example.com", "-s", "odk"], check=True, capture_output=True)
    record = "".join(re.findall(r'"([^"]*)"', (keys / "odk.txt").read_text())).encode()
    port = free_port()
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"""Syslog no
Background no
Mode s
Socket inet:{port}@127.0.0.1
Domain example.com
Selector odk
KeyFile {keys / 'odk.private'}
Canonicalization relaxed/relaxed
InternalHosts 10.99.0.0/16
RequireSafeKeys false
PidFile {tmp_path / 'opendkim.pid'}
""")
    p = subprocess.Popen(["opendkim", "-f", "-x", str(conf)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "opendkim.err", "w"))
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            sock.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if p.poll() is not None:
                raise RuntimeError((tmp_path / "opendkim.err").read_text())
            time.sleep(0.05)
    yield port, {b"odk._domainkey.example.com.": record}
    p.kill()
    p.wait()


def test_opendkim_signs_mail_from_an_authenticated_user(make_tern, opendkim, certs, users_file):
    import dkim
    from conftest import authenticated_outsider
    port, records = opendkim
    tern = make_tern(mynetworks=("127.0.0.1/32",), tls=certs, users=users_file, extra=filters(f"inet:{port}@127.0.0.1"))
    s = authenticated_outsider(tern, certs)
    s.sendmail("alice@example.com", ["u@example.org"],
               b"From: Alice <alice@example.com>\r\nTo: u@example.org\r\nSubject: signed by OpenDKIM\r\n\r\nhello\r\n")
    s.quit()
    [m] = tern.queue()
    content = tern.message_bytes(m["id"])
    assert b"DKIM-Signature:" in content and b"d=example.com" in content and b"s=odk" in content
    assert dkim.verify(content, dnsfunc=lambda name, timeout=5: records.get(name))
