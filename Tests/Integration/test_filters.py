"""Pre-queue filters: header clean-up before the message is queued."""
import smtplib


def queued_content(tern):
    [m] = tern.queue()
    return tern.message_bytes(m["id"]).decode()


FILTER = """filters:
  - name: cleanup
    type: header_rewrite
    {listeners}settings:
      strip_x_mailer: true
      rules:
        - {{ match: "^X-Env:", action: replace, with: "X-Env: production" }}
"""


def test_private_received_lines_and_origin_headers_are_stripped(make_tern):
    tern = make_tern(extra=FILTER.format(listeners=""))
    message = (
        "Received: from mx.partner.example (mx.partner.example [198.51.100.7])\r\n\tby gw.example; Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        "Received: from app1 (app1 [10.1.2.3])\r\n\tby gw.example; Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        "X-Originating-IP: [10.0.0.9]\r\n"
        "X-PHP-Originating-Script: 33:mailer.php\r\n"
        "X-Mailer: PHPMailer 6\r\n"
        "X-Env: staging\r\n"
        "Subject: hello\r\n"
        "\r\n"
        "Received: from 10.0.0.1 in the body stays\r\n"
    )
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        s.sendmail("app@client.example", ["u@example.org"], message.encode())
    content = queued_content(tern)
    assert "198.51.100.7" in content
    for gone in ("10.1.2.3", "X-Originating-IP", "X-PHP-Originating-Script", "X-Mailer", "[127.0.0.1]"):
        assert gone not in content.split("\r\n\r\n")[0], gone
    assert "X-Env: production\r\n" in content
    assert content.endswith("\r\n\r\nReceived: from 10.0.0.1 in the body stays\r\n"), "the body is not touched"


def test_nothing_to_strip_passes_byte_identical(make_tern):
    tern = make_tern(extra=FILTER.format(listeners=""))
    message = "From: a@client.example\r\nTo: u@example.org\r\nSubject:  spaced  \r\nX-Folded: one\r\n  two\r\n\r\nbody\r\n.dot\r\n"
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        s.sendmail("a@client.example", ["u@example.org"], message.encode())
    # Tern's own Received line names the client's loopback address, so it goes too.
    assert queued_content(tern) == message


def test_filter_applies_only_to_its_listeners(make_tern):
    tern = make_tern(listeners=[("mx", "smtp"), ("apps", "smtp")], extra=FILTER.format(listeners="listeners: [apps]\n    "))
    for listener in ("mx", "apps"):
        with smtplib.SMTP("127.0.0.1", tern.port(listener), timeout=10) as s:
            s.sendmail("a@client.example", ["u@example.org"], f"Subject: via {listener}\r\nX-Originating-IP: [10.0.0.9]\r\n\r\nx\r\n".encode())
    by_subject = {}
    for m in tern.queue():
        text = tern.message_bytes(m["id"]).decode()
        by_subject["via mx" in text] = text
    assert "X-Originating-IP" in by_subject[True]
    assert "X-Originating-IP" not in by_subject[False]


def test_bdat_messages_go_through_the_filters_too(make_tern):
    from conftest import RawClient
    tern = make_tern(extra=FILTER.format(listeners=""))
    c = RawClient(tern.port("mx"))
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert c.cmd("RCPT TO:<u@example.org>")[0] == 250
    first = b"X-Originating-IP: [10.0.0.9]\r\n"
    second = b"Subject: chunked\r\n\r\nbody\r\n"
    c.send(b"BDAT %d\r\n" % len(first) + first)
    assert c.reply()[0] == 250
    c.send(b"BDAT %d LAST\r\n" % len(second) + second)
    code, text = c.reply()
    assert code == 250 and "queued as" in text
    assert queued_content(tern) == "Subject: chunked\r\n\r\nbody\r\n"


def test_memory_budget_for_filtered_messages(make_tern):
    """A message that would take the memory held for filters past limits.filter_memory gets
    452 4.3.1 instead of growing the process; the budget comes back when messages end."""
    from conftest import open_transaction
    tern = make_tern(extra=FILTER.format(listeners=""), limits="{ filter_memory: 1MB }")
    line = b"x" * 998 + b"\r\n"
    for _ in range(2):
        c = open_transaction(tern.port("mx"))
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: big\r\n\r\n" + line * 1500 + b".\r\n")  # 1.5 MB
        code, text = c.reply()
        assert code == 452 and text.startswith("4.3.1"), (code, text)
        assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250, "the session goes on"
        c.close()
    for _ in range(3):  # 600 KB each, one after another: each gives its share back
        c = open_transaction(tern.port("mx"))
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: fits\r\n\r\n" + line * 600 + b".\r\n")
        assert c.reply()[0] == 250
        c.close()
    assert len(tern.queue()) == 3


def test_a_huge_folded_header_does_not_stall_other_clients(make_tern):
    """Regression: one 9 MB folded Received: header took 12.6 s of regex time on the shared
    pool, and other clients' NOOP waited as long. Rules see the first 16 KB of a header, and
    the matching runs off that pool."""
    import threading
    import time
    from conftest import RawClient, open_transaction
    tern = make_tern(extra=FILTER.format(listeners=""))
    header = b"Received: from a (b [192.0.2.1])\r\n" + b"\tby relay.example with ESMTP id 0123456789abcdef;\r\n" * 170_000
    stop = threading.Event()
    latencies = []

    def noop():
        c = RawClient(tern.port("mx"))
        while not stop.is_set():
            started = time.monotonic()
            assert c.cmd("NOOP")[0] == 250
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        c.close()

    t = threading.Thread(target=noop)
    t.start()
    c = open_transaction(tern.port("mx"))
    assert c.cmd("DATA")[0] == 354
    started = time.monotonic()
    c.send(header + b"Subject: huge header\r\n\r\nbody\r\n.\r\n")
    code, text = c.reply()
    took = time.monotonic() - started
    stop.set()
    t.join()
    assert code == 250, text
    assert took < 10, f"filtering took {took:.1f} s"
    assert latencies and max(latencies) < 2, f"another client's NOOP waited {max(latencies):.2f} s"
