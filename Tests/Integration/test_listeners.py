"""A real client submits to each listener kind."""
import smtplib
import subprocess
from email.message import EmailMessage

from conftest import RawClient, tls_client_context


def message(subject="hello"):
    m = EmailMessage()
    m["From"] = "app@client.test"
    m["To"] = "user@example.org"
    m["Subject"] = subject
    m.set_content("hello from the integration tests\n")
    return m


def test_plain_smtp_with_swaks(make_tern):
    tern = make_tern()
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{tern.port('mx')}", "--from", "app@client.test", "--to", "user@example.org",
         "--pipeline", "--header", "Subject: swaks"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    [queued] = tern.queue()
    assert queued["envelope"]["sender"] == "app@client.test"
    assert [r["address"] for r in queued["envelope"]["recipients"]] == ["user@example.org"]
    content = tern.message_bytes(queued["id"])
    assert content.startswith(b"Received: from ")
    assert f"by relay.test (Tern) with ESMTP id {queued['id']}".encode() in content
    assert b"Subject: swaks\r\n" in content
    assert "from=<app@client.test>, size=" in tern.log()


def test_ehlo_advertises_extensions(make_tern, certs):
    tern = make_tern(tls=certs)
    c = RawClient(tern.port("mx"))
    assert c.greeting[0] == 220
    code, text = c.cmd("EHLO client.test")
    assert code == 250
    ext = text.split("\n")[1:]
    for e in ["PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "STARTTLS"]:
        assert e in ext
    # AUTH is never offered in plaintext.
    assert not any(e.startswith("AUTH") for e in ext)


def test_submission_requires_starttls_then_auth(make_tern, certs, users_file):
    tern = make_tern(listeners=[("submission", "submission")], tls=certs, users=users_file, mynetworks=["192.0.2.0/24"])
    s = smtplib.SMTP("127.0.0.1", tern.port("submission"), timeout=10)
    s.ehlo("client.test")
    assert s.has_extn("starttls") and not s.has_extn("auth")
    code, text = s.docmd("MAIL FROM:<app@client.test>")
    assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
    code, _ = s.docmd("AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=")
    assert code == 530
    s.starttls(context=tls_client_context(certs))
    s.ehlo("client.test")
    assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
    assert not s.has_extn("starttls")
    code, text = s.docmd("MAIL FROM:<app@client.test>")
    assert (code, text) == (530, b"5.7.0 Authentication required")
    s.login("alice", "wonderland")
    s.send_message(message("submission"))
    s.quit()
    [queued] = tern.queue()
    assert queued["envelope"]["authUser"] == "alice"
    content = tern.message_bytes(queued["id"])
    assert b"with ESMTPSA id" in content and b"(using TLSv1." in content


def test_auth_login_mechanism(make_tern, certs, users_file):
    tern = make_tern(listeners=[("submission", "submission")], tls=certs, users=users_file)
    s = smtplib.SMTP("127.0.0.1", tern.port("submission"), timeout=10)
    s.starttls(context=tls_client_context(certs))
    s.ehlo("client.test")
    s.user, s.password = "bob", "builder"
    code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
    assert code == 235
    s.send_message(message("login"))
    s.quit()
    assert len(tern.queue()) == 1


def test_smtps_implicit_tls(make_tern, certs, users_file):
    tern = make_tern(listeners=[("smtps", "smtps")], tls=certs, users=users_file)
    s = smtplib.SMTP_SSL("127.0.0.1", tern.port("smtps"), context=tls_client_context(certs), timeout=10)
    s.ehlo("client.test")
    assert not s.has_extn("starttls")
    s.login("alice", "wonderland")
    s.send_message(message("smtps"))
    s.quit()
    [queued] = tern.queue()
    assert b"with ESMTPSA id" in tern.message_bytes(queued["id"])


def test_smtps_with_swaks(make_tern, certs, users_file):
    tern = make_tern(listeners=[("smtps", "smtps")], tls=certs, users=users_file)
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{tern.port('smtps')}", "--tlsc", "--auth", "PLAIN",
         "--auth-user", "alice", "--auth-password", "wonderland",
         "--from", "app@client.test", "--to", "user@example.org"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(tern.queue()) == 1


def test_starttls_on_smtp_listener(make_tern, certs):
    tern = make_tern(tls=certs)
    s = smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10)
    s.starttls(context=tls_client_context(certs))
    s.send_message(message("starttls"))
    s.quit()
    [queued] = tern.queue()
    assert b"with ESMTPS id" in tern.message_bytes(queued["id"])


def test_starttls_injection_is_discarded(make_tern, certs):
    """Plaintext pipelined after STARTTLS must never run after the handshake (CVE-2011-0411)."""
    tern = make_tern(tls=certs)
    c = RawClient(tern.port("mx"))
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@attacker.test>\r\n")
    code, _ = c.reply()
    assert code == 220
    tls = tls_client_context(certs).wrap_socket(c.sock, server_hostname="localhost")
    c.sock, c.buf = tls, b""
    code, _ = c.cmd("EHLO client.test")
    assert code == 250
    # Had the injected MAIL run, this RCPT would be accepted.
    code, text = c.cmd("RCPT TO:<user@example.org>")
    assert code == 503, text
    assert c.cmd("MAIL FROM:<app@client.test>")[0] == 250


def test_pipelined_commands_are_answered_in_order(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<bad address>\r\n"
           b"RCPT TO:<c@example.org>\r\nDATA\r\n")
    codes = [c.reply()[0] for _ in range(6)]
    assert codes == [250, 250, 250, 501, 250, 354]
    c.send(b"Subject: pipelined\r\n\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 250
    assert c.reply()[0] == 221
    [queued] = tern.queue()
    assert [r["address"] for r in queued["envelope"]["recipients"]] == ["b@example.org", "c@example.org"]


def test_ipv6_listener_and_mynetworks(tmp_path):
    from conftest import Tern
    import socket as s
    t = Tern(tmp_path, 'hostname: relay.test\nlisteners:\n  - { name: v6, kind: smtp, address: "[::1]:0" }\n'
                       'access:\n  mynetworks: ["::1/128"]\ndelivery: { paused: true }\n')
    t.start()
    try:
        sock = s.create_connection(("::1", t.port("v6")), timeout=10)
        f = sock.makefile("rwb")
        assert f.readline().startswith(b"220 ")
        for line, code in [("EHLO v6.test", b"250 "), ("MAIL FROM:<a@v6.test>", b"250 "), ("RCPT TO:<u@example.org>", b"250 "),
                           ("DATA", b"354 ")]:
            f.write(line.encode() + b"\r\n"); f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            assert reply.startswith(code), (line, reply)
        f.write(b"Subject: v6\r\n\r\nx\r\n.\r\n"); f.flush()
        assert f.readline().startswith(b"250 2.0.0 Ok: queued as")
        [q] = t.queue()
        assert q["envelope"]["client"]["address"] == "::1"
        assert b"from v6.test ([IPv6:::1])" in t.message_bytes(q["id"])
    finally:
        t.kill9()


def test_help_texts(tmp_path):
    from conftest import BINARY
    out = subprocess.run([BINARY, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for sub in ("serve", "check", "queue"):
        assert sub in out.stdout
    out = subprocess.run([BINARY, "queue", "list", "--help"], capture_output=True, text=True)
    assert "--json" in out.stdout and "--config" in out.stdout
