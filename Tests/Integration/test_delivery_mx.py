"""Direct MX delivery against a DNS server and receiving servers on loopback."""
import re

import pytest

from peers import delivery, dsn_parts, send, wait_empty, wait_log

def test_preference_order_and_log_line(make_tern, dns, mx_port, sinks):
    dns.add("pref.example", ("MX", 20, "mx2.pref.example"), ("MX", 10, "mx1.pref.example"))
    dns.add("mx1.pref.example", ("A", "127.0.0.11"))
    dns.add("mx2.pref.example", ("A", "127.0.0.12"))
    first, second = sinks("127.0.0.11"), sinks("127.0.0.12")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["a@pref.example", "b@pref.example"])
    [m] = first.wait(1)
    assert m.rcpt_tos == ["a@pref.example", "b@pref.example"], "one transaction for both recipients of the same next hop"
    assert m.mail_from == "app@client.example"
    assert b"Received: from client" in m.content or b"Received:" in m.content
    assert second.received == []
    line = wait_log(tern, r"(\w{16}): to=<a@pref\.example>, relay=mx1\.pref\.example\[127\.0\.0\.11\]:\d+, delay=[\d.]+, "
                          r"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 accepted\)")
    wait_log(tern, line.group(1) + r": removed")
    wait_empty(tern)


def test_second_mx_when_first_is_down(make_tern, dns, mx_port, sinks):
    dns.add("fall.example", ("MX", 10, "mx1.fall.example"), ("MX", 20, "mx2.fall.example"))
    dns.add("mx1.fall.example", ("A", "127.0.0.11"))  # nothing listens there
    dns.add("mx2.fall.example", ("A", "127.0.0.12"))
    backup = sinks("127.0.0.12")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["x@fall.example"])
    [m] = backup.wait(1)
    assert m.rcpt_tos == ["x@fall.example"]
    wait_log(tern, r"to=<x@fall\.example>, relay=mx2\.fall\.example\[127\.0\.0\.12\]")


def test_soft_failure_at_first_mx_moves_on(make_tern, dns, mx_port, sinks):
    dns.add("soft.example", ("MX", 10, "mx1.soft.example"), ("MX", 20, "mx2.soft.example"))
    dns.add("mx1.soft.example", ("A", "127.0.0.11"))
    dns.add("mx2.soft.example", ("A", "127.0.0.12"))
    first, second = sinks("127.0.0.11"), sinks("127.0.0.12")
    first.replies["busy@soft.example"] = "451 4.3.0 try another"
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["busy@soft.example", "fine@soft.example"])
    second.wait(1)
    assert first.recipients() == ["fine@soft.example"]
    assert second.recipients() == ["busy@soft.example"]


def test_implicit_mx(make_tern, dns, mx_port, sinks):
    dns.add("plain.example", ("A", "127.0.0.13"))
    host = sinks("127.0.0.13")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["u@plain.example"])
    assert host.wait(1)[0].rcpt_tos == ["u@plain.example"]


@pytest.mark.parametrize("domain,records,status", [
    ("nullmx.example", [("MX", 0, ".")], "5.1.10"),
    ("nosuch.example", None, "5.1.2"),
])
def test_null_mx_and_nxdomain_bounce(make_tern, dns, mx_port, sinks, domain, records, status):
    if records:
        dns.add(domain, *records)
    dns.add("client.example", ("MX", 10, "mx.client.example"))
    dns.add("mx.client.example", ("A", "127.0.0.14"))
    sender_side = sinks("127.0.0.14")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", [f"u@{domain}"])
    [bounce] = sender_side.wait(1)
    assert bounce.mail_from in ("", "<>"), "a bounce is sent from the null sender"
    assert bounce.rcpt_tos == ["app@client.example"]
    per_message, per_recipient, parts = dsn_parts(bounce)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_recipient[0]["Final-Recipient"] == f"rfc822; u@{domain}"
    assert per_recipient[0]["Action"] == "failed"
    assert per_recipient[0]["Status"] == status
    wait_log(tern, rf"to=<u@{re.escape(domain)}>, relay=none, .*dsn={re.escape(status)}, status=bounced")
    wait_empty(tern)


def test_servfail_defers(make_tern, dns, mx_port):
    dns.zone.servfail.add("broken.example")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["u@broken.example"])
    wait_log(tern, r"to=<u@broken\.example>, relay=none, .*dsn=4\.4\.3, status=deferred")
    [queued] = tern.queue()
    [r] = queued["recipients"]
    assert r["state"] == "deferred" and r["attempts"] >= 1 and "SERVFAIL" in r["last_error"]


def test_dsn_parameters_are_passed_on(make_tern, dns, mx_port, sinks):
    dns.add("dsn.example", ("A", "127.0.0.13"))
    host = sinks("127.0.0.13")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", ["u@dsn.example"], options=["NOTIFY=SUCCESS,FAILURE"])
    assert host.wait(1)[0].rcpt_tos == ["u@dsn.example"]


@pytest.mark.parametrize("domain", ["corp.test", "mail.home.arpa"])
def test_reserved_names_are_asked_of_the_configured_server(make_tern, dns, mx_port, sinks, domain):
    """libunbound answered NXDOMAIN itself for .test and .home.arpa, so a private network's
    internal domains could not be reached even when the configured server had them."""
    dns.add(domain, ("MX", 10, f"mx.{domain}"))
    dns.add(f"mx.{domain}", ("A", "127.0.0.11"))
    host = sinks("127.0.0.11")
    tern = make_tern(delivery=delivery(dns, mx_port))
    send(tern, "app@client.example", [f"u@{domain}"])
    assert host.wait(1)[0].rcpt_tos == [f"u@{domain}"]


def test_smarthost_name_goes_through_the_configured_resolver(make_tern, dns, mx_port, sinks):
    dns.add("relay.corp.test", ("A", "127.0.0.12"))
    host = sinks("127.0.0.12")
    routes = ("routes:\n  - name: upstream\n    domains: [\"*\"]\n    transport: smarthost\n"
              f"    smarthost: {{ host: relay.corp.test, port: {mx_port}, tls: none }}\n")
    tern = make_tern(delivery=delivery(dns, mx_port), extra=routes)
    send(tern, "app@client.example", ["someone@anywhere.example"])
    assert host.wait(1)[0].rcpt_tos == ["someone@anywhere.example"]
    wait_log(tern, r"to=<someone@anywhere\.example>, relay=relay\.corp\.test\[127\.0\.0\.12\]:\d+, .*status=sent")
