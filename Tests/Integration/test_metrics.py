"""The Prometheus endpoint: counters for what the logs say."""
import urllib.error
import urllib.request

import pytest

from peers import delivery, free_port, send, wait_empty


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def value(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def labelled(text, name, **labels):
    """The value of the series `name` whose labels include these, in any order."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body = line[len(name) + 1:line.index("}")]
        found = dict(part.split("=", 1) for part in body.split(","))
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(line.split()[-1])
    return None


def test_metrics_count_accepted_and_delivered_mail(make_tern, dns, mx_port, sinks):
    dns.add("ok.example", ("A", "127.0.0.11"))
    dns.add("gone.example", ("A", "127.0.0.11"))
    receiver = sinks("127.0.0.11")
    receiver.replies["x@gone.example"] = "550 5.1.1 no such user"
    port = free_port()
    tern = make_tern(delivery=delivery(dns, mx_port), extra=f'metrics: {{ address: "127.0.0.1:{port}" }}')
    send(tern, "app@client.example", ["a@ok.example", "b@ok.example"])
    send(tern, "", ["x@gone.example"])
    receiver.wait(1)
    wait_empty(tern)
    text = scrape(port)
    assert value(text, "tern_messages_accepted_total") == 2
    assert value(text, "tern_connections_total") == 2
    assert value(text, 'tern_delivery_attempts_total{status="sent"}') == 2
    assert value(text, 'tern_delivery_attempts_total{status="bounced"}') == 1
    assert value(text, "tern_queue_messages") == 0
    assert value(text, 'tern_lane_connections{lane="ok.example"}') is not None
    assert value(text, 'tern_lane_in_flight{lane="ok.example"}') == 0
    assert value(text, 'tern_lane_throttled{lane="ok.example"}') == 0
    assert labelled(text, "tern_deliveries_total", lane="ok.example", status="sent") == 2
    assert labelled(text, "tern_deliveries_total", lane="gone.example", status="bounced") == 1
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(port, "/")
    assert e.value.code == 404


def test_lane_series_follow_a_suspension_and_a_forgotten_lane(make_tern, dns, mx_port, sinks):
    import subprocess
    import time
    from conftest import BINARY
    dns.add("sus.example", ("A", "127.0.0.12"))
    receiver = sinks("127.0.0.12")
    port = free_port()
    tern = make_tern(delivery=delivery(dns, mx_port, ", lane_idle_time: 2s"), extra=f'metrics: {{ address: "127.0.0.1:{port}" }}')
    send(tern, "app@client.example", ["a@sus.example"])
    receiver.wait(1)
    subprocess.run([BINARY, "lanes", "suspend", "sus.example", "--for", "3s", "--config", str(tern.config_path)], cwd=tern.dir,
                   check=True, capture_output=True, timeout=20)
    assert value(scrape(port), 'tern_lane_throttled{lane="sus.example"}') == 1
    deadline = time.time() + 20
    while value(scrape(port), 'tern_lane_throttled{lane="sus.example"}') is not None:
        assert time.time() < deadline, "the series of a forgotten lane go away"
        time.sleep(0.5)


def test_idle_and_excess_connections_are_closed(make_tern):
    """Regression: the endpoint had no timeout and no cap; idle connections stayed forever."""
    import socket
    import time
    port = free_port()
    make_tern(extra=f'metrics: {{ address: "127.0.0.1:{port}" }}')
    idle = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(40)]

    def closed(s, wait):
        s.settimeout(wait)
        try:
            return s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    time.sleep(0.5)
    shut = sum(closed(s, 0.05) for s in idle)
    assert shut >= 8, f"only {shut} of 40 connections past the cap of 32 were closed"
    started = time.time()
    assert all(closed(s, 15) for s in idle), "an idle connection outlived the request deadline"
    assert time.time() - started < 13
    assert "tern_" in scrape(port)
    for s in idle:
        s.close()


def test_every_series_is_described_and_the_alert_inputs_count(make_tern, certs, users_file):
    """The series config/alerts.yaml uses: rejects by reason, client AUTH and TLS failures,
    the oldest message's age, up; each with # HELP and # TYPE."""
    import smtplib
    import socket
    import ssl
    import time
    from conftest import tls_client_context
    port = free_port()
    tern = make_tern(listeners=[("mx", "smtp"), ("smtps", "smtps")], tls=certs, users=users_file,
                     mynetworks=("127.0.0.1/32",), extra=f'metrics: {{ address: "127.0.0.1:{port}" }}')
    send(tern, "app@client.example", ["a@ok.example"])  # queued; delivery is paused
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10, source_address=("127.0.0.2", 0)) as s:  # outside mynetworks
        s.ehlo()
        s.mail("app@client.example")
        assert s.rcpt("u@example.org")[0] == 554
        assert s.rcpt("v@example.org")[0] == 554
    with smtplib.SMTP_SSL("127.0.0.1", tern.port("smtps"), context=tls_client_context(certs), timeout=10) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "not the password")
    raw = socket.create_connection(("127.0.0.1", tern.port("smtps")), timeout=5)
    raw.sendall(b"EHLO plaintext-on-an-implicit-tls-port\r\n")
    raw.recv(100)
    raw.close()
    time.sleep(6)  # the oldest message's age is refreshed every 5 s
    text = scrape(port)
    assert labelled(text, "tern_rejects_total", stage="RCPT", code="554 5.7.1") == 2
    assert labelled(text, "tern_auth_failures_total", listener="smtps") == 2  # smtplib tries PLAIN, then LOGIN
    assert labelled(text, "tern_inbound_tls_failures_total", listener="smtps") == 1
    assert value(text, "tern_queue_oldest_message_age_seconds") >= 1
    assert value(text, "tern_up") == 1
    assert value(text, "tern_start_time_seconds") > 1.7e9
    types = {l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")}
    helps = {l.split()[2] for l in text.splitlines() if l.startswith("# HELP ")}
    assert types and types == helps, types ^ helps
