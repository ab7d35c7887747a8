"""Lanes: connection limits per destination, connection reuse, isolation from a dead or hanging
destination."""
import smtplib
import time

from peers import Blackhole, delivery, send, wait_empty, wait_log


def send_many(tern, count, recipient, sessions=1):
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        for i in range(count):
            s.sendmail("app@client.example", [recipient.format(i=i)], f"Subject: n{i}\r\n\r\nbody {i}\r\n".encode())


def test_lane_never_exceeds_max_connections_and_reuses_them(make_tern, dns, mx_port, sinks):
    dns.add("busy.example", ("A", "127.0.0.11"))
    receiver = sinks("127.0.0.11", data_delay=0.3)
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane: { max_connections: 3, initial_connections: 3, messages_per_connection: 4 }"))
    send_many(tern, 24, "u{i}@busy.example")
    receiver.wait(24, timeout=30)
    assert receiver.max_connections <= 3, f"saw {receiver.max_connections} simultaneous connections"
    assert receiver.max_connections >= 2, "the lane does use parallel connections"
    # 24 messages, at most 4 per connection: at least 6 connections, and far fewer than 24.
    assert 6 <= receiver.total_connections < 24, receiver.total_connections
    wait_empty(tern)


def test_route_lane_limit_overrides_default(make_tern, dns, mx_port, sinks):
    dns.add("one.example", ("A", "127.0.0.12"))
    receiver = sinks("127.0.0.12", data_delay=0.2)
    routes = "routes:\n  - { name: one-at-a-time, domains: [one.example], transport: mx, lane: { max_connections: 1 } }\n"
    tern = make_tern(delivery=delivery(dns, mx_port), extra=routes)
    send_many(tern, 8, "u{i}@one.example")
    receiver.wait(8, timeout=30)
    assert receiver.max_connections == 1


def test_hanging_destination_does_not_delay_a_live_one(make_tern, dns, mx_port, sinks):
    dns.add("hang.example", ("A", "127.0.0.13"))
    dns.add("live.example", ("A", "127.0.0.14"))
    hole = Blackhole("127.0.0.13", mx_port)
    live = sinks("127.0.0.14")
    try:
        tern = make_tern(delivery=delivery(dns, mx_port, ", command_timeout: 30s"))
        # Mail for the hanging destination first, enough to fill its window.
        send_many(tern, 10, "u{i}@hang.example")
        start = time.time()
        send_many(tern, 5, "v{i}@live.example")
        live.wait(5, timeout=10)
        assert time.time() - start < 5, "the live destination waited for the hanging one"
        assert len(hole.held) <= 5, "the hanging lane opened no more than its window"
    finally:
        hole.stop()


def test_dead_destination_is_parked_not_hammered(make_tern, dns, mx_port, sinks):
    import subprocess
    from conftest import BINARY
    dns.add("dead.example", ("A", "127.0.0.15"))  # nothing listens: connection refused
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane: { dead_time: 1h, initial_connections: 2 }"))
    send_many(tern, 20, "u{i}@dead.example")
    wait_log(tern, r"lane dead\.example: destination dead for 1h")
    time.sleep(3)
    attempts = tern.log().count("connect to dead.example[")
    assert attempts <= 4, f"{attempts} connection attempts to a dead destination"
    assert tern.log().count("status=deferred") >= 20
    assert "suspended after repeated failures" in tern.log()
    import json
    lanes = subprocess.run([BINARY, "lanes", "--json", "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True,
                           text=True, check=True).stdout
    [lane] = [l for l in json.loads(lanes) if l["lane"] == "dead.example"]
    assert lane["state"] == "dead" and "refused" in lane["reason"] and lane["until_ms"] > time.time() * 1000 + 3000_000
    # A flush wakes it: the operator's word beats the timer.
    sink = sinks("127.0.0.15")
    out = subprocess.run([BINARY, "queue", "flush", "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sink.wait(20, timeout=20)
    wait_log(tern, r"lane dead\.example: revived by tern queue flush")
    wait_empty(tern)
