"""config/alerts.yaml: valid Prometheus rules (promtool check rules), alerts that fire when
they should and not before (promtool's rule unit tests in alerts_test.yaml), over series that
Tern's metrics endpoint really has."""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Tern
from peers import Sink, free_port, send, wait_log

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture
def promtool():
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; scripts/setup --test installs it)")
    return tool


def test_rules_check(promtool):
    out = subprocess.run([promtool, "check", "rules", str(ROOT / "config/alerts.yaml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def test_rules_fire_as_the_unit_tests_say(promtool):
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=HERE, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_use_only_series_tern_exports():
    rules = (ROOT / "config/alerts.yaml").read_text()
    used = set(re.findall(r"\b(tern_[a-z_]+)\b", rules))
    catalog = (ROOT / "Sources/tern/MetricsEndpoint.swift").read_text()
    described = set(re.findall(r'"(tern_[a-z_]+)":', catalog))
    assert used and used <= described, used - described


def alerts_config(extra_alerts, delivery="{ paused: true }", extra=""):
    return "\n".join([
        "hostname: relay.test", "spool: var/spool", "listeners:",
        '  - { name: mx, kind: smtp, address: "127.0.0.1:0" }',
        "delivery: " + delivery,
        f"alerts: {{ to: [ops@example.org], check_every: 1s, {extra_alerts} }}",
        extra,
    ]) + "\n"


def alert_mails(tern):
    out = []
    for m in tern.queue():
        if [r["address"] for r in m["recipients"]] == ["ops@example.org"]:
            out.append(tern.message_bytes(m["id"]).decode())
    return out


def test_built_in_alert_mails_the_operator_once_then_when_cleared(tmp_path):
    tern = Tern(tmp_path, alerts_config("queue_depth: 2, repeat: 1h")).start()
    try:
        for n in range(3):
            send(tern, "app@client.example", [f"u{n}@example.net"], listener="mx")
        wait_log(tern, r"alert: raised: 3 messages queued \(alerts\.queue_depth: 2\); mailed to ops@example\.org")
        [mail] = alert_mails(tern)
        assert "Subject: [tern relay.test] ALERT: queue depth: 3 messages queued (alerts.queue_depth: 2)" in mail
        assert "From: Tern on relay.test <tern@relay.test>" in mail and "\r\nDate: " in mail
        # Still crossed, more mail: no second alert within `repeat`.
        for n in range(3):
            send(tern, "app@client.example", [f"v{n}@example.net"], listener="mx")
        time.sleep(2.5)
        assert len(alert_mails(tern)) == 1
        # Under the threshold again: one "cleared" notice.
        tern.run("queue", "delete", "--domain", "example.net")
        wait_log(tern, r"alert: cleared: queue depth back under the threshold")
        mails = alert_mails(tern)
        assert len(mails) == 2 and any("] cleared: queue depth" in m for m in mails)
    finally:
        tern.stop()


def test_built_in_alert_for_a_smarthost_refusing_the_login(tmp_path, certs):
    upstream = Sink(host="127.0.0.1", tls=(certs / "server.crt", certs / "server.key"), auth=("relay", "correct horse"))
    bad = tmp_path / "bad.pw"
    bad.write_text("wrong\n")
    os.chmod(bad, 0o600)
    route = ("routes:\n  - name: upstream\n    domains: [\"*\"]\n    transport: smarthost\n"
             f"    smarthost: {{ host: localhost, port: {upstream.port}, tls: verify, ca_file: {certs / 'ca.crt'}, "
             f"auth: {{ user: relay, password_file: {bad} }} }}")
    tern = Tern(tmp_path, alerts_config("upstream_auth_failures: 1, queue_depth: null", delivery="{ retry_first: 1h }",
                                        extra=route)).start()
    try:
        send(tern, "app@client.example", ["someone@gmail.example"], listener="mx")
        wait_log(tern, r"alert: raised: 1 logins refused by next hops within 1h \(alerts\.upstream_auth_failures: 1\); mailed")
        assert any("ALERT: upstream AUTH failures" in m for m in alert_mails(tern))
    finally:
        tern.stop()
        upstream.stop()
