"""Mail loops end: a message that has passed through too many relays is refused, and a next
hop that turns out to be Tern itself is not delivered to."""
import time

import pytest

from conftest import RawClient, Tern, open_transaction
from peers import Hostile, delivery, free_port, send, wait_log


def data_with_hops(c, hops):
    assert c.cmd("DATA")[0] == 354
    headers = b"".join(b"Received: from hop%d.example by hop%d.example; Fri, 27 Nov 2026 10:00:00 +0000\r\n" % (i, i + 1)
                       for i in range(hops))
    c.send(headers + b"Subject: hops\r\n\r\nbody\r\n.\r\n")
    return c.reply()


def test_hop_limit(make_tern):
    tern = make_tern(limits="{ max_hops: 10 }")
    code, text = data_with_hops(open_transaction(tern.port("mx")), 9)
    assert code == 250, text
    code, text = data_with_hops(open_transaction(tern.port("mx")), 10)
    assert code == 554 and text.startswith("5.4.6"), (code, text)
    # Folded and differently cased headers count too; a "Received:" in the body does not.
    c = open_transaction(tern.port("mx"))
    assert c.cmd("DATA")[0] == 354
    c.send(b"RECEIVED: from a\r\n\tby b\r\n" * 10 + b"\r\n" + b"Received: in the body\r\n" * 20 + b".\r\n")
    assert c.reply()[0] == 554
    assert len(tern.queue()) == 1


def test_default_hop_limit_is_50(make_tern):
    tern = make_tern()
    assert data_with_hops(open_transaction(tern.port("mx")), 49)[0] == 250
    assert data_with_hops(open_transaction(tern.port("mx")), 50)[0] == 554


def loop_config(port, route_port):
    return "\n".join([
        "hostname: relay.test",
        "spool: var/spool",
        "listeners:",
        f'  - {{ name: mx, kind: smtp, address: "127.0.0.1:{port}" }}',
        "access:",
        '  mynetworks: ["127.0.0.0/8"]',
        "delivery: { retry_first: 1s, retry_maximum: 2s, retry_jitter: 0, connect_timeout: 3s }",
        "routes:",
        "  - name: self",
        '    domains: ["loop.example"]',
        "    transport: smarthost",
        f"    smarthost: {{ host: 127.0.0.1, port: {route_port}, tls: none }}",
    ]) + "\n"


def test_smarthost_that_is_our_own_listener(tmp_path):
    """Regression: a route whose next hop was Tern itself accepted one message 2,870 times."""
    port = free_port()
    tern = Tern(tmp_path, loop_config(port, port)).start()
    try:
        send(tern, "app@client.example", ["u@loop.example"])
        line = wait_log(tern, r"to=<u@loop\.example>, .*dsn=(\S+), status=(\w+) \((.*)\)")
        assert line.group(1) == "5.4.6" and line.group(2) == "bounced", line.group(0)
        assert "loops back to myself" in line.group(3)
        time.sleep(1)
        assert tern.log().count("from=<app@client.example>") == 1, "accepted once, never again from itself"
    finally:
        tern.stop()


def test_next_hop_that_greets_with_our_hostname(tmp_path, mx_port):
    """Another address, same relay (or a twin with our name): the greeting gives it away."""
    def script(c):
        c.send(b"220 relay.test ESMTP Tern\r\n")
        while True:
            line = c.line().upper()
            if line.startswith(b"QUIT"):
                c.send(b"221 bye\r\n")
                return
            c.send(b"250 relay.test\r\n")

    server = Hostile("127.0.0.1", mx_port, script)
    tern = Tern(tmp_path, loop_config(free_port(), mx_port)).start()
    try:
        send(tern, "app@client.example", ["u@loop.example"])
        line = wait_log(tern, r"to=<u@loop\.example>, .*dsn=(\S+), status=(\w+) \((.*)\)")
        assert line.group(1) == "5.4.6" and line.group(2) == "bounced", line.group(0)
        assert "loops back to myself" in line.group(3)
    finally:
        tern.stop()
        server.stop()
