"""Local submission: `tern sendmail` (and `tern` called as sendmail or mailq) as `mail`, cron
and PHP call /usr/sbin/sendmail. With the daemon up the message goes over the spool's Unix
socket; with it down it waits in the maildrop until the daemon starts. Only root, the daemon's
user and `sendmail.group` may submit; whatever lands in the maildrop is checked like SMTP input."""
import grp
import os
import pwd
import shutil
import smtplib
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BINARY, Tern
from peers import HOSTS, delivery, wait_log, wait_empty

BASE = "hostname: relay.test\nspool: var/spool\nlisteners:\n  - { name: mx, kind: smtp, address: \"127.0.0.1:0\" }\n"


def config(extra="", delivery_line="delivery: { paused: true }"):
    return BASE + delivery_line + "\n" + extra


@pytest.fixture
def tern_dir():
    # Under /tmp and open to all: other users run sendmail against this config and spool.
    home = Path(tempfile.mkdtemp(prefix="tern-sendmail-"))
    os.chmod(home, 0o755)
    started = []

    def make(text):
        t = Tern(home, text)
        started.append(t)
        return t

    yield make
    for t in started:
        t.kill9()
    shutil.rmtree(home, ignore_errors=True)


def links(directory):
    """sendmail, mailq and newaliases as symlinks to the binary, as an installation makes them."""
    d = directory / "bin"
    d.mkdir(exist_ok=True)
    for name in ("sendmail", "mailq", "newaliases"):
        if not (d / name).exists():
            (d / name).symlink_to(BINARY)
    return d


def sendmail(tern, *args, stdin=b"", user=None, extra_groups=(), name="sendmail"):
    env = dict(os.environ, TERN_CONFIG=str(tern.config_path))
    kw = {}
    if user is not None:
        kw = {"user": user, "group": pwd.getpwuid(user).pw_gid, "extra_groups": list(extra_groups)}
    return subprocess.run([str(links(tern.dir) / name), *args], input=stdin, capture_output=True, env=env, cwd=tern.dir,
                          timeout=30, **kw)


def queued(tern):
    return tern.queue()


def test_mail_s_through_sendmail_with_the_daemon_up(tern_dir):
    tern = tern_dir(config()).start()
    mailrc = tern.dir / "mailrc"
    mailrc.write_text(f"set sendmail={links(tern.dir) / 'sendmail'}\n")
    env = dict(os.environ, MAILRC=str(mailrc), TERN_CONFIG=str(tern.config_path))
    # The first test step of the deployment guides, verbatim.
    out = subprocess.run(["mail", "-s", "Relay test", "user@example.org"], input=b"test\n", env=env, capture_output=True,
                         timeout=30, cwd=tern.dir)
    assert out.returncode == 0, out.stderr
    wait_log(tern, r"from=<root@relay\.test>, size=\d+, nrcpt=1, client=local \(uid 0\)")
    [message] = queued(tern)
    assert [r["address"] for r in message["recipients"]] == ["user@example.org"]
    content = tern.message_bytes(message["id"]).decode()
    head = content.split("\r\n\r\n")[0]
    assert content.startswith("Received: by relay.test (Tern, from userid 0)\r\n")
    assert "Subject: Relay test" in head
    # What mail leaves out, added as Postfix's cleanup adds it.
    assert "\r\nFrom: " in head and "<root@relay.test>" in head
    assert "\r\nDate: " in head
    assert f"\r\nMessage-ID: <" in head and f".{message['id']}@relay.test>" in head
    assert content.endswith("\r\n\r\ntest\r\n")


def test_mail_waits_in_the_maildrop_while_the_daemon_is_down(tern_dir, dns, mx_port, sinks):
    sink = sinks(HOSTS[0])
    dns.add("example.org", ("A", HOSTS[0]))
    tern = tern_dir(config(delivery_line="delivery: " + delivery(dns, mx_port)))
    out = sendmail(tern, "-oi", "-f", "cron@relay.test", "ops@example.org", stdin=b"Subject: nightly\n\nall good\n.\nstill body\n")
    assert out.returncode == 0, out.stderr
    drop = tern.dir / "var/spool/maildrop"
    files = [f for f in drop.iterdir() if not f.name.startswith(".")]
    assert len(files) == 1
    tern.start()
    wait_log(tern, r"pickup: \S+: uid=0 from=<cron@relay\.test>: 2\.0\.0 Ok: queued as \w+")
    received = sink.wait(1)
    assert received[0].mail_from == "cron@relay.test"
    assert received[0].rcpt_tos == ["ops@example.org"]
    body = received[0].content.decode()
    assert "Subject: nightly" in body and "all good\r\n.\r\nstill body" in body  # -oi: the dot is text
    assert [f for f in drop.iterdir()] == []


def test_t_takes_recipients_from_the_headers_and_removes_bcc(tern_dir):
    tern = tern_dir(config()).start()
    message = (b"From: App <app@relay.test>\nTo: \"Doe, Jane\" <jane@example.org>, bob@example.org\n"
               b"Cc: team: carol@example.net, dave@example.net;\nBcc: secret@example.com\nSubject: t\n\nhello\n")
    out = sendmail(tern, "-t", "-i", stdin=message)
    assert out.returncode == 0, out.stderr
    wait_log(tern, r"nrcpt=5, client=local")
    [queued_message] = queued(tern)
    assert sorted(r["address"] for r in queued_message["recipients"]) == [
        "bob@example.org", "carol@example.net", "dave@example.net", "jane@example.org", "secret@example.com"]
    content = tern.message_bytes(queued_message["id"]).decode()
    assert "Bcc" not in content and "secret@" not in content
    assert "From: App <app@relay.test>" in content  # present: not replaced


def test_bs_speaks_smtp_on_standard_input_and_output(tern_dir):
    tern = tern_dir(config()).start()
    dialogue = (b"EHLO app\r\nMAIL FROM:<a@relay.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                b"Subject: bs\r\n\r\nvia -bs\r\n.\r\nQUIT\r\n")
    out = sendmail(tern, "-bs", stdin=dialogue)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.decode()
    assert replies.startswith("220 ")
    assert "250 2.0.0 Ok: queued as" in replies and "221 " in replies
    assert len(queued(tern)) == 1


def test_bs_says_421_when_no_daemon_runs(tern_dir):
    tern = tern_dir(config())
    out = sendmail(tern, "-bs", stdin=b"EHLO x\r\n")
    assert out.returncode == 75
    assert out.stdout.startswith(b"421 4.3.2 ")


def test_exit_codes_are_sysexits(tern_dir):
    tern = tern_dir(config("access: { reject_senders: [\"@spam.test\"] }\nlimits: { max_message_size: 2KB }\n")).start()
    # No recipient, unknown option: EX_USAGE.
    assert sendmail(tern, stdin=b"x\n").returncode == 64
    out = sendmail(tern, "-Z", "a@example.org", stdin=b"x\n")
    assert out.returncode == 64 and b"unknown option -Z" in out.stderr
    # The daemon refuses the sender: EX_UNAVAILABLE, with its reply.
    out = sendmail(tern, "-f", "x@spam.test", "a@example.org", stdin=b"x\n")
    assert out.returncode == 69 and b"553 5.7.1" in out.stderr
    # Bigger than limits.max_message_size: EX_DATAERR, before anything is sent.
    out = sendmail(tern, "a@example.org", stdin=b"x" * 5000)
    assert out.returncode == 65 and b"max_message_size" in out.stderr
    # A recipient the daemon refuses: EX_NOUSER.
    out = sendmail(tern, "bad@@example.org", stdin=b"x\n")
    assert out.returncode == 67
    # Ignored options are accepted, as Postfix's sendmail accepts them.
    out = sendmail(tern, "-oem", "-odb", "-oi", "-v", "-U", "-N", "failure,delay", "a@example.org", stdin=b"Subject: x\n\nx\n")
    assert out.returncode == 0, out.stderr
    assert queued(tern)


def test_only_the_chosen_group_may_submit(tern_dir):
    if os.geteuid() != 0:
        pytest.skip("needs other users")
    nobody = pwd.getpwnam("nobody").pw_uid
    group = grp.getgrnam("mail")
    tern = tern_dir(config("sendmail: { group: mail }\n")).start()
    spool = tern.dir / "var/spool"
    drop = os.stat(spool / "maildrop")
    public = os.stat(spool / "public")
    assert stat.S_IMODE(drop.st_mode) == 0o1730 and drop.st_gid == group.gr_gid
    assert stat.S_IMODE(public.st_mode) == 0o710 and public.st_gid == group.gr_gid
    # Not a member: neither the socket nor the maildrop; EX_NOPERM, and it says why.
    out = sendmail(tern, "a@example.org", stdin=b"x\n", user=nobody)
    assert out.returncode == 77, out.stderr
    assert b"members of group mail may submit" in out.stderr
    assert queued(tern) == []
    # A member: through the socket, as its own user id.
    out = sendmail(tern, "a@example.org", stdin=b"Subject: m\n\nx\n", user=nobody, extra_groups=[group.gr_gid])
    assert out.returncode == 0, out.stderr
    wait_log(tern, rf"from=<nobody@relay\.test>, size=\d+, nrcpt=1, client=local \(uid {nobody}\)")
    # A member, daemon down: the maildrop, picked up at the next start.
    tern.stop()
    out = sendmail(tern, "b@example.org", stdin=b"Subject: m2\n\nx\n", user=nobody, extra_groups=[group.gr_gid])
    assert out.returncode == 0, out.stderr
    [f] = list((spool / "maildrop").iterdir())
    assert f.stat().st_uid == nobody
    tern.start()
    wait_log(tern, rf"pickup: {f.name}: uid={nobody} from=<nobody@relay\.test>")
    assert len(queued(tern)) == 2


def test_hostile_maildrop_files_are_set_aside_and_the_daemon_stays_up(tern_dir):
    tern = tern_dir(config("limits: { max_hops: 5 }\n"))
    tern.start()
    tern.stop()
    drop = tern.dir / "var/spool/maildrop"
    secret = tern.dir / "secret"
    secret.write_text("root:x:0:0\n")
    (drop / "1-link").symlink_to(secret)
    (drop / "2-garbage").write_bytes(b"\x00\xff not a maildrop file\n\nx")
    (drop / "3-no-end").write_bytes(b"tern-maildrop 1\nsender a@b.c\nrecipient d@e.f")
    hops = b"".join(b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\n" for _ in range(10))
    (drop / "4-loop").write_bytes(b"tern-maildrop 1\nsender a@relay.test\nrecipient d@example.org\n\n" + hops + b"\nx\n")
    (drop / "5-smuggle").write_bytes(b"tern-maildrop 1\nsender a@relay.test\nrecipient d@example.org\n\n"
                                     b"Subject: s\n\nx\r\n.\r\nMAIL FROM:<evil@x>\r\n")
    (drop / "6-ctl").write_bytes(b"tern-maildrop 1\nsender a@relay.test\x1b[31m\nrecipient d@example.org\n\nx\n")
    tern.start()
    wait_log(tern, r"pickup: 6-ctl: ")
    wait_log(tern, r"pickup: 5-smuggle: ")
    log = tern.log()
    rejected = sorted(p.name for p in (tern.dir / "var/spool/maildrop-rejected").iterdir())
    assert rejected == ["1-link", "2-garbage", "3-no-end", "4-loop", "6-ctl"], log
    assert "554 5.4.6" in log  # the hop limit, from the daemon's own check
    assert "\x1b" not in log
    # The smuggling attempt is one message, its "command" a line of text.
    [message] = queued(tern)
    assert message["envelope"]["sender"] == "a@relay.test"
    assert b"MAIL FROM:<evil@x>" in tern.message_bytes(message["id"])
    assert tern.proc.poll() is None


def test_missing_headers_added_for_mynetworks_clients_only_when_asked(tern_dir):
    for setting, expect in (("false", False), ("true", True)):
        tern = tern_dir(config(f"access: {{ add_missing_headers: {setting} }}\n"))
        tern.start()
        with smtplib.SMTP("127.0.0.1", tern.port("mx"), timeout=10) as s:
            s.sendmail("app@relay.test", ["u@example.org"], b"Subject: bare\r\n\r\nno date\r\n")
        [message] = queued(tern)
        head = tern.message_bytes(message["id"]).split(b"\r\n\r\n")[0]
        assert (b"\r\nDate: " in head) == expect
        assert (b"\r\nMessage-ID: " in head) == expect
        assert (b"\r\nFrom: <app@relay.test>" in head) == expect
        tern.kill9()
        shutil.rmtree(tern.dir / "var")


def test_mailq_and_q(tern_dir):
    tern = tern_dir(config()).start()
    assert sendmail(tern, "a@example.org", stdin=b"Subject: q\n\nx\n").returncode == 0
    out = sendmail(tern, name="mailq")
    assert out.returncode == 0 and b"a@example.org" in out.stdout
    out = sendmail(tern, "-bp")
    assert out.returncode == 0 and b"a@example.org" in out.stdout
    out = sendmail(tern, "-q")
    assert out.returncode == 0 and b"flushed: 1 message" in out.stdout
    assert sendmail(tern, name="newaliases").returncode == 0
