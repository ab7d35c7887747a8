"""Bad config gets an error naming the key and the line, and Tern does not start."""
import subprocess

import pytest

from conftest import BINARY


def check(tmp_path, text):
    path = tmp_path / "tern.yaml"
    path.write_text(text)
    return subprocess.run([BINARY, "check", "--config", str(path)], capture_output=True, text=True, cwd=tmp_path)


BASE = 'listeners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:2525" }\n'


@pytest.mark.parametrize("text,expected", [
    (BASE + "limits:\n  max_mesage_size: 10MB\n", "tern.yaml:4: limits.max_mesage_size: unknown key"),
    (BASE + "limits:\n  max_message_size: ten\n", "tern.yaml:4: limits.max_message_size: 'ten' is not a size"),
    (BASE + "limits:\n  command_timeout: 5 minutes\n", "tern.yaml:4: limits.command_timeout: '5 minutes' is not a duration"),
    (BASE + "access:\n  mynetworks: [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n", "tern.yaml:4: access.mynetworks[1]: '10.0.0.0/33' is not a network"),
    ('listeners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:99999" }\n', "tern.yaml:2: listeners[0].address: '127.0.0.1:99999' is not an address"),
    ('listeners:\n  - { name: mx, kind: lmtp, address: "127.0.0.1:25" }\n', "tern.yaml:2: listeners[0].kind: must be one of smtp, submission, smtps"),
    ('listeners:\n  - { name: sub, kind: submission, address: "127.0.0.1:587" }\n', "listeners[0].kind: a submission listener needs tls.certificate and tls.key"),
    (BASE + '  - { name: mx, kind: smtp, address: "127.0.0.1:2526" }\n', "tern.yaml:3: listeners[1].name: 'mx' is used twice"),
    (BASE + "tls: { certificate: /nonexistent.crt, key: /nonexistent.key }\n", "tern.yaml:3: tls.certificate: cannot read /nonexistent.crt"),
    ("hostname: relay.test\n", "listeners: is required"),
    (BASE + "access:\n  allowed_senders: { alice: [\"alice@x.test\"] }\n", "access.allowed_senders: names users, but access.users_file is not set"),
    (BASE + "limits: [1, 2]\n", "tern.yaml:3: limits: expected a mapping"),
    (BASE + "  bad: [\n", "not valid YAML"),
])
def test_config_errors_name_key_and_line(tmp_path, text, expected):
    out = check(tmp_path, text)
    assert out.returncode == 78, out.stdout + out.stderr
    assert expected in out.stderr, out.stderr


def test_check_prints_effective_policy(tmp_path):
    out = check(tmp_path, BASE + "access:\n  mynetworks: [\"10.0.0.0/8\"]\n")
    assert out.returncode == 0, out.stderr
    assert "mx: smtp on 127.0.0.1:2525 (no TLS)" in out.stdout
    assert "relay allowed from: 10.0.0.0/8" in out.stdout


def test_serve_refuses_bad_config(tmp_path):
    path = tmp_path / "tern.yaml"
    path.write_text(BASE + "frobnicate: yes\n")
    out = subprocess.run([BINARY, "serve", "--config", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=20)
    assert out.returncode == 78
    assert "frobnicate: unknown key" in out.stderr


def test_shipped_configs_are_valid(tmp_path):
    """config/tern.yaml and every example pass `tern check` (examples with their files stubbed)."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([BINARY, "check", "--config", "config/tern.yaml"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    examples = sorted((root / "config/examples").glob("*.yaml"))
    assert examples
    for example in examples:
        text = example.read_text()
        # Point file paths at stand-ins so the check can read them.
        pem = subprocess.run(["openssl", "genpkey", "-algorithm", "ED25519"], capture_output=True, text=True, check=True).stdout
        for key in ("certificate", "key", "users_file", "password_file", "ca_file", "key_file"):
            for value in re.findall(rf"{key}: (\S+?)[,}}\s]", text):
                stub = tmp_path / pathlib.Path(value).name
                stub.write_text({"users_file": "alice:$6$salt$hash\n", "key_file": pem}.get(key, "stub\n"))
                stub.chmod(0o600)
                text = text.replace(value, str(stub))
        patched = tmp_path / example.name
        patched.write_text(text)
        out = subprocess.run([BINARY, "check", "--config", str(patched)], capture_output=True, text=True, cwd=tmp_path)
        # The stand-in certificate is not a real one: only a TLS load error is acceptable.
        assert out.returncode == 0 or "tls: cannot load" in out.stderr, (example.name, out.stderr)


@pytest.mark.parametrize("which", ["users", "key"])
def test_secrets_that_others_can_read_are_refused(tmp_path, certs, users_file, which):
    import os
    import shutil
    users = tmp_path / "users"
    shutil.copy(users_file, users)
    key = tmp_path / "server.key"
    shutil.copy(certs / "server.key", key)
    os.chmod(users, 0o600)
    os.chmod(key, 0o600)
    os.chmod(users if which == "users" else key, 0o640)
    text = (BASE + f"tls: {{ certificate: {certs / 'server.crt'}, key: {key} }}\n"
            + f"access:\n  users_file: {users}\n")
    out = check(tmp_path, text)
    assert out.returncode == 78, out.stdout + out.stderr
    name = "access.users_file" if which == "users" else "tls.key"
    assert f"{name}: " in out.stderr and "mode 640" in out.stderr, out.stderr
    os.chmod(users if which == "users" else key, 0o600)
    assert check(tmp_path, text).returncode == 0


def test_an_open_relay_mynetworks_is_refused_unless_meant(tmp_path):
    out = check(tmp_path, BASE + 'access:\n  mynetworks: ["127.0.0.0/8", "0.0.0.0/0"]\n')
    assert out.returncode == 78
    assert "access.mynetworks[1]: '0.0.0.0/0' trusts every address on the internet: that is an open relay" in out.stderr, out.stderr
    assert check(tmp_path, BASE + 'access:\n  mynetworks: ["::/0"]\n').returncode == 78
    meant = check(tmp_path, BASE + 'access:\n  mynetworks: ["0.0.0.0/0"]\n  i_know_this_is_an_open_relay: true\n')
    assert meant.returncode == 0, meant.stderr


def test_a_key_that_does_not_match_the_certificate_is_named(tmp_path, certs):
    import os
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    os.chmod(other, 0o600)
    out = check(tmp_path, BASE + f"tls: {{ certificate: {certs / 'server.crt'}, key: {other} }}\n")
    assert out.returncode == 78
    assert "the private key does not match the certificate" in out.stderr, out.stderr
