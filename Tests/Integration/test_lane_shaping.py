"""Lane shaping: message rate, recipients per transaction, source address."""
import smtplib

from peers import delivery, wait_empty


def tern_cli(tern, *args, check=True):
    """`tern ARGS --config …` against the test's daemon; fails the test on a non-zero exit
    unless check is False."""
    import subprocess
    from conftest import BINARY
    out = subprocess.run([BINARY, *args, "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True, text=True,
                         timeout=20)
    assert not check or out.returncode == 0, out.stderr
    return out


def lane_state(tern, name):
    import json
    [lane] = [l for l in json.loads(tern_cli(tern, "lanes", "--json").stdout) if l["lane"] == name]
    return lane


def send_each(tern, count, recipient):
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        for i in range(count):
            s.sendmail("app@client.example", [recipient.format(i=i)], f"Subject: n{i}\r\n\r\nx\r\n".encode())


def test_rate_limit_holds_with_its_burst(make_tern, dns, mx_port, sinks):
    # Two domains of one provider, so the limit must hold across the lane's domains and its
    # connections (up to 20 by default), not per connection.
    dns.add("slow.example", ("MX", 10, "in.rated.example"))
    dns.add("slower.example", ("MX", 10, "in.rated.example"))
    dns.add("in.rated.example", ("A", "127.0.0.11"))
    receiver = sinks("127.0.0.11")
    providers = 'providers:\n  - { name: rated, mx: ["*.rated.example"], lane: { rate: "60/min", burst: 3 } }\n'
    tern = make_tern(delivery=delivery(dns, mx_port), extra=providers)
    send_each(tern, 4, "u{i}@slow.example")
    send_each(tern, 4, "u{i}@slower.example")
    times = sorted(m.time for m in receiver.wait(8, timeout=30))
    # In any stretch of t seconds at most t + 3 messages arrive (60/min, burst 3); half a
    # message of slack, as the receiver stamps arrivals after its own scheduling delay.
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= 1 * (times[j] - times[i]) + 3 + 0.5, (i, j, times[j] - times[i])
    assert times[-1] - times[0] >= (8 - 3) * 1 - 0.3, "the rate was really applied"
    assert receiver.max_connections > 1, "over several connections"


def test_max_recipients_splits_transactions(make_tern, dns, mx_port, sinks):
    dns.add("many.example", ("A", "127.0.0.12"))
    receiver = sinks("127.0.0.12")
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane: { max_recipients: 2 }"))
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        s.sendmail("app@client.example", [f"r{i}@many.example" for i in range(5)], b"Subject: five\r\n\r\nx\r\n")
    got = receiver.wait(3)
    assert sorted(len(m.rcpt_tos) for m in got) == [1, 2, 2]
    assert sorted(r for m in got for r in m.rcpt_tos) == [f"r{i}@many.example" for i in range(5)]
    wait_empty(tern)


def test_lane_leaves_from_its_source_address(make_tern, dns, mx_port, sinks):
    dns.add("egress.example", ("A", "127.0.0.13"))
    receiver = sinks("127.0.0.13")
    routes = ("routes:\n  - { name: egress, domains: [egress.example], transport: mx, "
              "lane: { source_address: 127.0.0.5 } }\n")
    tern = make_tern(delivery=delivery(dns, mx_port), extra=routes)
    send_each(tern, 1, "u@egress.example")
    [m] = receiver.wait(1)
    assert m.peer[0] == "127.0.0.5"
    # The source address is part of the lane; the destination alone names it for the operator.
    assert lane_state(tern, "egress.example/127.0.0.5")["domains"] == 1
    tern_cli(tern, "lanes", "suspend", "egress.example", "--for", "1h")
    assert lane_state(tern, "egress.example/127.0.0.5")["state"] == "suspended"


def test_lanes_table_suspend_and_resume(make_tern, dns, mx_port, sinks):
    import json
    import time
    from peers import send, wait_log

    def lanes(*args, check=True):
        return tern_cli(tern, "lanes", *args, check=check)

    dns.add("a.example", ("A", "127.0.0.14"))
    dns.add("b.example", ("A", "127.0.0.14"))
    receiver = sinks("127.0.0.14")
    tern = make_tern(delivery=delivery(dns, mx_port, ', lane: { rate: "100/s", burst: 5 }'))
    send(tern, "app@client.example", ["x@a.example"])
    receiver.wait(1)
    [a] = [l for l in json.loads(lanes("--json").stdout) if l["lane"] == "a.example"]
    assert a["domains"] == 1 and a["rate"] == "100/s" and a["last_reply"] == "250 2.0.0 accepted" and a.get("resting_until_ms") is None
    table = lanes().stdout
    assert table.splitlines()[0].split()[:3] == ["LANE", "DOMAINS", "QUEUED"] and "a.example" in table and "active" in table

    assert "suspended until" in lanes("suspend", "a.example", "--for", "2h").stdout
    send(tern, "app@client.example", ["y@a.example"])
    send(tern, "app@client.example", ["z@b.example"])
    receiver.wait(2)
    time.sleep(1)
    assert sorted(receiver.recipients()) == ["x@a.example", "z@b.example"], "a suspended lane holds its mail; others go on"
    assert "suspended until" in lanes().stdout
    [a] = [l for l in json.loads(lanes("--json").stdout) if l["lane"] == "a.example"]
    assert a["state"] == "suspended" and a["reason"] == "suspended by the operator" and a["until_ms"] > time.time() * 1000 + 3600_000
    assert "resumed" in lanes("resume", "a.example").stdout
    receiver.wait(3)
    wait_log(tern, r"lane a\.example: resumed by the operator")
    # Not a lane, a provider or a domain: refused. A domain with no mail yet is fine.
    assert lanes("suspend", "provider:nope", check=False).returncode == 1
    assert lanes("suspend", "nope", check=False).returncode == 1
    assert lanes("resume", "other.example", check=False).returncode == 1
    assert "suspended until" in lanes("suspend", "new.example", "--for", "1m").stdout


def test_domains_of_one_provider_share_its_lane(make_tern, dns, mx_port, sinks):
    # Two customer domains hosted by the same provider (their MX hosts match its pattern).
    dns.add("shop.example", ("MX", 10, "a.mx.bigmail.example"))
    dns.add("club.example", ("MX", 10, "b.mx.bigmail.example"))
    dns.add("a.mx.bigmail.example", ("A", "127.0.0.15"))
    dns.add("b.mx.bigmail.example", ("A", "127.0.0.15"))
    provider = sinks("127.0.0.15", data_delay=0.2)
    providers = ('providers:\n  - { name: bigmail, mx: ["*.mx.bigmail.example"], '
                 'lane: { max_connections: 2, initial_connections: 2 } }\n')
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane: { max_connections: 5, initial_connections: 5 }"), extra=providers)
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        for i in range(8):
            s.sendmail("app@client.example", [f"u{i}@shop.example"], b"Subject: s\r\n\r\nx\r\n")
            s.sendmail("app@client.example", [f"u{i}@club.example"], b"Subject: c\r\n\r\nx\r\n")
    provider.wait(16, timeout=30)
    assert provider.max_connections <= 2, f"the provider saw {provider.max_connections} connections at once"
    assert lane_state(tern, "provider:bigmail")["domains"] == 2


def test_reply_rules_suspend_bounce_and_reduce(make_tern, dns, mx_port, sinks):
    import time
    from peers import dsn_parts, send, wait_log
    dns.add("ts.example", ("A", "127.0.0.16"))
    dns.add("client.example", ("A", "127.0.0.17"))
    receiver = sinks("127.0.0.16")
    sender_side = sinks("127.0.0.17")
    receiver.replies["a@ts.example"] = ["421 4.7.0 [TS04] Messages from 127.0.0.1 temporarily deferred", "250 ok"]
    receiver.replies["full@ts.example"] = "452 4.2.2 Mailbox over quota for good"
    receiver.replies["slow@ts.example"] = ["451 4.7.28 Our system has detected an unusual rate", "250 ok"]
    rules = (', reply_rules: ['
             '{ text: "\\\\[TS04\\\\]", action: suspend, for: 3s }, '
             '{ code: 452, text: "for good", action: bounce }, '
             '{ enhanced: "4.7.28", action: reduce, for: 1h, factor: 0.5 } ], lane: { rate: "100/s", burst: 10 }')
    tern = make_tern(delivery=delivery(dns, mx_port, rules))
    start = time.time()
    send(tern, "app@client.example", ["a@ts.example"])
    wait_log(tern, r"lane ts\.example: suspended until [\d-]+ [\d:]+Z: reply rule matched: 421 4\.7\.0 \[TS04\]")
    send(tern, "app@client.example", ["b@ts.example"])
    time.sleep(1.5)
    assert receiver.recipients() == [], "the suspended lane sends nothing, not even new mail"
    receiver.wait(2, timeout=15)
    assert time.time() - start >= 3, "and resumes after the rule's time"
    wait_log(tern, r"lane ts\.example: suspension over, delivering again")
    # A reply that means "never": bounced at once instead of retried.
    send(tern, "app@client.example", ["full@ts.example"])
    [bounce] = sender_side.wait(1)
    _, [r], _ = dsn_parts(bounce)
    assert r["Final-Recipient"] == "rfc822; full@ts.example" and r["Status"] == "5.2.2"
    assert "bounced by a reply rule" in r["Diagnostic-Code"]
    # Gmail-style rate complaint: the lane slows down.
    send(tern, "app@client.example", ["slow@ts.example"])
    wait_log(tern, r"lane ts\.example: reduced to 10 connections, 50/s until [\d-]+ [\d:]+Z: reply rule matched: 451 4\.7\.28")
    state = lane_state(tern, "ts.example")
    assert state["state"] == "reduced" and state["max_connections"] == 10 and "4.7.28" in state["reason"]
    assert state["rate"] == "50/s" and state["configured_rate"] == "100/s"


def test_reload_changes_limits_keeps_mail_and_refuses_a_bad_config(make_tern, dns, mx_port, sinks):
    import signal
    from peers import wait_log
    dns.add("re.example", ("A", "127.0.0.18"))
    receiver = sinks("127.0.0.18", data_delay=0.3)
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane: { max_connections: 1, initial_connections: 1 }"))
    send_each(tern, 4, "a{i}@re.example")
    receiver.wait(2)
    assert receiver.max_connections == 1

    # A broken config on SIGHUP is refused; the daemon runs on with the old one.
    good = tern.config_path.read_text()
    tern.config_path.write_text(good + "delivery_typo: 1\n")
    tern.proc.send_signal(signal.SIGHUP)
    wait_log(tern, r"reload refused, the running configuration stays: .*delivery_typo: unknown key")
    assert tern.proc.poll() is None

    # A good one takes effect without a restart: more connections, nothing lost.
    tern.config_path.write_text(good.replace("max_connections: 1, initial_connections: 1", "max_connections: 3, initial_connections: 3"))
    tern.proc.send_signal(signal.SIGHUP)
    wait_log(tern, r"configuration reloaded: .* lanes updated")
    send_each(tern, 9, "b{i}@re.example")
    got = receiver.wait(13, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted([f"a{i}@re.example" for i in range(4)] + [f"b{i}@re.example" for i in range(9)])
    assert 1 < receiver.max_connections <= 3
    assert "reloaded" in tern_cli(tern, "reload").stdout


def test_rising_soft_failures_slow_the_lane_and_it_recovers(make_tern, dns, mx_port, sinks):
    from peers import wait_log
    dns.add("bo.example", ("A", "127.0.0.19"))
    receiver = sinks("127.0.0.19")
    for i in range(12):
        receiver.replies[f"s{i}@bo.example"] = ["451 4.7.1 too much mail from you, slow down", "250 ok"]
    tern = make_tern(delivery=delivery(dns, mx_port, ', lane: { max_connections: 8, rate: "100/s", burst: 10 }'))
    send_each(tern, 12, "s{i}@bo.example")
    wait_log(tern, r"lane bo\.example: backing off to level 1 \(4 connections, 50/s\): many soft failures, "
                   r"last: smtp; 451 4\.7\.1 too much mail")
    receiver.wait(12, timeout=30)
    wait_log(tern, r"lane bo\.example: recovering to level 0 \(8 connections, 100/s\) after successes", timeout=30)
    assert lane_state(tern, "bo.example")["state"] == "active"
    wait_empty(tern)


def test_connection_rate_spaces_new_connections(make_tern, dns, mx_port, sinks):
    import time
    dns.add("cr.example", ("A", "127.0.0.20"))
    receiver = sinks("127.0.0.20")
    # One message per connection, so every message needs a new one: 60/min lets one open a second.
    lane = ', lane: { connection_rate: "60/min", connection_burst: 2, messages_per_connection: 1 }'
    tern = make_tern(delivery=delivery(dns, mx_port, lane))
    start = time.time()  # the fixture's readiness probe connected before this
    send_each(tern, 6, "c{i}@cr.example")
    receiver.wait(6, timeout=30)
    opened = sorted(t for t in receiver.connection_times if t >= start)
    assert len(opened) == 6
    # In any stretch of t seconds at most t*1 + 2 connections open (the burst), with a little slack.
    for i in range(len(opened)):
        for j in range(i, len(opened)):
            assert j - i + 1 <= (opened[j] - opened[i]) + 2 + 0.3, (i, j, opened[j] - opened[i])
    assert opened[-1] - opened[0] >= 4 - 0.3, "six connections with a burst of two take four seconds"
    assert lane_state(tern, "cr.example")["connection_rate"] == "60/min"


def test_idle_lanes_are_forgotten_and_made_again(make_tern, dns, mx_port, sinks):
    import json
    import time
    dns.add("idle.example", ("A", "127.0.0.11"))
    receiver = sinks("127.0.0.11")
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane_idle_time: 2s"))
    send_each(tern, 1, "a@idle.example")
    receiver.wait(1)
    assert lane_state(tern, "idle.example")["domains"] == 1

    def lane_names():
        return [l["lane"] for l in json.loads(tern_cli(tern, "lanes", "--json").stdout)]

    deadline = time.time() + 15
    while "idle.example" in lane_names():
        assert time.time() < deadline, "a quiet lane is forgotten after lane_idle_time"
        time.sleep(0.5)
    send_each(tern, 1, "b@idle.example")
    receiver.wait(2)
    assert "idle.example" in lane_names()
    wait_empty(tern)


def test_reload_unpauses_delivery_and_takes_new_retry_times(make_tern, dns, mx_port, sinks):
    import time
    from peers import send, wait_log
    dns.add("later.example", ("A", "127.0.0.12"))
    receiver = sinks("127.0.0.12")
    receiver.replies["r@later.example"] = ["451 4.3.0 try later", "250 ok"]
    tern = make_tern(delivery=delivery(dns, mx_port, ", paused: true").replace("retry_first: 1s, retry_maximum: 2s", "retry_first: 1h, retry_maximum: 2h"))
    send(tern, "app@client.example", ["q@later.example"])
    time.sleep(1)
    assert receiver.recipients() == [], "paused: queued, not sent"
    # Unpause and shorten the retry schedule in one reload, as `postfix reload` would.
    tern.config_path.write_text(tern.config_path.read_text().replace(", paused: true", "")
                                .replace("retry_first: 1h, retry_maximum: 2h", "retry_first: 1s, retry_maximum: 1s"))
    tern_cli(tern, "reload")
    receiver.wait(1)
    send(tern, "app@client.example", ["r@later.example"])
    wait_log(tern, r"to=<r@later\.example>, .*status=deferred")
    receiver.wait(2, timeout=10)  # retried after 1s, not 1h
    wait_empty(tern)


def test_a_provider_suspended_before_its_first_message(make_tern, dns, mx_port, sinks):
    import time
    from peers import send
    dns.add("shop.example", ("MX", 10, "a.mx.bigmail.example"))
    dns.add("a.mx.bigmail.example", ("A", "127.0.0.15"))
    receiver = sinks("127.0.0.15")
    providers = 'providers:\n  - { name: bigmail, mx: ["*.mx.bigmail.example"] }\n'
    tern = make_tern(delivery=delivery(dns, mx_port), extra=providers)

    def lanes(*args):
        return tern_cli(tern, "lanes", *args).stdout

    # The provider's name alone will do, and no mail has been seen for it yet.
    assert "suspended until" in lanes("suspend", "bigmail", "--for", "1h")
    assert lane_state(tern, "provider:bigmail")["state"] == "suspended"
    send(tern, "app@client.example", ["u@shop.example"])
    deadline = time.time() + 10
    while lane_state(tern, "provider:bigmail")["queued"] != 1:
        assert time.time() < deadline, "the message waits in the suspended lane"
        time.sleep(0.2)
    assert receiver.recipients() == []
    lanes("resume", "bigmail")
    receiver.wait(1)  # its held mail goes at once, with no flush
    wait_empty(tern)


def test_a_suspension_outlives_a_restart_and_a_flush(make_tern, dns, mx_port, sinks):
    import time
    from peers import send, wait_log
    dns.add("shop.example", ("MX", 10, "a.mx.bigmail.example"))
    dns.add("a.mx.bigmail.example", ("A", "127.0.0.16"))
    dns.add("plain.example", ("A", "127.0.0.16"))
    receiver = sinks("127.0.0.16")
    providers = 'providers:\n  - { name: bigmail, mx: ["*.mx.bigmail.example"] }\n'
    tern = make_tern(delivery=delivery(dns, mx_port), extra=providers)

    def run(*args):
        return tern_cli(tern, *args).stdout

    run("lanes", "suspend", "bigmail", "--for", "2h")
    run("lanes", "suspend", "plain.example", "--for", "2h")
    tern.stop()
    tern.start()
    wait_log(tern, r"lane provider:bigmail: suspended until .* from before the restart: suspended by the operator")
    assert lane_state(tern, "provider:bigmail")["state"] == "suspended", "shown before its next mail"
    assert lane_state(tern, "plain.example")["state"] == "suspended"
    send(tern, "app@client.example", ["u@shop.example", "v@plain.example"])
    time.sleep(1)
    run("queue", "flush")  # a flush revives dead lanes, not suspended ones
    time.sleep(1.5)
    assert receiver.recipients() == [], "both suspensions held across the restart and the flush"
    assert lane_state(tern, "plain.example")["state"] == "suspended"
    run("lanes", "resume", "bigmail")
    run("lanes", "resume", "plain.example")
    receiver.wait(2)
    tern.stop()
    tern.start()
    assert "from before the restart" not in tern.log()[tern.log().rfind("tern starting"):], "resumed lanes stay resumed"
    wait_empty(tern)


def test_a_slow_rate_opens_no_connection_it_cannot_feed(make_tern, dns, mx_port, sinks):
    # 30/min: one message every two seconds. A lane of 5 connections would otherwise open
    # 5 at once and hold 4 of them idle, waiting for their turn, until the server gives up.
    import time
    dns.add("trickle.example", ("A", "127.0.0.17"))
    receiver = sinks("127.0.0.17")
    tern = make_tern(delivery=delivery(dns, mx_port, ', lane: { rate: "30/min", burst: 1, max_connections: 5, initial_connections: 5 }'))
    start = time.time()
    send_each(tern, 4, "t{i}@trickle.example")
    times = sorted(m.time for m in receiver.wait(4, timeout=20))
    assert times[-1] - times[0] >= 3 * 2 - 0.3, "the rate held"
    assert receiver.max_connections == 1, f"{receiver.max_connections} connections open at once for one message per 2 s"
    assert len([t for t in receiver.connection_times if t >= start]) == 1, "one connection carried them all"
    wait_empty(tern)


def test_mail_held_by_a_suspension_goes_when_it_ends_not_at_its_retry_time(make_tern, dns, mx_port, sinks):
    import time
    from peers import send, wait_log
    dns.add("ts.example", ("A", "127.0.0.18"))
    receiver = sinks("127.0.0.18")
    receiver.replies["a@ts.example"] = "421 4.7.0 [TS04] Messages from 127.0.0.1 temporarily deferred"
    rules = ', reply_rules: [ { text: "\\\\[TS04\\\\]", action: suspend, for: 3s } ]'
    d = delivery(dns, mx_port, rules).replace("retry_first: 1s, retry_maximum: 2s", "retry_first: 1h, retry_maximum: 2h")
    tern = make_tern(delivery=d)
    send(tern, "app@client.example", ["a@ts.example"])
    wait_log(tern, r"lane ts\.example: suspended until")
    start = time.time()
    send(tern, "app@client.example", ["b@ts.example"])
    time.sleep(1)
    assert receiver.recipients() == [], "held while the lane is suspended"
    [m] = receiver.wait(1, timeout=10)
    assert m.rcpt_tos == ["b@ts.example"] and time.time() - start < 6, "sent when the suspension ended, not in an hour"
    assert "to=<b@ts.example>, relay=none" not in tern.log(), "held, not deferred: nothing written for it meanwhile"
    [queued] = tern.queue()
    [a] = queued["recipients"]
    assert a["state"] == "deferred" and a["attempts"] == 1 and "TS04" in a["last_error"]


def test_lanes_watch_refreshes_through_a_pipe(make_tern, dns, mx_port, sinks):
    import subprocess
    from conftest import BINARY
    from peers import send
    dns.add("w.example", ("A", "127.0.0.19"))
    receiver = sinks("127.0.0.19")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["x@w.example"])
    receiver.wait(1)
    proc = subprocess.Popen([BINARY, "lanes", "--watch", "--config", str(tern.config_path)], cwd=tern.dir,
                            stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        while len(seen) < 2:
            line = proc.stdout.readline()
            assert line, "the watch ended"
            if "w.example" in line:
                seen.append(line)
        assert all("active" in l for l in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_mail_deleted_or_held_while_it_waits_in_a_lane_is_not_sent(make_tern, dns, mx_port, sinks):
    import time
    from peers import send
    dns.add("wait.example", ("A", "127.0.0.20"))
    receiver = sinks("127.0.0.20")
    tern = make_tern(delivery=delivery(dns, mx_port))

    def run(*args):
        return tern_cli(tern, *args).stdout

    run("lanes", "suspend", "wait.example", "--for", "1h")
    send(tern, "app@client.example", ["gone@wait.example"])
    send(tern, "keep@client.example", ["kept@wait.example"])
    send(tern, "hold@client.example", ["held@wait.example"])
    deadline = time.time() + 10
    while lane_state(tern, "wait.example")["queued"] != 3:
        assert time.time() < deadline
        time.sleep(0.2)
    [gone] = [m["id"] for m in tern.queue() if m["recipients"][0]["address"] == "gone@wait.example"]
    run("queue", "delete", gone)
    run("queue", "hold", "--sender", "hold@client.example")
    assert lane_state(tern, "wait.example")["queued"] == 1, "taken back from the lane"
    run("lanes", "resume", "wait.example")
    receiver.wait(1)
    time.sleep(1)
    assert receiver.recipients() == ["kept@wait.example"], "neither the deleted nor the held message went"
    assert len(tern.queue()) == 1, "the held one stays queued"


def test_a_smarthost_lane_suspended_before_its_first_message(make_tern, sinks):
    import time
    from peers import send
    upstream = sinks("127.0.0.11")
    routes = ("routes:\n  - { name: up, domains: [\"*\"], transport: smarthost, "
              f"smarthost: {{ host: 127.0.0.11, port: {upstream.port}, tls: none }} }}\n")
    tern = make_tern(delivery="{ retry_first: 1s }", extra=routes)
    key = f"127.0.0.11:{upstream.port}"
    tern_cli(tern, "lanes", "suspend", key, "--for", "1h")
    send(tern, "app@client.example", ["a@anywhere.example"])
    time.sleep(1)
    state = lane_state(tern, key)
    assert state["state"] == "suspended" and state["queued"] == 1 and state["connections"] == 0
    assert upstream.recipients() == []
    tern_cli(tern, "lanes", "resume", key)
    upstream.wait(1)
    wait_empty(tern)


def test_a_rate_slower_than_the_idle_time_still_delivers(make_tern, dns, mx_port, sinks):
    """Regression: with one message per 6 s (slower than a connection may idle, 2 s) and no
    burst, each new connection was closed before its first message, because the lane looked
    at the token for the message after it; nothing was ever sent."""
    import time
    dns.add("slow-rate.example", ("A", "127.0.0.19"))
    receiver = sinks("127.0.0.19")
    tern = make_tern(delivery=delivery(dns, mx_port, ', lane: { rate: "10/min", burst: 1 }'))
    start = time.time()
    send_each(tern, 2, "s{i}@slow-rate.example")
    first, second = sorted(m.time for m in receiver.wait(2, timeout=20))
    assert first - start < 3, "the first message goes at once"
    assert second - first >= 6 - 0.3, "the second waits for its token"
    wait_empty(tern)
