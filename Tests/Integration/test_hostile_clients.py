"""What a hostile client sends cannot stop the daemon or stall its session: each case is
followed by a check that the same connection (or the next one) still gets its replies."""
import base64
import socket
import time

import pytest

from conftest import RawClient, good_transaction, open_transaction, tls_client_context
from peers import wait_log


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def tls_session(tern, certs, listener="mx"):
    """EHLO, STARTTLS, the handshake and EHLO again."""
    c = RawClient(tern.port(listener))
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    c.sock, c.buf = tls_client_context(certs).wrap_socket(c.sock, server_hostname="localhost"), b""
    assert c.cmd("EHLO client.test")[0] == 250
    return c


@pytest.fixture
def tls_tern(make_tern, certs, users_file):
    return make_tern(tls=certs, users=users_file)


@pytest.mark.parametrize("response", ["BDAT 0", "BDAT 0 LAST", "BDAT 5", "bdat 3 last", "DATA", "STARTTLS"])
def test_auth_plain_response_that_reads_like_a_command(tls_tern, certs, response):
    """Regression: `BDAT 0` as the SASL response aborted the whole daemon; `DATA` or
    `STARTTLS` stalled the session. A SASL response is a line, whatever it reads like."""
    c = tls_session(tls_tern, certs)
    assert c.cmd("AUTH PLAIN")[0] == 334
    code, text = c.cmd(response)
    assert code == 501 and text.startswith("5.5.2"), (code, text)
    # The session reads commands again: no chunk, no DATA stream, no TLS.
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert tls_tern.proc.poll() is None
    good_transaction(tls_tern.port("mx"))


@pytest.mark.parametrize("password", ["DATA", "STARTTLS", "BDAT 0", "BDAT 7 LAST"])
def test_auth_login_password_line_that_reads_like_a_command(tls_tern, certs, password):
    c = tls_session(tls_tern, certs)
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(b64("alice"))[0] == 334
    code, text = c.cmd(password)
    # 501 where the line is not base64, 535 where it decodes ("DATA" does): refused either way.
    assert code in (501, 535), (code, text)
    assert c.cmd("NOOP")[0] == 250, "the session answers the next command"
    # The same with a well-formed response that fails: the reply is 535, then commands go on.
    assert c.cmd("AUTH LOGIN " + b64("alice"))[0] == 334
    assert c.cmd(b64(password))[0] == 535
    assert c.cmd("NOOP")[0] == 250
    assert tls_tern.proc.poll() is None


def test_bdat_refused_before_mail_still_reads_its_chunk(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    assert c.cmd("EHLO client.test")[0] == 250
    c.send(b"BDAT 12\r\nNOOP\r\nNOOP\r\n")
    code, _ = c.reply()
    assert code == 503
    # The 12 bytes were the chunk, not two NOOPs: only this NOOP is answered.
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("NOOP")[0] == 250
    c.send(b"QUIT\r\n")
    assert c.reply()[0] == 221


def test_pipelined_bdat_chunks_and_commands(make_tern):
    tern = make_tern()
    c = open_transaction(tern.port("mx"))
    body = b"Subject: chunked\r\n\r\nDATA\r\n.\r\nQUIT\r\n"
    c.send(b"BDAT 10\r\n" + body[:10] + b"BDAT " + str(len(body) - 10).encode() + b" LAST\r\n" + body[10:] + b"NOOP\r\n")
    assert c.reply()[0] == 250
    code, text = c.reply()
    assert code == 250 and "queued as" in text
    assert c.reply()[0] == 250  # the NOOP
    [queued] = tern.queue()
    assert tern.message_bytes(queued["id"]).endswith(body)


def test_command_deadline_is_not_rearmed_by_each_byte(make_tern):
    """A client that dribbles a command one byte at a time is cut off at command_timeout
    from the start of the line, not command_timeout after its last byte."""
    tern = make_tern(limits="{ command_timeout: 2s, data_timeout: 3s }")
    c = RawClient(tern.port("mx"))
    started = time.monotonic()
    closed_at = None
    for byte in b"EHLO a-very-slow-client.example.test\r\n":
        try:
            c.sock.sendall(bytes([byte]))
        except OSError:
            closed_at = time.monotonic()
            break
        time.sleep(0.3)
        c.sock.settimeout(0.01)
        try:
            data = c.sock.recv(4096)
            if data.startswith(b"421") or not data:
                closed_at = time.monotonic()
                assert not data or b"4.4.2" in data
                break
        except socket.timeout:
            pass
    assert closed_at is not None, "the dribbling client was never cut off"
    assert closed_at - started < 4.5, closed_at - started


def test_data_deadline_is_for_the_whole_transfer(make_tern):
    tern = make_tern(limits="{ command_timeout: 5s, data_timeout: 2s }")
    c = open_transaction(tern.port("mx"))
    assert c.cmd("DATA")[0] == 354
    started = time.monotonic()
    c.sock.settimeout(0.01)
    reply = b""
    while time.monotonic() - started < 8:
        try:
            c.sock.sendall(b"x")
        except OSError:
            break
        time.sleep(0.2)
        try:
            reply += c.sock.recv(4096)
            if reply:
                break
        except socket.timeout:
            pass
    assert reply.startswith(b"421 4.4.2"), reply
    assert time.monotonic() - started < 4
    assert tern.queue() == []


def test_password_with_a_nul_does_not_match_the_part_before_it(tls_tern, certs):
    """Regression: `secret1\\0junk` logged in as `secret1` (crypt(3) reads a C string)."""
    c = tls_session(tls_tern, certs)
    assert c.cmd("AUTH LOGIN " + b64("alice"))[0] == 334
    assert c.cmd(base64.b64encode(b"wonderland\0junk").decode())[0] == 535
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland\0junk").decode())[0] in (501, 535)
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland").decode())[0] == 235


def test_user_name_cannot_forge_a_log_line(tls_tern, certs):
    """Regression: an AUTH LOGIN user name with a line feed wrote a complete forged log line."""
    c = tls_session(tls_tern, certs)
    forged = "x\n2026-11-27T00:00:00.000Z tern[1]: warning: [203.0.113.9]:1: SASL authentication failed for user root\x00cut\x1b[2J"
    assert c.cmd("AUTH LOGIN " + base64.b64encode(forged.encode()).decode())[0] == 334
    assert c.cmd(b64("wrong"))[0] == 535
    c.cmd("QUIT")
    time.sleep(0.3)
    raw = tls_tern.log_path.read_bytes()
    assert b"\x00" not in raw and b"\x1b" not in raw
    lines = raw.decode().splitlines()
    assert not any(l.startswith("2026-11-27T00:00:00.000Z") for l in lines)
    assert any("SASL authentication failed for user x\\x0A2026-11-27T00:00:00.000Z" in l and "\\x00cut\\x1B[2J" in l for l in lines)


def test_stress_mode_shortens_the_command_deadline(make_tern):
    """Above 80% of max_connections, a new idle client gets stress_command_timeout, and a
    legitimate client still gets a slot."""
    tern = make_tern(limits="{ max_connections: 10, max_connections_per_client: 10, command_timeout: 60s, stress_command_timeout: 1s }")
    port = tern.port("mx")
    calm = RawClient(port)
    calm.sock.settimeout(3)
    with pytest.raises(socket.timeout):
        calm.sock.recv(100)  # no stress yet: a 60 s deadline
    held = [RawClient(port) for _ in range(8)]  # 9 of 10 slots taken
    c = RawClient(port)
    started = time.monotonic()
    code, text = c.reply()
    assert code == 421 and text.startswith("4.4.2"), (code, text)
    assert time.monotonic() - started < 4
    for h in held:
        h.close()
    calm.close()
    good_transaction(port)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def flood_without_reading(tern, seconds=10):
    """A client with a receive window of a few KB (set before the handshake, so it is small
    from the start) that pipelines EHLO, a short command with a long reply, until its sends
    block or `seconds` pass, and never reads. Returns the client and the bytes it sent."""
    c = RawClient(tern.port("mx"), timeout=2, rcvbuf=4096)
    assert c.greeting[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    chunk = b"EHLO client.test\r\n" * 4_000
    sent = 0
    stop = time.monotonic() + seconds
    try:
        while sent < 32 << 20 and time.monotonic() < stop:
            c.sock.sendall(chunk)
            sent += len(chunk)
    except (socket.timeout, BlockingIOError):
        pass
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server closed it (its deadline passed while this client flooded)
    return c, sent


def test_client_that_never_reads_its_replies_is_held_back(make_tern):
    """A client pipelines commands without ever reading a reply. The replies fill its receive
    window; the session then waits for the connection to drain and stops reading, so the
    client's sends block in turn: Tern buffers a bounded amount, not one reply per line sent.
    Without the wait, every reply to what the client sends queues in the daemon."""
    tern = make_tern()
    before = rss_kib(tern.proc.pid)
    c, sent = flood_without_reading(tern)
    grown = rss_kib(tern.proc.pid) - before
    assert grown < 16 << 10, f"RSS grew by {grown} KiB after {sent} bytes of commands"
    # The daemon still serves others.
    good_transaction(tern.port("mx"))
    assert tern.proc.poll() is None
    c.close()


def test_client_that_stops_reading_is_cut_off_at_the_command_deadline(make_tern):
    """The same client, then silent and still connected: the session waits for its replies
    to drain, which they never do. The command deadline still ends the session, by closing
    the connection (no 421 could reach a client that reads nothing), and frees its slot."""
    tern = make_tern(limits="{ command_timeout: 2s, data_timeout: 3s }")
    started = time.monotonic()
    c, _ = flood_without_reading(tern, seconds=10)
    port = c.sock.getsockname()[1]
    wait_log(tern, rf"timeout from \[127\.0\.0\.1\]:{port}: it reads no replies", timeout=15)
    wait_log(tern, rf"disconnect from \[127\.0\.0\.1\]:{port}\b", timeout=5)
    assert time.monotonic() - started < 12, "the session outlived its deadline"
    good_transaction(tern.port("mx"))
    assert tern.proc.poll() is None
    c.close()

