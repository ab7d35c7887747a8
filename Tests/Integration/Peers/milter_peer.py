"""A milter built on libmilter (pymilter) for the bridge's tests. It acts on the Subject:

  reject      550 5.7.1 with its own text     tempfail   451 (libmilter's default)
  custom      554 5.7.0 custom text            discard    accept, then drop
  quarantine  hold the message                 edit       change headers, body, sender, recipients
  anything else: continue, untouched. Every macro it sees is appended to MACROS_FILE.
At the command stages: HELO evil.example, MAIL from spammer@…, RCPT to refused@… get 550;
RCPT to later@… gets 451.

usage: milter_peer.py SOCKET MACROS_FILE     (prints "ready" when listening)
"""
import sys

import Milter

socket, macros_file = sys.argv[1:3]
WANTED = ["j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}", "{client_name}", "{client_port}", "i", "{auth_type}",
          "{auth_authen}", "{mail_addr}", "{rcpt_addr}", "{tls_version}"]


class TestMilter(Milter.Base):
    def __init__(self):
        self.subject = ""
        self.seen = {}

    def note(self):
        for m in WANTED:
            v = self.getsymval(m)
            if v is not None:
                self.seen[m] = v

    def connect(self, hostname, family, hostaddr):
        self.note()
        self.seen["connect_addr"] = hostaddr[0] if hostaddr else ""
        return Milter.CONTINUE

    def hello(self, name):
        self.note()
        self.seen["helo"] = name
        if name == "evil.example":
            self.setreply("550", "5.7.1", "Not you, said the milter at HELO")
            return Milter.REJECT
        return Milter.CONTINUE

    def envfrom(self, sender, *args):
        self.note()
        self.seen["mail"] = sender
        self.seen["rcpts"] = []
        if sender.startswith("<spammer@"):
            self.setreply("550", "5.7.1", "Sender refused by the milter")
            return Milter.REJECT
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *args):
        self.note()
        self.seen.setdefault("rcpts", []).append(rcpt)
        if rcpt.startswith("<refused@"):
            self.setreply("550", "5.1.1", "No such user here, said the milter")
            return Milter.REJECT
        if rcpt.startswith("<later@"):
            self.setreply("451", "4.2.1", "Mailbox busy, said the milter")
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def header(self, name, value):
        if name.lower() == "subject":
            self.subject = value.strip()
        return Milter.CONTINUE

    def eom(self):
        self.note()
        with open(macros_file, "a") as f:
            f.write(repr(self.seen) + "\n")
        s = self.subject
        if s == "reject":
            self.setreply("550", "5.7.1", "Go away, said the milter")
            return Milter.REJECT
        if s == "tempfail":
            return Milter.TEMPFAIL
        if s == "custom":
            self.setreply("554", "5.7.0", "Custom refusal text")
            return Milter.REJECT
        if s == "discard":
            return Milter.DISCARD
        if s == "quarantine":
            self.quarantine("looks suspicious")
            return Milter.ACCEPT
        if s == "edit":
            self.addheader("X-Added", "yes")
            self.addheader("X-Inserted-First", "top", 0)
            self.chgheader("X-Change", 1, "new value")
            self.chgheader("X-Delete", 1, "")
            self.replacebody(b"replaced body\r\n")
            self.chgfrom("<new-sender@example.net>")
            self.addrcpt("<added@example.org>")
            self.delrcpt("<removed@example.org>")
            return Milter.ACCEPT
        return Milter.CONTINUE


Milter.factory = TestMilter
Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT | Milter.DELRCPT | Milter.CHGFROM
                 | Milter.QUARANTINE)
print("ready", flush=True)
Milter.runmilter("tern-test", socket, timeout=30)
