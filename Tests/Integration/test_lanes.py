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


def test_a_full_lane_waits_in_the_queue_and_leaves_room_for_others(make_tern, dns, mx_port, sinks):
    import json
    import subprocess
    from conftest import BINARY
    dns.add("hang.example", ("A", "127.0.0.13"))
    dns.add("live.example", ("A", "127.0.0.14"))
    hole = Blackhole("127.0.0.13", mx_port)
    live = sinks("127.0.0.14", data_delay=0.05)
    try:
        # The hanging lane may hold 3 transactions, all lanes 6: the rest of its mail waits in
        # the queue, and the live lane still gets room.
        tern = make_tern(delivery=delivery(dns, mx_port, ", command_timeout: 30s, active_limit: 6, lane: { max_queued: 3 }"))
        send_many(tern, 12, "u{i}@hang.example")
        send_many(tern, 20, "v{i}@live.example")
        live.wait(20, timeout=20)
        out = subprocess.run([BINARY, "lanes", "--json", "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True,
                             text=True, check=True).stdout
        [hang] = [l for l in json.loads(out) if l["lane"] == "hang.example"]
        assert hang["queued"] + hang["in_flight"] <= 3 and hang["backlog"] == 12 - 3, hang
        table = subprocess.run([BINARY, "lanes", "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True,
                               text=True, check=True).stdout
        assert any(line.startswith("hang.example") and "+9" in line for line in table.splitlines()), table
        assert len(hole.held) <= 3
    finally:
        hole.stop()


def test_tiny_active_queue_drains_everything_in_order(make_tern, dns, mx_port, sinks):
    for d in ("x", "y", "z"):
        dns.add(f"{d}.example", ("A", "127.0.0.15"))
    receiver = sinks("127.0.0.15")
    tern = make_tern(delivery=delivery(dns, mx_port, ", active_limit: 2, lane: { max_queued: 1 }"))
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        for i in range(10):
            # One message to all three domains, one to each: both backlogs fill and drain.
            s.sendmail("app@client.example", [f"a{i}@x.example", f"a{i}@y.example", f"a{i}@z.example"], b"Subject: all\r\n\r\nx\r\n")
            for d in ("x", "y", "z"):
                s.sendmail("app@client.example", [f"b{i}@{d}.example"], b"Subject: one\r\n\r\nx\r\n")
    got = receiver.wait(60, timeout=30)  # 10 x 3 transactions for the first kind, 30 for the second
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(
        [f"{p}{i}@{d}.example" for p in "ab" for i in range(10) for d in "xyz"])
    # Each domain's mail arrives in the order it was queued.
    for d in "xyz":
        order = [r for m in got for r in m.rcpt_tos if r.endswith(f"@{d}.example")]
        assert order == [f"{p}{i}@{d}.example" for i in range(10) for p in "ab"], order
    wait_empty(tern)
