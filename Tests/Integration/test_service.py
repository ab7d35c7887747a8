"""Tern as a system service: started as root with `user:` set it binds a port below 1024,
gives its spool to that user and drops to it for good; `tern status` tells whether it runs;
the systemd unit in config/ passes `systemd-analyze verify` and its ExecStart line runs."""
import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BINARY, Tern

ROOT = Path(__file__).resolve().parents[2]


def free_privileged_port():
    for port in range(1000, 900, -1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    pytest.skip("no free port below 1024")


@pytest.fixture
def home():
    d = Path(tempfile.mkdtemp(prefix="tern-service-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def status_of(proc_status, key):
    return re.search(rf"^{key}:\s*(.*)$", proc_status, re.M).group(1).split()


def test_drops_to_the_configured_user_after_binding_a_privileged_port(home):
    if os.geteuid() != 0:
        pytest.skip("the drop is from root")
    nobody = pwd.getpwnam("nobody")
    port = free_privileged_port()
    # A spool root left behind, with a file in it: it must become the user's.
    (home / "var/spool/queue").mkdir(parents=True)
    (home / "var/spool/notes-left-by-root").write_text("x")
    config = "\n".join([
        "hostname: relay.test",
        "spool: var/spool",
        "user: nobody",
        "listeners:",
        f'  - {{ name: mx, kind: smtp, address: "127.0.0.1:{port}" }}',
        "access:",
        '  mynetworks: ["127.0.0.0/8"]',
        "delivery: { paused: true }",
    ]) + "\n"
    tern = Tern(home, config).start()
    try:
        from peers import wait_log
        wait_log(tern, r"running as nobody")
        # Every thread, not only the main one, has dropped.
        for task in Path(f"/proc/{tern.proc.pid}/task").iterdir():
            uids = status_of((task / "status").read_text(), "Uid")
            assert uids == [str(nobody.pw_uid)] * 4, (task, uids)
        status = Path(f"/proc/{tern.proc.pid}/status").read_text()
        assert status_of(status, "Uid") == [str(nobody.pw_uid)] * 4, status
        assert status_of(status, "Gid") == [str(nobody.pw_gid)] * 4, status
        assert status_of(status, "Groups") in ([], [str(nobody.pw_gid)]), status
        assert status_of(status, "CapEff") == ["0000000000000000"], status
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("cron@app.example", ["ops@example.org"], b"Subject: after the drop\r\n\r\nhi\r\n")
        [queued] = tern.queue()
        assert tern.message_path(queued["id"]).stat().st_uid == nobody.pw_uid
        assert (home / "var/spool/notes-left-by-root").stat().st_uid == nobody.pw_uid
        out = tern.run("status")
        assert f"running, pid {tern.proc.pid}" in out.stdout and "1 message" in out.stdout, out.stdout
    finally:
        tern.stop()
    out = tern.run("status", check=False)
    assert out.returncode == 3 and "not running" in out.stdout, out.stdout


def test_an_unknown_user_is_a_config_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root drops")
    path = tmp_path / "tern.yaml"
    path.write_text('user: no-such-user-here\nlisteners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:0" }\n')
    out = subprocess.run([BINARY, "serve", "--config", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=20)
    assert out.returncode == 78 and "no such user 'no-such-user-here'" in out.stderr, out.stderr


def test_a_port_in_use_is_named(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        path = tmp_path / "tern.yaml"
        path.write_text(f'listeners:\n  - {{ name: mx, kind: smtp, address: "127.0.0.1:{port}" }}\ndelivery: {{ paused: true }}\n')
        out = subprocess.run([BINARY, "serve", "--config", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=20)
        assert out.returncode == 71
        assert f"cannot listen on 127.0.0.1:{port} (listeners: mx): address already in use" in out.stderr, out.stderr
    finally:
        s.close()


def test_a_second_tern_on_a_port_tern_holds_is_refused(make_tern, tmp_path):
    """Tern listens with one socket per event loop in a SO_REUSEPORT group; a second
    instance (same user, its own spool) must not join that group and share the port."""
    tern = make_tern()
    port = tern.port("mx")
    other = tmp_path / "other"
    other.mkdir()
    path = other / "tern.yaml"
    path.write_text(f'spool: spool\nlisteners:\n  - {{ name: mx, kind: smtp, address: "127.0.0.1:{port}" }}\n'
                    'delivery: { paused: true }\n')
    out = subprocess.run([BINARY, "serve", "--config", str(path)], capture_output=True, text=True, cwd=other, timeout=20)
    assert out.returncode == 71
    assert f"cannot listen on 127.0.0.1:{port} (listeners: mx): address already in use" in out.stderr, out.stderr
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@client.test", ["u@example.org"], b"Subject: x\r\n\r\nbody\r\n")
    assert len(tern.queue()) == 1


def test_config_path_from_the_environment_and_version(tmp_path):
    path = tmp_path / "elsewhere.yaml"
    path.write_text('listeners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:2525" }\n')
    out = subprocess.run([BINARY, "check"], capture_output=True, text=True, cwd=tmp_path, timeout=20,
                         env={**os.environ, "TERN_CONFIG": str(path)})
    assert out.returncode == 0, out.stderr
    assert "127.0.0.1:2525" in out.stdout
    version = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=20)
    assert re.fullmatch(r"tern \d+\.\d+\.\d+\n", version.stdout), version.stdout


def unit_with_binary(tmp_path):
    text = (ROOT / "config/tern.service").read_text().replace("/usr/local/bin/tern", BINARY)
    unit = tmp_path / "tern.service"
    unit.write_text(text)
    return unit, text


def test_the_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit, _ = unit_with_binary(tmp_path)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_units_exec_lines_run(tmp_path):
    """ExecStartPre, ExecStart and ExecReload as the unit writes them, with its environment."""
    _, text = unit_with_binary(tmp_path)
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", text, re.M))
    config = tmp_path / "tern.yaml"
    config.write_text('hostname: relay.test\nspool: var/spool\nlisteners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:0" }\n'
                      "delivery: { paused: true }\n")
    env["TERN_CONFIG"] = str(config)  # the unit's /etc/tern/tern.yaml, here
    # systemd's notification socket, as a Type=notify unit gets it.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(15)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    full_env = {**os.environ, **env}
    assert re.search(r"^Type=notify$", text, re.M)
    line = lambda key: re.search(rf"^{key}=(.*)$", text, re.M).group(1).split()
    assert subprocess.run(line("ExecStartPre"), env=full_env, cwd=tmp_path, capture_output=True, timeout=20).returncode == 0
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen(line("ExecStart"), env=full_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert notify.recv(4096).decode().startswith("READY=1")
        assert "listening on" in (tmp_path / "log").read_text()  # ready means accepting
        reload = subprocess.run(line("ExecReload"), env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=20)
        assert reload.returncode == 0, reload.stderr
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", notify.recv(4096).decode())
        assert notify.recv(4096).decode() == "READY=1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert notify.recv(4096).decode() == "STOPPING=1"
    notify.close()
    assert proc.returncode == 0


def listeners_config(*listeners, extra=""):
    lines = ["hostname: relay.test", "spool: var/spool", "listeners:"]
    lines += [f'  - {{ name: {n}, kind: smtp, address: "{a}" }}' for n, a in listeners]
    return "\n".join(lines + ["access:", '  mynetworks: ["127.0.0.0/8"]', "delivery: { paused: true }", extra]) + "\n"


def test_reload_opens_and_closes_listeners(tmp_path):
    from conftest import RawClient
    from peers import wait_log
    tern = Tern(tmp_path, listeners_config(("a", "127.0.0.1:0"), ("b", "127.0.0.1:0"))).start()
    try:
        port_a, port_b = tern.port("a"), tern.port("b")
        # A transaction under way on b when b goes away.
        client = RawClient(port_b)
        assert client.greeting[0] == 220
        assert client.cmd("EHLO app")[0] == 250
        assert client.cmd("MAIL FROM:<app@relay.test>")[0] == 250
        tern.config_path.write_text(listeners_config(("a", "127.0.0.1:0"), ("c", "127.0.0.1:0")))
        out = tern.run("reload")
        assert "applied only at a restart" not in out.stdout and "not applied" not in out.stdout, out.stdout
        port_c = int(wait_log(tern, r"listening on 127\.0\.0\.1:(\d+) \(smtp, name=c\)").group(1))
        wait_log(tern, r"no longer listening on 127\.0\.0\.1:0 \(name=b\)")
        # b takes no new connection; its open session finishes its message.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port_b), timeout=5)
        assert client.cmd("RCPT TO:<u@example.org>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        assert client.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
        client.close()
        for port in (port_a, port_c):  # a stays, c is new
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("app@relay.test", ["u@example.org"], b"Subject: y\r\n\r\nx\r\n")
        assert len(tern.queue()) == 3
    finally:
        tern.stop()


def test_reload_says_what_it_could_not_open(home):
    """A port below 1024 after the drop to `user:` cannot be bound: reload says so, and the
    running listeners stay."""
    if os.geteuid() != 0:
        pytest.skip("the drop is from root")
    low = free_privileged_port()
    (home / "tern.yaml").write_text(listeners_config(("mx", "127.0.0.1:0"), extra="user: nobody"))
    tern = Tern(home, (home / "tern.yaml").read_text()).start()
    try:
        tern.config_path.write_text(listeners_config(("mx", "127.0.0.1:0"), ("low", f"127.0.0.1:{low}"), extra="user: nobody"))
        out = subprocess.run([BINARY, "reload", "--config", str(tern.config_path)], capture_output=True, text=True, cwd=home,
                             timeout=20)
        assert out.returncode == 0, out.stderr
        assert (f"not applied: cannot listen on 127.0.0.1:{low} (listeners: low): permission denied "
                "(a port below 1024 takes a restart once root is dropped)") in out.stdout, out.stdout
        assert "listeners" in out.stdout.split("restart (the running values stay):")[-1]
        with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
            assert s.noop()[0] == 250
    finally:
        tern.stop()


def thread_policies(pid):
    """(name, scheduling policy) of each thread of the process: 0 SCHED_OTHER, 3 SCHED_BATCH."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            # The policy is field 41; the name in field 2 may hold spaces, so count from its end.
            policy = int((task / "stat").read_text().rsplit(")", 1)[1].split()[38])
        except (FileNotFoundError, ProcessLookupError):
            continue
        threads.append((name, policy))
    return threads


def test_the_disk_and_dns_threads_yield_their_wakeups_to_the_event_loops(make_tern):
    """The spool's 16 threads and the resolver's 8 run as SCHED_BATCH, so that a returning
    fdatasync does not preempt the event loop on its core; the event loops keep the default."""
    tern = make_tern()
    good = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10)
    good.sendmail("a@client.test", ["u@example.org"], b"Subject: x\r\n\r\nbody\r\n")
    good.quit()
    threads = thread_policies(tern.proc.pid)
    batch = [name for name, policy in threads if policy == 3]
    assert len(batch) == 24, threads
    loops = [(name, policy) for name, policy in threads if name.startswith("NIO-")]
    assert loops and all(policy == 0 for _, policy in loops), threads


def event_loop_writes(pid):
    """Write system calls made so far by the event loops' threads (`syscw` of /proc/PID/task/*/io)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith("NIO-"):
                continue
            io = dict(line.split(": ") for line in (task / "io").read_text().splitlines())
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(io["syscw"])
    return total


def test_a_new_connection_is_served_by_the_loop_that_accepted_it(make_tern):
    """Each event loop accepts for itself, so a connection is greeted without a hand-over
    between loops: a banner and a QUIT cost the loops their two replies and the two log
    lines (connect, disconnect), and no wake-up of another loop (each an eventfd write)."""
    tern = make_tern()
    port = tern.port("mx")

    def greet_and_quit():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"221 ")
            assert f.readline() == b""  # closed by the server: its work for this one is done

    greet_and_quit()
    before = event_loop_writes(tern.proc.pid)
    count = 40
    for _ in range(count):
        greet_and_quit()
    per_connection = (event_loop_writes(tern.proc.pid) - before) / count
    assert per_connection <= 4.5, per_connection
