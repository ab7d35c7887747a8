"""Real peers for delivery tests, all on loopback: a DNS server (dnslib) and receiving SMTP
servers (aiosmtpd), run in this process's threads and stopped by the fixtures that start them.
"""
import email
import socket
import ssl
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from dnslib import AAAA, MX, RCODE, RR, QTYPE, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def free_port(addresses=("127.0.0.1",)):
    """A TCP port free on every one of `addresses` (they all get servers on the same port)."""
    for _ in range(200):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        ok = True
        for a in addresses:
            s = socket.socket()
            try:
                s.bind((a, port))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return port
    raise RuntimeError("no free port")


class Zone(BaseResolver):
    """Answers from a dict: name -> list of ("MX", pref, host) / ("A", ip) / ("AAAA", ip).
    Names in `servfail` get SERVFAIL; names absent get NXDOMAIN."""

    def __init__(self):
        self.records = {}
        self.servfail = set()
        self.queries = []

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        self.queries.append((name, qtype))
        if name in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for record in self.records[name]:
            if record[0] != qtype:
                continue
            if qtype == "MX":
                rdata = MX(record[2] if record[2] != "." else ".", record[1])
            elif qtype == "A":
                rdata = A(record[1])
            else:
                rdata = AAAA(record[1])
            reply.add_answer(RR(request.q.qname, getattr(QTYPE, qtype), rdata=rdata, ttl=1))
        return reply


class DNS:
    def __init__(self):
        self.zone = Zone()
        self.port = free_port()
        quiet = DNSLogger(logf=lambda s: None)
        self.udp = DNSServer(self.zone, port=self.port, address="127.0.0.1", logger=quiet)
        self.tcp = DNSServer(self.zone, port=self.port, address="127.0.0.1", tcp=True, logger=quiet)
        self.udp.start_thread()
        self.tcp.start_thread()

    def add(self, name, *records):
        self.zone.records.setdefault(name.lower(), []).extend(records)

    def stop(self):
        self.udp.stop()
        self.tcp.stop()


class Received:
    def __init__(self, mail_from, rcpt_tos, content, peer):
        self.mail_from = mail_from
        self.rcpt_tos = list(rcpt_tos)
        self.content = content
        self.peer = peer
        self.time = time.time()

    def message(self):
        return email.message_from_bytes(self.content)


class Sink:
    """A receiving server. `replies` maps a recipient to the RCPT reply it gets (a string, or a
    list consumed one per attempt, the last repeating). Counts simultaneous connections.
    Optional: TLS (STARTTLS), required AUTH with one user, a delay before each DATA reply."""

    def __init__(self, host="127.0.0.1", port=None, tls=None, auth=None, data_delay=0.0, hostname="sink.test",
                 data_size_limit=33554432):
        self.host = host
        self.port = port or free_port((host,))
        self.received = []
        self.replies = {}
        self.connections = 0
        self.max_connections = 0
        self.total_connections = 0
        self.connection_times = []
        self.data_delay = data_delay
        self.lock = threading.Lock()
        sink = self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, options):
                reply = sink.replies.get(address)
                if isinstance(reply, list):
                    reply = reply.pop(0) if len(reply) > 1 else reply[0]
                if reply and not reply.startswith("2"):
                    return reply
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):
                if sink.data_delay:
                    import asyncio
                    await asyncio.sleep(sink.data_delay)
                with sink.lock:
                    sink.received.append(Received(envelope.mail_from, envelope.rcpt_tos, envelope.original_content, session.peer))
                return "250 2.0.0 accepted"

        class CountingSMTP(SMTP):
            def connection_made(self, transport):
                with sink.lock:
                    sink.connections += 1
                    sink.total_connections += 1
                    sink.connection_times.append(time.time())
                    sink.max_connections = max(sink.max_connections, sink.connections)
                super().connection_made(transport)

            def connection_lost(self, exc):
                with sink.lock:
                    sink.connections -= 1
                super().connection_lost(exc)

        kwargs = dict(hostname=host, port=self.port, decode_data=False, server_hostname=hostname)
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
        if auth:
            user, password = auth

            def authenticator(server, session, envelope, mechanism, data):
                ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
                return AuthResult(success=ok, handled=False)

        class C(Controller):
            def factory(self):
                extra = {}
                if context:
                    extra.update(tls_context=context, require_starttls=True)
                if auth:
                    extra.update(auth_required=True, authenticator=authenticator, auth_require_tls=True)
                return CountingSMTP(self.handler, decode_data=False, hostname=hostname, data_size_limit=data_size_limit, **extra)

        self.controller = C(Handler(), hostname=host, port=self.port)
        self.controller.start()

    def wait(self, count, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.received) >= count:
                return self.received
            time.sleep(0.05)
        raise AssertionError(f"{self.host}:{self.port} got {len(self.received)} messages, expected {count}")

    def recipients(self):
        return [r for m in self.received for r in m.rcpt_tos]

    def stop(self):
        self.controller.stop()


class Blackhole:
    """Accepts connections and never says a word: a destination that hangs."""

    def __init__(self, host, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(100)
        self.held = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
            except socket.timeout:
                continue
            except OSError:
                return

    def stop(self):
        self.running = False
        self.thread.join()
        for c in self.held:
            c.close()
        self.sock.close()


class Hostile:
    """A receiving server that misbehaves on purpose, one scripted way per instance.

    `script(conn)` runs for each connection with a `HostileConnection`: it reads client lines
    and sends raw bytes, so a test can inject, dribble, overflow or lie. What the server truly
    received (messages after a real 354 and final dot) is in `received`. Bounded: each
    connection's script ends when the client goes away or `stop()` is called."""

    def __init__(self, host, port, script, tls=None):
        self.script = script
        self.received = []
        self.connections = 0
        self.client_closed_after = []  # seconds from accept to the client closing
        self.running = True
        self.context = None
        if tls:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(str(tls[0]), str(tls[1]))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(50)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock):
        c = HostileConnection(self, sock)
        started = time.time()
        try:
            self.script(c)
        except (OSError, EOFError, ssl.SSLError):
            pass
        finally:
            self.client_closed_after.append(time.time() - started)
            try:
                c.sock.close()
            except OSError:
                pass

    def stop(self):
        self.running = False
        self.thread.join()
        self.sock.close()


class HostileConnection:
    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.sock.settimeout(30)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self.server.running:
                raise EOFError()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError()
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def starttls(self):
        self.buf = b""
        self.sock = self.server.context.wrap_socket(self.sock, server_side=True)

    def honest_session(self, ehlo_extra=(), data_reply=b"250 2.0.0 accepted\r\n", rcpt_reply=b"250 2.1.5 ok\r\n"):
        """Behaves as a plain receiving server from here on (answering every RCPT with
        `rcpt_reply`, and DATA with 354 whatever came before); records what it receives."""
        mail_from, rcpts = None, []
        while True:
            line = self.line()
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                lines = [b"hostile.test", *ehlo_extra]
                self.send(b"".join(b"250-" + l + b"\r\n" for l in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")
            elif verb == b"MAIL":
                mail_from, rcpts = line, []
                self.send(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line)
                self.send(rcpt_reply)
            elif verb == b"DATA":
                self.send(b"354 go ahead\r\n")
                content = b""
                while True:
                    l = self.line()
                    if l == b".":
                        break
                    content += l + b"\r\n"
                self.server.received.append((mail_from, rcpts, content))
                self.send(data_reply)
            elif verb == b"RSET" or verb == b"NOOP":
                self.send(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                self.send(b"221 2.0.0 bye\r\n")
                return
            else:
                self.send(b"502 5.5.2 what\r\n")


# MARK: - Helpers for delivery tests

HOSTS = [f"127.0.0.{n}" for n in range(11, 21)]


def delivery(dns, mx_port, extra=""):
    """Tern's `delivery:` settings for a test: its DNS server, its MX port, quick retries."""
    return (f'{{ resolver: "127.0.0.1:{dns.port}", mx_port: {mx_port}, retry_first: 1s, retry_maximum: 2s, '
            f'retry_jitter: 0, connect_timeout: 3s{extra} }}')


def send(tern, sender, recipients, subject="test", body="hello\r\n", options=(), listener="mx"):
    import smtplib
    with smtplib.SMTP("127.0.0.1", tern.port(listener), timeout=10) as s:
        s.sendmail(sender, recipients, f"From: {sender}\r\nSubject: {subject}\r\n\r\n{body}".encode(), rcpt_options=list(options))


def wait_log(tern, pattern, timeout=20):
    import re
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, tern.log())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{tern.log()[-3000:]}")


def wait_empty(tern, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not tern.queue():
            return
        time.sleep(0.1)
    raise AssertionError(f"queue not empty: {tern.queue()}")


def dsn_parts(received):
    """(per-message fields, [per-recipient fields], MIME parts) of a DSN, checked as RFC 3464."""
    msg = received.message()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert parts[1].get_content_type() == "message/delivery-status"
    groups = parts[1].get_payload()
    return groups[0], groups[1:], parts
