"""Native DKIM signing (libopendkim): rsa-sha256 and ed25519-sha256 signatures that an
independent verifier (dkimpy) accepts, after HeaderRewrite has changed the headers."""
import os
import re
import smtplib
import subprocess

import dkim
import pytest

from conftest import BINARY


def keygen(d, domain, selector, algorithm, out):
    """`tern dkim keygen`: writes the key, prints the TXT record (split in quoted strings)."""
    printed = subprocess.run([BINARY, "dkim", "keygen", "--domain", domain, "--selector", selector, "--algorithm", algorithm,
                              "--out", str(d / out)], capture_output=True, text=True, check=True).stdout
    assert oct(os.stat(d / out).st_mode & 0o777) == "0o600"
    line = [l for l in printed.splitlines() if "IN TXT" in l][0]
    assert line.startswith(f"{selector}._domainkey.{domain}. IN TXT (")
    return "".join(re.findall(r'"([^"]*)"', line)).encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("dkim")
    records = {
        b"s2026._domainkey.example.com.": keygen(d, "example.com", "s2026", "rsa-sha256", "rsa.key"),
        b"ed._domainkey.example.net.": keygen(d, "example.net", "ed", "ed25519", "ed.key"),
    }
    assert records[b"ed._domainkey.example.net."].startswith(b"v=DKIM1; k=ed25519; p=")
    return d, records


def config(d, extra_settings=""):
    return f"""filters:
  - name: cleanup
    type: header_rewrite
  - name: dkim
    type: dkim_sign
    settings:
      keys:
        - {{ domain: example.com, selector: s2026, key_file: {d / 'rsa.key'} }}
        - {{ domain: example.net, selector: ed, key_file: {d / 'ed.key'}, algorithm: ed25519-sha256 }}
{extra_settings}"""


def verify(content, records):
    return dkim.verify(content, dnsfunc=lambda name, timeout=5: records.get(name))


def send(tern, sender, subject):
    message = (f"From: Someone <{sender}>\r\nTo: u@example.org\r\nSubject: {subject}\r\n"
               "Received: from app1 (app1 [10.1.2.3]) by gw\r\nX-Originating-IP: [10.0.0.9]\r\n"
               "\r\nbody line\r\n.starts with a dot\r\n")
    with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
        s.sendmail(sender, ["u@example.org"], message.encode())


def queued(tern):
    return {m["envelope"]["sender"]: tern.message_bytes(m["id"]) for m in tern.queue()}


def test_rsa_and_ed25519_signatures_verify_after_header_rewrite(make_tern, keys):
    d, records = keys
    tern = make_tern(extra=config(d))
    send(tern, "app@example.com", "rsa")
    send(tern, "app@mail.example.net", "ed25519 via the parent domain's key")
    send(tern, "app@other.example", "no key")
    out = queued(tern)
    rsa = out["app@example.com"]
    assert rsa.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;\r\n\ts=s2026;")
    assert b"10.1.2.3" not in rsa and b"X-Originating-IP" not in rsa, "rewritten before signing"
    assert verify(rsa, records)
    ed = out["app@mail.example.net"]
    assert b"a=ed25519-sha256" in ed and b"d=example.net" in ed
    assert verify(ed, records)
    assert b"DKIM-Signature" not in out["app@other.example"]
    assert "not DKIM-signed: no key for other.example" in tern.log()
    # From is oversigned: adding another From header breaks the signature.
    assert not verify(b"From: evil@example.com\r\n" + rsa, records)
    # Any change to the body breaks it too.
    assert not verify(rsa.replace(b"body line", b"body lime"), records)


def test_key_file_readable_by_others_is_refused(tmp_path, keys):
    d, _ = keys
    loose = tmp_path / "loose.key"
    loose.write_bytes((d / "rsa.key").read_bytes())
    os.chmod(loose, 0o644)
    path = tmp_path / "tern.yaml"
    path.write_text('listeners:\n  - { name: mx, kind: smtp, address: "127.0.0.1:0" }\n'
                    "filters:\n  - name: dkim\n    type: dkim_sign\n    settings:\n      keys:\n"
                    f"        - {{ domain: example.com, selector: s, key_file: {loose} }}\n")
    out = subprocess.run([BINARY, "check", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 78
    assert "filters[0].settings.keys[0].key_file" in out.stderr and "644" in out.stderr, out.stderr
