import XCTest

@testable import TernCore

final class LogReportTests: XCTestCase {
    func testBothStylesAndSyslog() {
        let lines = [
            "2026-11-27T10:00:00.000Z tern[7]: info: Q1: from=<a@x.example>, size=100, nrcpt=1, client=[10.0.0.1]:5",
            "Nov 27 10:00:01 relay tern/smtp[7]: Q1: to=<b@Y.example>, relay=mx.y.example[10.0.0.9]:25, delay=1.5, delays=0/0/0/1.5, dsn=2.0.0, status=sent (250 ok) lane=provider:y",
            "2026-11-27T10:00:02+00:00 relay tern/smtpd[7]: NOQUEUE: reject: RCPT from unknown[10.0.0.2]: 554 5.7.1 <c@z.example>: Relay access denied; from=<a@x.example> to=<c@z.example> proto=ESMTP helo=<h>",
            "2026-11-27T10:00:03.000Z tern[7]: info: Q2: to=<d@w.example>, relay=none, delay=0.2, delays=0/0/0/0, dsn=4.4.1, status=deferred (X-Tern; connection failed: refused)",
            "2026-11-27T10:00:04.000Z tern[7]: info: Q2: to=<d@w.example>, relay=none, delay=3, delays=0/0/0/0, dsn=4.4.1, status=deferred (X-Tern; connection failed: refused)",
            "2026-11-27T10:00:05.000Z tern[7]: info: Q3: connect to smtp.example[10.0.0.3]:587 failed at auth: 535 5.7.8 bad",
            "Nov 27 10:00:06 relay postfix/smtp[9]: Q9: to=<e@v.example>, relay=x, delay=1, status=sent (ok)",
            "2026-11-28T10:00:00.000Z tern[7]: info: Q4: from=<late@x.example>, size=1, nrcpt=1, client=[10.0.0.1]:5",
        ]
        var start = tm()
        start.tm_year = 126
        start.tm_mon = 10
        start.tm_mday = 27
        start.tm_isdst = -1
        let from = Int64(mktime(&start)) - 86400  // a wide window around the syslog lines' local time
        let to = Int64(timegm(&start)) + 86400 - 1
        let r = LogReport(lines: lines, from: from, to: to)
        XCTAssertEqual(r.received, 1)
        XCTAssertEqual(r.receivedBytes, 100)
        XCTAssertEqual(r.delivered, 1)
        XCTAssertEqual(r.deferrals, 2)
        XCTAssertEqual(r.deferredMessages, 1)
        XCTAssertEqual(r.rejected, 1)
        XCTAssertEqual(r.rejectReasons, [.init(name: "RCPT 554 5.7.1 Relay access denied", count: 1)])
        XCTAssertEqual(r.byLane.first { $0.name == "provider:y" }?.sent, 1)
        XCTAssertEqual(r.byDomain.first { $0.name == "y.example" }?.maxDelay, 1.5)
        XCTAssertEqual(r.upstreamAuthFailures, [.init(name: "smtp.example[10.0.0.3]:587", count: 1)])
        XCTAssertEqual(r.topRecipients.map(\.name), ["b@y.example"])  // Postfix's own lines are not Tern's
    }

    func testTimestamps() {
        XCTAssertEqual(LogReport.parseISO("1970-01-01T00:01:00.5Z"), 60)
        XCTAssertEqual(LogReport.parseISO("1970-01-01T01:00:00+01:00"), 0)
        XCTAssertNil(LogReport.parseISO("yesterday"))
        XCTAssertNil(LogReport.split("garbage without a timestamp", year: 2026))
    }
}
