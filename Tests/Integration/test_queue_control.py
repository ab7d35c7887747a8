"""Queue control while the daemon runs, each command checked against what the receiving
server then gets."""
import json
import subprocess
import time

import pytest

from conftest import BINARY
from peers import delivery, send, wait_log


def tern_cmd(tern, *args, check=True):
    out = subprocess.run([BINARY, *args, "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True, text=True, timeout=20)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
def deferred_world(make_tern, dns, mx_port, sinks):
    """Mail for a/b/c.example and from two senders, all deferred once (451), next try in an hour."""
    for d in ("a", "b", "c"):
        dns.add(f"{d}.example", ("A", "127.0.0.11"))
    receiver = sinks("127.0.0.11")
    for r in ("x@a.example", "y@a.example", "x@b.example", "x@c.example"):
        receiver.replies[r] = ["451 4.3.0 not now", "250 ok"]
    tern = make_tern(delivery=delivery(dns, mx_port).replace("retry_first: 1s, retry_maximum: 2s", "retry_first: 1h, retry_maximum: 2h"))
    send(tern, "app@client.example", ["x@a.example"], subject="for a")
    send(tern, "shop@client.example", ["y@a.example", "x@b.example"], subject="for a and b")
    send(tern, "app@client.example", ["x@c.example"], subject="for c")
    deadline = time.time() + 15
    while tern.log().count("status=deferred") < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert tern.log().count("status=deferred") == 4
    return tern, receiver


def test_list_and_show(deferred_world):
    tern, _ = deferred_world
    listed = tern.queue()
    assert len(listed) == 3
    r = listed[0]["recipients"][0]
    assert r["state"] == "deferred" and r["attempts"] == 1 and r["last_error"] == "smtp; 451 4.3.0 not now"
    assert r["next_attempt"].endswith("Z")
    table = tern_cmd(tern, "queue", "list").stdout
    assert "[deferred, 1 attempt, next " in table and "(smtp; 451 4.3.0 not now)" in table
    show = tern_cmd(tern, "queue", "show", listed[1]["id"]).stdout
    assert '"sender" : "shop@client.example"' in show and "Subject: for a and b" in show
    assert tern_cmd(tern, "queue", "show", "0000000000000000", check=False).returncode == 1


def test_flush_by_domain(deferred_world):
    tern, receiver = deferred_world
    assert "flushed: 2 messages" in tern_cmd(tern, "queue", "flush", "--domain", "a.example").stdout
    receiver.wait(2)
    time.sleep(1)
    assert sorted(receiver.recipients()) == ["x@a.example", "y@a.example"], "only a.example was attempted"
    left = {r["address"]: r["state"] for m in tern.queue() for r in m["recipients"]}
    assert left == {"y@a.example": "delivered", "x@b.example": "deferred", "x@c.example": "deferred"}


def test_hold_and_release(deferred_world):
    tern, receiver = deferred_world
    assert "held: 2 messages" in tern_cmd(tern, "queue", "hold", "--sender", "app@client.example").stdout
    assert sum(m["held"] for m in tern.queue()) == 2
    tern_cmd(tern, "queue", "flush")
    receiver.wait(2)
    time.sleep(1)
    assert sorted(receiver.recipients()) == ["x@b.example", "y@a.example"], "held mail is not delivered, even on flush"
    assert "released: 2 messages" in tern_cmd(tern, "queue", "release", "--all").stdout
    receiver.wait(4)  # one transaction per recipient domain: two before, two released
    assert sorted(receiver.recipients()) == ["x@a.example", "x@b.example", "x@c.example", "y@a.example"]


def test_delete_by_domain_id_and_all(deferred_world):
    tern, receiver = deferred_world
    assert "deleted: 1 message" in tern_cmd(tern, "queue", "delete", "--domain", "c.example").stdout
    assert all(r["address"] != "x@c.example" for m in tern.queue() for r in m["recipients"])
    first = tern.queue()[0]["id"]
    tern_cmd(tern, "queue", "delete", first)
    assert first not in [m["id"] for m in tern.queue()]
    wait_log(tern, first + r": removed")
    tern_cmd(tern, "queue", "flush")
    receiver.wait(2)
    time.sleep(1)
    assert sorted(receiver.recipients()) == ["x@b.example", "y@a.example"], "deleted mail never leaves"
    assert tern.queue() == []
    assert tern_cmd(tern, "queue", "delete", check=False).returncode != 0, "a delete must say what"


def test_without_daemon_delete_hold_release_work_on_the_files(make_tern):
    tern = make_tern()  # delivery paused: mail stays queued
    send(tern, "app@client.example", ["x@a.example", "y@b.example"], subject="two domains")
    send(tern, "shop@client.example", ["z@b.example"], subject="b only")
    tern.kill9()
    out = tern_cmd(tern, "queue", "flush", check=False)
    assert out.returncode == 75 and "tern serve" in out.stderr, "flush needs the daemon"
    assert "held: 1 message" in tern_cmd(tern, "queue", "hold", "--sender", "app@client.example").stdout
    assert "deleted: 2 messages" in tern_cmd(tern, "queue", "delete", "--domain", "b.example").stdout
    [left] = tern.queue()
    assert left["held"] and [(r["address"], r["state"]) for r in left["recipients"]] == [("x@a.example", "pending"), ("y@b.example", "deleted")]
    assert "released: 1 message" in tern_cmd(tern, "queue", "release", "--all").stdout
    assert not tern.queue()[0]["held"]
    tern.start()
    assert len(tern.queue()) == 1


def test_one_daemon_per_spool(make_tern):
    """A second `tern serve` on the same spool exits 75 naming the first one's PID and leaves
    its control socket alone; offline edits happen only when no daemon holds the spool."""
    tern = make_tern()
    from conftest import good_transaction
    good_transaction(tern.port("mx"))
    second = subprocess.run([BINARY, "serve", "--config", str(tern.config_path)], cwd=tern.dir, capture_output=True,
                            text=True, timeout=20)
    assert second.returncode == 75, second.stderr
    assert f"locked by process {tern.proc.pid}" in second.stderr, second.stderr
    # The first daemon still answers on its socket: hold goes through it.
    out = tern_cmd(tern, "queue", "hold", "--all")
    assert "1" in out.stdout
    assert tern.queue()[0]["held"] is True
    # With the daemon gone (kill -9: no clean-up at all), the lock is free for offline edits.
    tern.kill9()
    out = tern_cmd(tern, "queue", "release", "--all")
    assert tern.queue()[0]["held"] is False


def test_sender_domain_selector(deferred_world):
    """--sender @domain selects every sender of that domain, in any case."""
    tern, _ = deferred_world
    tern_cmd(tern, "queue", "hold", "--sender", "@other.example")
    assert [m["held"] for m in tern.queue()] == [False, False, False]
    tern_cmd(tern, "queue", "hold", "--sender", "@CLIENT.example")
    assert [m["held"] for m in tern.queue()] == [True, True, True]
    tern_cmd(tern, "queue", "delete", "--sender", "@client.example")
    assert tern.queue() == []


def test_reload_names_the_keys_that_need_a_restart(make_tern):
    """Regression: a changed listener port was ignored without a word on reload. Listeners
    are applied now (test_service.py); the hostname still takes a restart."""
    from peers import free_port
    tern = make_tern()
    port = free_port()
    text = tern.config_path.read_text()
    tern.config_path.write_text(text.replace('address: "127.0.0.1:0"', f'address: "127.0.0.1:{port}"')
                                .replace("hostname: relay.test", "hostname: relay2.test"))
    out = tern_cmd(tern, "reload")
    assert "reloaded" in out.stdout
    assert "applied only at a restart" in out.stdout and "hostname" in out.stdout, out.stdout
    assert "listeners" not in out.stdout and "sendmail" not in out.stdout, out.stdout
    wait_log(tern, rf"listening on 127\.0\.0\.1:{port} \(smtp, name=mx\)")
    assert "access" not in out.stdout
    assert "take effect only at a restart" in tern.log()
    tern.config_path.write_text(text)
    out = tern_cmd(tern, "reload")
    assert "restart" not in out.stdout, out.stdout
