"""DNS for bench/lanes.sh, on 127.0.0.1: d<N>.bench.example has MX mx.p<N % 20>.sites.example,
and every host under sites.example is 127.0.0.1.   usage: dns_sites.py PORT"""
import sys
import time

from dnslib import MX, QTYPE, RCODE, RR, SOA, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Sites(BaseResolver):
    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if name.endswith(".bench.example") and name.startswith("d") and qtype == "MX":
            n = int(name.split(".")[0][1:])
            reply.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MX(f"mx.p{n % 20}.sites.example"), ttl=3600))
        elif name.endswith(".sites.example") and qtype == "A":
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=3600))
        elif not (name.endswith(".bench.example") or name.endswith(".sites.example")):
            reply.header.rcode = RCODE.NXDOMAIN
        if not reply.rr:
            # An SOA with the negative answer lets resolvers cache it (RFC 2308), as real
            # servers do; without it every AAAA lookup would come back here.
            reply.add_auth(RR("example.", QTYPE.SOA, rdata=SOA("ns.example.", "hostmaster.example.", (1, 3600, 600, 86400, 3600)), ttl=3600))
        return reply


port = int(sys.argv[1])
quiet = DNSLogger(logf=lambda s: None)
for tcp in (False, True):
    DNSServer(Sites(), port=port, address="127.0.0.1", tcp=tcp, logger=quiet).start_thread()
print("ready", flush=True)
while True:
    time.sleep(3600)
