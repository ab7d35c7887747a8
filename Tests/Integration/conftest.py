"""Integration harness: runs the real `tern` binary on loopback ports chosen by the kernel.

Each Tern instance gets its own directory with a config, a spool and a log. Listeners bind
port 0; the harness reads the real ports from the `listening on …` log lines. Processes are
ended by their PID only.
"""
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import smtplib

BINARY = os.environ.get("TERN_BINARY", str(Path(__file__).resolve().parents[2] / ".build/debug/tern"))


class Tern:
    def __init__(self, directory: Path, config: str, user=None, binary=BINARY):
        self.dir = directory
        # (uid, gid) to run the daemon and the queue commands as; None: as the test runs.
        self.user = user
        self.binary = binary
        self.config_path = directory / "tern.yaml"
        self.config_path.write_text(config)
        self.log_path = directory / "tern.log"
        self.proc = None
        self.ports = {}

    def start(self, timeout=15):
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--config", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            **self.credentials()
        )
        names = re.findall(r"\{ name: (\S+), kind:", self.config_path.read_text())
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.log_path.read_bytes()[self.log_offset:].decode(errors="replace")
            found = dict((n, int(p)) for p, n in re.findall(r"listening on \S+:(\d+) \(\w+, name=(\S+)\)", text))
            if all(n in found for n in names):
                self.ports = found
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"tern exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError("tern did not start:\n" + self.log())

    def credentials(self):
        """Popen's arguments that run a command as this instance's user."""
        if self.user is None:
            return {}
        uid, gid = self.user
        return {"user": uid, "group": gid, "extra_groups": []}

    def run(self, *args, check=True, timeout=20):
        """A `tern` command against this instance's config, as its user."""
        out = subprocess.run([self.binary, *args, "--config", str(self.config_path)], cwd=self.dir, capture_output=True,
                             text=True, timeout=timeout, **self.credentials())
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def port(self, name):
        return self.ports[name]

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode if self.proc else None

    def kill9(self):
        return self.stop(signal.SIGKILL)

    def queue(self):
        return json.loads(self.run("queue", "list", "--json").stdout)

    def spool_files(self, state="queue"):
        """The files in a spool directory that hold anything: in queue/, a free slot is
        empty or all zeros, not a message."""
        d = self.dir / "var/spool" / state
        return sorted(f for f in d.iterdir() if holds_anything(f)) if d.exists() else []

    def message_path(self, queue_id):
        """The slot in queue/ whose trailer names the queue id."""
        for f in (self.dir / "var/spool/queue").iterdir():
            data = f.read_bytes()[-81:]
            if data.startswith(b"TERN-SPOOL-3 ") and data.split()[1].decode() == queue_id:
                return f
        raise KeyError(queue_id)

    def message_bytes(self, queue_id):
        """The message content of a queued message (without the envelope records)."""
        data = self.message_path(queue_id).read_bytes()
        trailer = data[-81:].decode()
        return data[: int(trailer.split()[2], 16)]


def holds_anything(path):
    """A spool slot with any byte but zero in it: a free slot is empty or zeros."""
    return any(path.read_bytes())


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA and a server certificate for 'localhost' / 127.0.0.1, minted for this run."""
    d = tmp_path_factory.mktemp("certs")
    def run(*args):
        subprocess.run(args, cwd=d, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=Tern Test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    os.chmod(d / "server.key", 0o600)  # tern refuses a TLS key that others can read
    return d


@pytest.fixture(scope="session")
def users_file(tmp_path_factory):
    """alice/wonderland (SHA-512 crypt) and bob/builder (yescrypt where openssl lacks it: SHA-256 crypt)."""
    d = tmp_path_factory.mktemp("users")
    alice = subprocess.run(["openssl", "passwd", "-6", "wonderland"], capture_output=True, text=True, check=True).stdout.strip()
    bob = subprocess.run(["openssl", "passwd", "-5", "builder"], capture_output=True, text=True, check=True).stdout.strip()
    path = d / "users"
    path.write_text(f"# test users\nalice:{alice}\nbob:{bob}\n")
    os.chmod(path, 0o600)  # tern refuses a users file that others can read
    return path


def tls_client_context(certs):
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    return ctx


@pytest.fixture
def make_tern(tmp_path):
    started = []

    def make(listeners=None, extra="", mynetworks=("127.0.0.0/8", "::1/128"), tls=None, users=None, limits="", access_extra="",
             delivery="{ paused: true }"):
        listeners = listeners or [("mx", "smtp")]
        lines = ["hostname: relay.test", "spool: var/spool", "listeners:"]
        for name, kind in listeners:
            lines.append(f'  - {{ name: {name}, kind: {kind}, address: "127.0.0.1:0" }}')
        if tls:
            lines.append(f"tls: {{ certificate: {tls / 'server.crt'}, key: {tls / 'server.key'} }}")
        lines.append("access:")
        lines.append("  mynetworks: [" + ", ".join(f'"{n}"' for n in mynetworks) + "]")
        if users:
            lines.append(f"  users_file: {users}")
        if access_extra:
            lines.append(access_extra)
        if limits:
            lines.append("limits: " + limits)
        # Tests of the ingress keep their mail queued; delivery tests pass their own settings.
        lines.append("delivery: " + delivery)
        lines.append(extra)
        t = Tern(tmp_path, "\n".join(lines) + "\n")
        started.append(t)  # before start: a Tern that fails to start is still stopped
        t.start()
        return t

    yield make
    for t in started:
        t.kill9()


class RawClient:
    """A line-level SMTP client for what smtplib refuses to send."""

    def __init__(self, port, host="127.0.0.1", source=None, timeout=10, rcvbuf=None):
        """`rcvbuf`: the receive buffer, set before the handshake so the window is that small
        from the first byte (a client that reads slowly or not at all)."""
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def reply(self):
        """One whole reply: (code, text of all lines)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed; got " + repr(lines))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode(errors="replace"))
            if len(line) < 4 or line[3:4] == b" ":
                return int(lines[0][:3]), "\n".join(l[4:] for l in lines)

    def cmd(self, line: str):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self, timeout=5):
        """True when the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def good_transaction(port, source=None, subject="ok"):
    """A complete, well-formed transaction over a new connection; returns the queue id."""
    c = RawClient(port, source=source)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<app@client.test>")[0] == 250
    assert c.cmd("RCPT TO:<user@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
    code, text = c.reply()
    assert code == 250, text
    c.cmd("QUIT")
    c.close()
    return text.split("queued as ")[1]


def open_transaction(port, source="127.0.0.1", recipient="u@example.org"):
    """A new connection with EHLO, MAIL and RCPT accepted, ready for DATA or BDAT."""
    c = RawClient(port, source=source)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{recipient}>")[0] == 250
    return c


def authenticated_outsider(tern, certs, listener="mx"):
    """smtplib from 127.0.0.2 (outside a 127.0.0.1/32 mynetworks), after STARTTLS and AUTH."""
    s = smtplib.SMTP("127.0.0.1", tern.port(listener), source_address=("127.0.0.2", 0), timeout=10)
    s.starttls(context=tls_client_context(certs))
    s.login("alice", "wonderland")
    return s


@pytest.fixture
def dns():
    """A DNS server on loopback (dnslib) that the test fills with records."""
    from peers import DNS
    d = DNS()
    yield d
    d.stop()


@pytest.fixture
def mx_port():
    """One port, free on every test MX address (127.0.0.11-20): Tern's delivery.mx_port."""
    from peers import HOSTS, free_port
    return free_port(HOSTS)


@pytest.fixture
def sinks(mx_port):
    """Starts receiving servers (aiosmtpd) on a test MX address and mx_port; stops them after."""
    from peers import Sink
    started = []

    def start(host, **kw):
        s = Sink(host=host, port=kw.pop("port", mx_port), **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        try:
            s.stop()
        except Exception:
            pass
