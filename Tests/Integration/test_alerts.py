"""config/alerts.yaml: valid Prometheus rules (promtool check rules), alerts that fire when
they should and not before (promtool's rule unit tests in alerts_test.yaml), over series that
Tern's metrics endpoint really has."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
