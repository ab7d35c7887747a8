"""What Tern said 250 to survives kill -9; concurrent sessions queue each message once."""
import re
import signal
import smtplib
import threading
import time

from conftest import RawClient, good_transaction


def test_kill9_loses_nothing_accepted(make_tern):
    tern = make_tern()
    port = tern.port("mx")
    ids = [good_transaction(port, subject=f"m{i}") for i in range(40)]
    # A message half-way through DATA when the process dies.
    c = RawClient(port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@client.test>")
    c.cmd("RCPT TO:<u@example.org>")
    c.cmd("DATA")
    c.send(b"Subject: half\r\n\r\n" + b"y" * 400_000)  # past the 256 KB hold limit: on disk
    time.sleep(0.3)
    assert len(tern.spool_files()) == 41, "the half-written message is on disk, without its trailer"
    tern.kill9()
    tern.start()
    assert sorted(m["id"] for m in tern.queue()) == sorted(ids)
    assert len(tern.spool_files()) == 40
    assert "40 queued, 1 half-written removed, 0 corrupt" in tern.log()
    for i, queue_id in enumerate(ids):
        assert f"Subject: m{i}\r\n".encode() in tern.message_bytes(queue_id)


def test_kill9_under_load(make_tern):
    """Kill while 8 clients are sending: every id a client saw in a 250 is in the queue."""
    tern = make_tern()
    port = tern.port("mx")
    acked, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                acked.append(good_transaction(port))
            except Exception:
                return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    tern.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    tern.start()
    queued = {m["id"] for m in tern.queue()}
    assert len(acked) > 20
    assert set(acked) <= queued, f"lost: {set(acked) - queued}"


def test_50_clients_20_messages_each(make_tern):
    tern = make_tern()
    port = tern.port("mx")
    errors = []

    def client(n):
        try:
            s = smtplib.SMTP("127.0.0.1", port, timeout=60)
            for i in range(20):
                s.sendmail("app@client.test", [f"user{n}@example.org"], f"Subject: c{n}-m{i}\r\n\r\nbody\r\n".encode())
            s.quit()
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    queued = tern.queue()
    assert len(queued) == 1000
    assert len({m["id"] for m in queued}) == 1000
    subjects = set()
    for m in queued:
        subjects.add(re.search(rb"Subject: (c\d+-m\d+)\r\n", tern.message_bytes(m["id"])).group(1))
    assert len(subjects) == 1000
    # Ids sort by arrival.
    assert [m["id"] for m in queued] == sorted(m["id"] for m in queued)


def test_graceful_shutdown_finishes_open_transaction(make_tern):
    tern = make_tern()
    port = tern.port("mx")
    busy = RawClient(port)
    busy.cmd("EHLO client.test")
    busy.cmd("MAIL FROM:<a@client.test>")
    busy.cmd("RCPT TO:<u@example.org>")
    idle = RawClient(port)
    idle.cmd("EHLO client.test")
    tern.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # The idle session is told the server is going away.
    code, text = idle.reply()
    assert code == 421 and text.startswith("4.3.2")
    # New connections are refused.
    try:
        RawClient(port, timeout=2)
        assert False, "still accepting"
    except (ConnectionRefusedError, ConnectionError, OSError):
        pass
    # The open transaction completes, then 421.
    assert busy.cmd("DATA")[0] == 354
    busy.send(b"Subject: last\r\n\r\nfinished\r\n.\r\n")
    code, text = busy.reply()
    assert code == 250 and "queued as" in text
    code, text = busy.reply()
    assert code == 421 and text.startswith("4.3.2")
    assert busy.closed()
    assert tern.proc.wait(timeout=10) == 0
    tern.start()
    assert len(tern.queue()) == 1
