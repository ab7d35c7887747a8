"""A receiving server for the client tests: aiosmtpd requiring STARTTLS and AUTH.

usage: aiosmtpd_server.py PORT CERT KEY USER PASSWORD OUTDIR
Recipients starting with "soft" get 450 4.2.0, "hard" get 550 5.1.1. Each accepted message
is written to OUTDIR/<n>.eml with an X-Envelope line of sender and recipients first.
Prints "ready" when listening.
"""
import asyncio
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, user, password, outdir = sys.argv[1:7]
count = 0


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("soft"):
            return "450 4.2.0 mailbox busy"
        if local.startswith("hard"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        with open(f"{outdir}/{count}.eml", "wb") as f:
            f.write(f"X-Envelope: {envelope.mail_from} -> {','.join(envelope.rcpt_tos)}\r\n".encode())
            f.write(envelope.original_content)
        return "250 2.0.0 accepted"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user and auth_data.password.decode() == password
    # handled=False: aiosmtpd sends the 535 itself (its default assumes we replied).
    return AuthResult(success=ok, handled=False)


context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
controller = Controller(
    Handler(), hostname="127.0.0.1", port=int(port), tls_context=context, require_starttls=True,
    auth_required=True, authenticator=authenticator, auth_require_tls=True, decode_data=False,
)
controller.start()
print("ready", flush=True)
try:
    sys.stdin.read()  # runs until the test closes our stdin
finally:
    controller.stop()
