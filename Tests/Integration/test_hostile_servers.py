"""Receiving servers that lie, inject, dribble or flood: Tern never counts mail as delivered
that the server did not take after a real 354 and final dot, never grows without bound, and
never lets a slow server hold a connection past its deadline."""
import os
import re
import socket
import subprocess
import time

import pytest

from peers import Hostile, delivery, send, wait_log

EHLO_TLS = (b"STARTTLS", b"PIPELINING")


@pytest.fixture
def hostile(mx_port):
    started = []

    def start(script, tls=None, host="127.0.0.11"):
        h = Hostile(host, mx_port, script, tls=tls)
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()


def world(make_tern, dns, mx_port, extra=""):
    dns.add("hostile.example", ("A", "127.0.0.11"))
    return make_tern(delivery=delivery(dns, mx_port, extra).replace("retry_first: 1s, retry_maximum: 2s",
                                                                    "retry_first: 1h, retry_maximum: 2h"))


def greet_and_ehlo(c, extensions=EHLO_TLS):
    c.send(b"220 hostile.test ESMTP\r\n")
    assert c.line().upper().startswith(b"EHLO")
    lines = [b"hostile.test", *extensions]
    c.send(b"".join(b"250-" + l + b"\r\n" for l in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")


def test_replies_injected_after_starttls_are_discarded(make_tern, dns, mx_port, hostile, certs):
    """Regression: `220 go ahead\\r\\n250-x\\r\\n250 y\\r\\n` in one packet put every later reply
    one off; Tern logged status=sent for mail the server never received and removed it."""
    def script(c):
        greet_and_ehlo(c)
        assert c.line().upper() == b"STARTTLS"
        c.send(b"220 go ahead\r\n250-x\r\n250 y\r\n")
        c.starttls()
        c.honest_session()

    server = hostile(script, tls=(certs / "server.crt", certs / "server.key"))
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["victim@hostile.example"], subject="injected")
    wait_log(tern, r"to=<victim@hostile\.example>, .*status=(sent|deferred)")
    time.sleep(0.3)
    log = tern.log()
    assert len(server.received) == 1, (server.received, log[-2000:])
    _, rcpts, content = server.received[0]
    assert rcpts == [b"RCPT TO:<victim@hostile.example>"]
    assert b"Subject: injected" in content
    assert re.search(r"to=<victim@hostile\.example>, .*status=sent", log)


def test_250_to_data_is_a_protocol_error_not_a_delivery(make_tern, dns, mx_port, hostile):
    def script(c):
        greet_and_ehlo(c, (b"PIPELINING",))
        while True:
            line = c.line().upper()
            if line.startswith(b"DATA"):
                c.send(b"250 2.0.0 sure, got it\r\n")  # never a 354: no content was sent
            elif line.startswith(b"QUIT"):
                c.send(b"221 bye\r\n")
                return
            else:
                c.send(b"250 2.0.0 ok\r\n")

    hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*dsn=(\S+), status=(\w+) \((.*)\)")
    assert line.group(2) == "deferred" and line.group(1) == "4.5.0", line.group(0)
    assert "unexpected reply 250" in line.group(3)
    [queued] = tern.queue()
    assert queued["recipients"][0]["state"] == "deferred"


def test_data_goes_out_with_the_envelope_to_a_pipelining_server(make_tern, dns, mx_port, hostile):
    """RFC 2920 §3.1: MAIL, the RCPTs and DATA in one group, one round trip. The server reads
    all three before it answers any: a client that waits for the RCPT replies before DATA
    leaves it waiting, and the test fails."""
    seen = []

    def script(c):
        greet_and_ehlo(c, (b"PIPELINING",))
        c.sock.settimeout(5)
        group = [c.line(), c.line(), c.line()]
        seen.append(group)
        c.send(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
        while c.line() != b".":
            pass
        c.send(b"250 2.0.0 accepted\r\n")
        c.honest_session()

    hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*status=(\w+)")
    assert line.group(1) == "sent", line.group(0)
    [group] = seen
    assert [l.split(b":")[0].upper() for l in group] == [b"MAIL FROM", b"RCPT TO", b"DATA"], group


def test_data_taken_after_every_recipient_was_refused_gets_only_the_dot(make_tern, dns, mx_port, hostile):
    """A server that refuses every recipient and still answers the pipelined DATA with 354
    gets `.` alone (RFC 2920 §3.1), never the content, and nothing counts as delivered."""
    def script(c):
        greet_and_ehlo(c, (b"PIPELINING",))
        c.honest_session(rcpt_reply=b"550 5.1.1 no such user\r\n", data_reply=b"250 2.0.0 queued for nobody\r\n")

    server = hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"], subject="must not leak")
    line = wait_log(tern, r"to=<u@hostile\.example>, .*dsn=(\S+), status=(\w+)")
    assert (line.group(1), line.group(2)) == ("5.1.1", "bounced"), line.group(0)
    assert [content for _, _, content in server.received] == [b""], server.received
    assert tern.proc.poll() is None


@pytest.mark.parametrize("final", [b"354 more please\r\n", b"220 hello again\r\n"])
def test_only_a_250_after_the_dot_delivers(make_tern, dns, mx_port, hostile, final):
    def script(c):
        greet_and_ehlo(c, ())
        c.honest_session(data_reply=final)

    hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*dsn=(\S+), status=(\w+)")
    assert line.group(2) == "deferred" and line.group(1) == "4.5.0", line.group(0)
    assert len(tern.queue()) == 1


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_endless_greeting_is_cut_off(make_tern, dns, mx_port, hostile):
    """Regression: a greeting of endless `220-` lines grew Tern to 586 MB in 64 s."""
    sent = [0]

    def script(c):
        chunk = b"220-" + b"x" * 60 + b"\r\n"
        block = chunk * 1000
        started = time.time()
        while sent[0] < 200_000_000 and time.time() - started < 30:
            c.send(block)  # raises once Tern has hung up
            sent[0] += len(block)

    server = hostile(script)
    tern = world(make_tern, dns, mx_port)
    before = rss_kb(tern.proc.pid)
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*dsn=(\S+), status=(\w+) \((.*)\)")
    assert line.group(2) == "deferred", line.group(0)
    assert "reply longer than" in line.group(3) or "protocol error" in line.group(3), line.group(3)
    deadline = time.time() + 10
    while not server.client_closed_after and time.time() < deadline:
        time.sleep(0.1)
    assert server.client_closed_after and server.client_closed_after[0] < 10, "Tern did not hang up"
    assert sent[0] < 20_000_000, f"the server got to send {sent[0]} bytes before Tern hung up"
    assert rss_kb(tern.proc.pid) - before < 50_000


def test_overlong_reply_line_is_refused(make_tern, dns, mx_port, hostile):
    def script(c):
        c.send(b"220 " + b"y" * 100_000 + b"\r\n")
        time.sleep(5)

    hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*status=(\w+) \((.*)\)")
    assert line.group(1) == "deferred" and "reply line longer than" in line.group(2), line.group(0)


def test_dribbling_server_is_cut_off_at_the_deadline(make_tern, dns, mx_port, hostile):
    """command_timeout is a deadline for the whole reply: a byte every 0.3 s does not extend it."""
    def script(c):
        for byte in b"220-" + b"z" * 200 + b"\r\n220 ready\r\n":
            c.send(bytes([byte]))
            time.sleep(0.3)

    server = hostile(script)
    tern = make_tern(delivery=delivery(dns, mx_port, ", command_timeout: 2s"))
    dns.add("hostile.example", ("A", "127.0.0.11"))
    started = time.time()
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*status=(\w+) \((.*)\)", timeout=30)
    assert line.group(1) == "deferred", line.group(0)
    assert time.time() - started < 8, "the connection outlived its deadline"


def test_server_closing_mid_reply_defers(make_tern, dns, mx_port, hostile):
    def script(c):
        greet_and_ehlo(c, ())
        c.line()  # MAIL
        c.send(b"250-2.1.0 half a reply")  # and gone

    hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"])
    line = wait_log(tern, r"to=<u@hostile\.example>, .*status=(\w+)")
    assert line.group(1) == "deferred"
    assert len(tern.queue()) == 1


def test_control_characters_in_replies_are_escaped(make_tern, dns, mx_port, hostile):
    """Regression: ESC codes in a reply coloured `tern queue list`; a LF or NUL in a log value
    forged or cut a line."""
    def script(c):
        greet_and_ehlo(c, ())
        while True:
            line = c.line().upper()
            if line.startswith(b"RCPT"):
                c.send(b"450 4.2.0 \x1b[31mred\x1b[0m\x00cut\x7f here\r\n")
            elif line.startswith(b"QUIT"):
                c.send(b"221 bye\r\n")
                return
            else:
                c.send(b"250 ok\r\n")

    hostile(script)
    tern = world(make_tern, dns, mx_port)
    send(tern, "app@client.example", ["u@hostile.example"])
    wait_log(tern, r"to=<u@hostile\.example>, .*status=deferred")
    raw = tern.log_path.read_bytes()
    assert b"\x1b" not in raw and b"\x00" not in raw and b"\x7f" not in raw
    assert b"\\x1B[31mred\\x1B[0m\\x00cut\\x7F here" in raw
    listing = tern.run("queue", "list").stdout
    assert "\x1b" not in listing and "\x00" not in listing
    assert "\\x1B[31mred" in listing
    shown = tern.run("queue", "list", "--json").stdout
    assert "\x1b" not in shown


def test_server_that_stops_reading_the_message_is_cut_off(make_tern, dns, mx_port, hostile):
    """The server answers 354, then never reads: its window closes, Tern's writes wait for the
    connection to drain, and the reply deadline still ends the attempt (the wait is not
    forever), with the message deferred and the connection closed."""
    def script(c):
        greet_and_ehlo(c, ())
        for reply in (b"250 2.1.0 ok\r\n", b"250 2.1.5 ok\r\n", b"354 go on\r\n"):
            c.line()
            c.send(reply)
        while c.server.running:  # reads nothing more; the client going away ends this
            time.sleep(0.1)

    server = hostile(script)
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window from the first byte
    tern = make_tern(delivery=delivery(dns, mx_port, ", command_timeout: 2s, data_timeout: 3s")
                     .replace("retry_first: 1s, retry_maximum: 2s", "retry_first: 1h, retry_maximum: 2h"))
    dns.add("hostile.example", ("A", "127.0.0.11"))
    body = ("x" * 76 + "\r\n") * 80_000  # 6.2 MB: more than the kernel's buffers on both sides hold
    started = time.time()
    send(tern, "app@client.example", ["u@hostile.example"], body=body)
    line = wait_log(tern, r"to=<u@hostile\.example>, .*status=(\w+) \((.*)\)", timeout=40)
    assert line.group(1) == "deferred", line.group(0)
    assert "timeout" in line.group(2) or "timed out" in line.group(2), line.group(0)
    assert time.time() - started < 25, "the attempt outlived its deadline"
    assert server.received == []
    assert len(tern.queue()) == 1
    assert tern.proc.poll() is None
