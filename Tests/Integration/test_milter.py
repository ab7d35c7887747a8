"""The milter bridge against a real libmilter milter (pymilter) and against a dead one."""
import ast
import re
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


def first_answer(tern):
    """The first refusal of a transaction (a milter that fails at connect refuses at MAIL),
    or the reply to DATA."""
    s = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=15)
    s.ehlo("client.example")
    for code, _ in (s.mail("app@client.example"), s.rcpt("u@example.org")):
        if code >= 400:
            s.quit()
            return code
    code, _ = s.data(b"Subject: x\r\n\r\nbody\r\n")
    s.quit()
    return code


def test_refusals_at_helo_mail_and_rcpt_are_the_replies_to_those_commands(make_tern, milter):
    """Regression: a milter's refusal at RCPT dropped that recipient after the client had
    been told 250 for it. Now each command stage is sent live and its verdict is the reply."""
    port, macros = milter
    tern = make_tern(extra=filters(f"inet:127.0.0.1:{port}"))
    s = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=15)
    code, text = s.ehlo("evil.example")
    assert code == 550 and b"Not you" in text, (code, text)
    assert s.ehlo("client.example")[0] == 250
    code, text = s.mail("spammer@client.example")
    assert code == 550 and b"Sender refused" in text, (code, text)
    assert s.mail("app@client.example")[0] == 250
    assert s.rcpt("u@example.org")[0] == 250
    code, text = s.rcpt("refused@example.org")
    assert code == 550 and text.startswith(b"5.1.1 No such user here"), (code, text)
    code, text = s.rcpt("later@example.org")
    assert code == 451 and text.startswith(b"4.2.1"), (code, text)
    assert s.rcpt("v@example.org")[0] == 250
    code, _ = s.data(b"Subject: live\r\n\r\nbody\r\n")
    assert code == 250
    # A second message on the same session, the same milter connection.
    assert s.mail("app@client.example")[0] == 250
    assert s.rcpt("w@example.org")[0] == 250
    assert s.data(b"Subject: second\r\n\r\nbody\r\n")[0] == 250
    s.quit()
    queued = sorted((r["address"] for m in tern.queue() for r in m["recipients"]))
    assert queued == ["u@example.org", "v@example.org", "w@example.org"]
    log = tern.log()
    assert re.search(r"reject: RCPT from \S+: 550 5\.1\.1 No such user here.*to=<refused@example\.org>", log), log[-2000:]
    seen = [ast.literal_eval(l) for l in macros.read_text().splitlines()]
    assert len(seen) == 2
    assert seen[0]["rcpts"] == ["<u@example.org>", "<refused@example.org>", "<later@example.org>", "<v@example.org>"]


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
        assert first_answer(tern) == code
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
    assert first_answer(dead) == code


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


def test_a_dribbling_milter_is_cut_off_at_its_deadline(make_tern):
    """The milter's reply timeout is a deadline: a byte every 0.3 s does not extend it."""
    import threading
    port = free_port()
    server = sock.socket()
    server.setsockopt(sock.SOL_SOCKET, sock.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(5)
    stop = threading.Event()

    def dribble():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            try:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x00\x64")  # a 100-byte packet, one byte every 0.3 s
                for _ in range(99):
                    if stop.is_set():
                        break
                    conn.sendall(b"O")
                    time.sleep(0.3)
            except OSError:
                pass
            conn.close()

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        tern = make_tern(extra=filters(f"inet:127.0.0.1:{port}", "accept"))
        start = time.time()
        assert first_answer(tern) == 250
        assert time.time() - start < 9, "the dribbling milter held the session past its 3 s deadline"
        assert "no reply from the milter in time" in tern.log()
    finally:
        stop.set()
        t.join()
        server.close()
