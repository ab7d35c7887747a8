"""Delivery through a smarthost that requires STARTTLS and AUTH (aiosmtpd with a test CA)."""
import os
import re
import subprocess

import pytest

from conftest import BINARY, Tern
from peers import Sink, free_port, send, wait_empty, wait_log


@pytest.fixture
def password_file(tmp_path):
    p = tmp_path / "smarthost.pw"
    p.write_text("correct horse\n")
    os.chmod(p, 0o600)
    return p


def smarthost_route(port, certs, password_file, tls="verify", user="relay", host="localhost", extra=""):
    return (
        "routes:\n"
        "  - name: upstream\n"
        '    domains: ["*"]\n'
        "    transport: smarthost\n"
        f"    smarthost: {{ host: {host}, port: {port}, tls: {tls}, ca_file: {certs / 'ca.crt'}, "
        f"auth: {{ user: {user}, password_file: {password_file} }} }}\n" + extra
    )


@pytest.fixture
def upstream(certs):
    s = Sink(host="127.0.0.1", tls=(certs / "server.crt", certs / "server.key"), auth=("relay", "correct horse"))
    yield s
    s.stop()


def test_starttls_auth_and_verified_certificate(make_tern, certs, password_file, upstream):
    tern = make_tern(delivery="{ retry_first: 1s }", extra=smarthost_route(upstream.port, certs, password_file))
    send(tern, "app@client.example", ["someone@gmail.example", "other@yahoo.example"])
    [m] = upstream.wait(1)
    assert sorted(m.rcpt_tos) == ["other@yahoo.example", "someone@gmail.example"], "one transaction: same next hop"
    wait_log(tern, rf"to=<someone@gmail\.example>, relay=localhost\[[^\]]+\]:{upstream.port}, .*status=sent")
    wait_empty(tern)


def test_wrong_password_defers(make_tern, certs, tmp_path, upstream):
    bad = tmp_path / "bad.pw"
    bad.write_text("wrong\n")
    os.chmod(bad, 0o600)
    metrics = free_port()
    tern = make_tern(delivery="{ retry_first: 1m }",
                     extra=smarthost_route(upstream.port, certs, bad) + f'metrics: {{ address: "127.0.0.1:{metrics}" }}\n')
    send(tern, "app@client.example", ["someone@gmail.example"])
    wait_log(tern, r"to=<someone@gmail\.example>, .*dsn=4\.7\.\d+, status=deferred \(smtp; 535")
    assert upstream.received == []
    assert tern.queue()[0]["recipients"][0]["state"] == "deferred"
    from test_metrics import labelled, scrape
    text = scrape(metrics)
    assert labelled(text, "tern_upstream_auth_failures_total", lane=f"relay@localhost:{upstream.port}") == 1, text


def test_verify_refuses_a_certificate_for_another_name(make_tern, certs, password_file, tmp_path):
    # A certificate from the same CA, but for another host.
    def run(*args):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.csr", "-subj", "/CN=other.example")
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:other.example\n")
    run("openssl", "x509", "-req", "-in", "other.csr", "-CA", str(certs / "ca.crt"), "-CAkey", str(certs / "ca.key"),
        "-CAcreateserial", "-out", "other.crt", "-days", "2", "-extfile", "ext.cnf")
    impostor = Sink(host="127.0.0.1", tls=(tmp_path / "other.crt", tmp_path / "other.key"), auth=("relay", "correct horse"))
    try:
        metrics = free_port()
        tern = make_tern(delivery="{ retry_first: 1m }",
                         extra=smarthost_route(impostor.port, certs, password_file) + f'metrics: {{ address: "127.0.0.1:{metrics}" }}\n')
        send(tern, "app@client.example", ["someone@gmail.example"])
        wait_log(tern, r"to=<someone@gmail\.example>, .*dsn=4\.7\.5, status=deferred \(X-Tern; TLS failed")
        from test_metrics import labelled, scrape
        assert labelled(scrape(metrics), "tern_outbound_tls_failures_total", lane=f"relay@localhost:{impostor.port}") >= 1
        assert impostor.received == []
        assert impostor.total_connections >= 1
    finally:
        impostor.stop()


def test_encrypt_refuses_a_server_without_starttls(make_tern, certs, password_file):
    plain = Sink(host="127.0.0.1")
    try:
        tern = make_tern(delivery="{ retry_first: 1m }", extra=smarthost_route(plain.port, certs, password_file, tls="encrypt"))
        send(tern, "app@client.example", ["someone@gmail.example"])
        wait_log(tern, r"to=<someone@gmail\.example>, .*status=deferred")
        assert plain.received == [], "no mail and no password over plaintext"
    finally:
        plain.stop()


def test_password_file_readable_by_others_is_refused(tmp_path, certs, password_file):
    os.chmod(password_file, 0o644)
    config = ('hostname: relay.test\nlisteners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:0" }\n'
              + smarthost_route(25, certs, password_file))
    path = tmp_path / "tern.yaml"
    path.write_text(config)
    for command in (["check"], ["serve"]):
        out = subprocess.run([BINARY, *command, "--config", str(path)], capture_output=True, text=True, timeout=20)
        assert out.returncode == 78, out.stderr
        assert "routes[0].smarthost.auth.password_file" in out.stderr and "644" in out.stderr, out.stderr


def test_route_explain(tmp_path, certs, password_file):
    config = (
        'hostname: relay.test\nlisteners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:0" }\n'
        "routes:\n"
        "  - { name: partners, domains: [partner.example, .partner.example], transport: mx }\n"
        "  - name: tenant-b\n"
        '    domains: ["*"]\n'
        "    sender_domains: [tenant-b.example]\n"
        "    transport: smarthost\n"
        f"    smarthost: {{ host: smtp.upstream.example, port: 2587, auth: {{ user: b, password_file: {password_file} }} }}\n"
        "    lane: { max_connections: 4 }\n"
    )
    path = tmp_path / "tern.yaml"
    path.write_text(config)

    def explain(*args):
        return subprocess.run([BINARY, "route", "explain", "--config", str(path), *args], capture_output=True, text=True,
                              check=True).stdout

    out = explain("user@eu.partner.example")
    assert "route: partners" in out and "next hop: MX hosts of eu.partner.example" in out and "tls: may" in out
    out = explain("user@gmail.example", "--sender", "app@tenant-b.example")
    assert "route: tenant-b" in out and "next hop: smarthost smtp.upstream.example:2587" in out
    assert "lane: b@smtp.upstream.example:2587" in out and "tls: verify" in out and "max_connections 4" in out
    out = explain("user@gmail.example", "--sender", "app@other.example")
    assert "route: default" in out and "lane: gmail.example" in out


def test_reload_reads_a_changed_password(make_tern, certs, tmp_path, upstream):
    import signal
    pw = tmp_path / "rotated.pw"
    pw.write_text("old secret\n")
    os.chmod(pw, 0o600)
    tern = make_tern(delivery="{ retry_first: 1s, retry_maximum: 1s, retry_jitter: 0 }",
                     extra=smarthost_route(upstream.port, certs, pw))
    send(tern, "app@client.example", ["someone@gmail.example"])
    wait_log(tern, r"to=<someone@gmail\.example>, .*status=deferred \(smtp; 535")
    # The operator rotates the password and reloads: the next attempt logs in with it.
    pw.write_text("correct horse\n")
    tern.proc.send_signal(signal.SIGHUP)
    wait_log(tern, r"configuration reloaded")
    [m] = upstream.wait(1, timeout=20)
    assert m.rcpt_tos == ["someone@gmail.example"]
    wait_empty(tern)
    # A password file that others can now read is refused; the running config stays.
    os.chmod(pw, 0o644)
    tern.proc.send_signal(signal.SIGHUP)
    wait_log(tern, r"reload refused, the running configuration stays: .*routes\[0\]\.smarthost\.auth\.password_file: .*mode 644")
    send(tern, "app@client.example", ["again@gmail.example"])
    upstream.wait(2, timeout=20)


def test_smarthost_lane_keeps_its_rate_across_routes(make_tern):
    # SES-style: a per-second quota and a connection cap on the smarthost, which two routes
    # (two groups of recipient domains) share: one lane, one set of limits.
    import smtplib
    sink = Sink(host="127.0.0.1", data_delay=0.05)
    try:
        routes = (
            "routes:\n"
            f"  - {{ name: ses-a, domains: [a.example], transport: smarthost, smarthost: {{ host: 127.0.0.1, port: {sink.port}, tls: none }}, "
            'lane: { rate: "4/s", burst: 1, max_connections: 2 } }\n'
            f"  - {{ name: ses-b, domains: [b.example], transport: smarthost, smarthost: {{ host: 127.0.0.1, port: {sink.port}, tls: none }} }}\n"
        )
        tern = make_tern(delivery="{ retry_first: 1s }", extra=routes)
        with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
            for i in range(5):
                s.sendmail("app@client.example", [f"x{i}@a.example"], b"Subject: a\r\n\r\nx\r\n")
                s.sendmail("app@client.example", [f"y{i}@b.example"], b"Subject: b\r\n\r\nx\r\n")
        times = sorted(m.time for m in sink.wait(10, timeout=30))
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert j - i + 1 <= 4 * (times[j] - times[i]) + 1 + 0.5, (i, j, times[j] - times[i])
        assert times[-1] - times[0] >= 9 / 4 - 0.2, "ten messages at 4/s with a burst of one"
        assert sink.max_connections <= 2
        wait_empty(tern)
    finally:
        sink.stop()


def test_required_tls_not_offered_keeps_its_reason(make_tern, certs, password_file):
    """Regression: the log read 'failed at hello: protocol error: connection closed'."""
    plain = Sink(host="127.0.0.1")  # no STARTTLS at all
    try:
        tern = make_tern(delivery="{ retry_first: 1h }",
                         extra=smarthost_route(plain.port, certs, password_file, tls="encrypt", host="127.0.0.1"))
        send(tern, "app@client.example", ["someone@gmail.example"])
        line = wait_log(tern, r"to=<someone@gmail\.example>, .*status=deferred \((.*)\)")
        assert "TLS is required (encrypt), but the server does not offer STARTTLS" in line.group(1), line.group(0)
        assert re.search(r"failed at startTLS: TLS failed: TLS is required", tern.log())
        assert plain.received == []
    finally:
        plain.stop()
