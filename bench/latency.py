#!/usr/bin/env python3
"""Accept-to-delivered latency from a relay's log: p50, p99 and max in milliseconds.

    bench/latency.py tern LOG      # Tern's log (style tern, level info): from the first
                                   # line naming a queue id (written once the message is
                                   # committed, just before the 250) to its status=sent line;
                                   # timestamps to the millisecond
    bench/latency.py postfix LOG   # Postfix's maillog_file: the delay= of each status=sent
                                   # line (Postfix's own accept-to-delivered figure, which
                                   # it prints to two significant digits)
"""
import re
import sys
from datetime import datetime


def percentiles(values):
    if not values:
        return "no deliveries in the log"
    values.sort()
    def at(p):
        return values[min(len(values) - 1, int(p * len(values)))]
    return f"p50 {at(0.50):.1f} ms, p99 {at(0.99):.1f} ms, max {values[-1]:.1f} ms ({len(values)} messages)"


def tern(path):
    line_re = re.compile(r"^(\S+Z) tern\[\d+\]: \w+: ([0-9A-Z]{16}): (.*)$")
    first, delays = {}, []
    for line in open(path, errors="replace"):
        m = line_re.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
        qid = m.group(2)
        first.setdefault(qid, when)
        if "status=sent" in m.group(3):
            delays.append((when - first[qid]) * 1000)
    return delays


def postfix(path):
    delays = []
    for line in open(path, errors="replace"):
        if "status=sent" in line:
            m = re.search(r"\bdelay=([0-9.]+)", line)
            if m:
                delays.append(float(m.group(1)) * 1000)
    return delays


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    print(percentiles(tern(path) if kind == "tern" else postfix(path)))
