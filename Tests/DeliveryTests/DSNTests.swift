import Foundation
import SMTPProtocol
import XCTest

@testable import Delivery

final class DSNTests: XCTestCase {
    private let original = Array("Received: from app\r\nFrom: app@client.test\r\nTo: u@example.org\r\nSubject: hello\r\n\r\nbody line\r\n".utf8)

    private func dsn(headersOnly: Bool = false, limit: Int = 50_000) -> [UInt8] {
        DeliveryStatusNotification(
            reportingMTA: "relay.test", queueID: "1K0W15WRXSV00000", envelopeSender: "app@client.test", envid: "QQ314",
            arrivalDate: "Sun, 22 Nov 2026 16:52:00 +0000", date: "Sun, 22 Nov 2026 17:52:00 +0000",
            recipients: [
                .init(
                    finalRecipient: "u@example.org", originalRecipient: OriginalRecipient(addressType: "rfc822", address: "U@Example.org"),
                    action: .failed, status: EnhancedStatusCode(5, 1, 1), remoteMTA: "dns; mx.example.org",
                    diagnostic: "smtp; 550 5.1.1 <u@example.org>: no such user\r\nsecond line"),
                .init(finalRecipient: "用户@例子.广告", action: .failed, status: EnhancedStatusCode(5, 4, 1), diagnostic: "X-Tern; connection failed: refused"),
            ],
            returnHeadersOnly: headersOnly, returnLimit: limit
        ).render(original: original, boundary: "1K0W15WRXSV00000/relay.test", messageID: "dsn.1K0W15WRXSV00000@relay.test")
    }

    /// Parses the notification with Python's email package, a real RFC 3464 reader, and
    /// returns what it found as JSON.
    private func parse(_ message: [UInt8]) throws -> [String: Any] {
        let script = """
            import email, json, sys
            from email import policy
            m = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
            parts = m.get_payload()
            status = parts[1].get_payload()
            out = {
              "type": m.get_content_type(), "report_type": m.get_param("report-type"),
              "to": m["To"], "from": m["From"], "auto": m["Auto-Submitted"],
              "parts": [p.get_content_type() for p in parts],
              "per_message": {k: str(v) for k, v in status[0].items()},
              "per_recipient": [{k: str(v) for k, v in s.items()} for s in status[1:]],
              "defects": [str(d) for d in m.defects],
            }
            r = parts[2].get_payload()
            out["returned"] = r[0]["Subject"] if isinstance(r, list) else r
            print(json.dumps(out))
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script]
        let input = Pipe()
        let output = Pipe()
        process.standardInput = input
        process.standardOutput = output
        try process.run()
        input.fileHandleForWriting.write(Data(message))
        try input.fileHandleForWriting.close()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    func testParsesAsRFC3464() throws {
        let parsed = try parse(dsn())
        XCTAssertEqual(parsed["type"] as? String, "multipart/report")
        XCTAssertEqual(parsed["report_type"] as? String, "delivery-status")
        XCTAssertEqual(parsed["parts"] as? [String], ["text/plain", "message/delivery-status", "message/rfc822"])
        XCTAssertEqual(parsed["to"] as? String, "<app@client.test>")
        XCTAssertEqual(parsed["auto"] as? String, "auto-replied")
        XCTAssertEqual(parsed["defects"] as? [String], [])
        let perMessage = try XCTUnwrap(parsed["per_message"] as? [String: String])
        XCTAssertEqual(perMessage["Reporting-MTA"], "dns; relay.test")
        XCTAssertEqual(perMessage["Original-Envelope-Id"], "QQ314")
        let recipients = try XCTUnwrap(parsed["per_recipient"] as? [[String: String]])
        XCTAssertEqual(recipients.count, 2)
        XCTAssertEqual(recipients[0]["Final-Recipient"], "rfc822; u@example.org")
        XCTAssertEqual(recipients[0]["Original-Recipient"], "rfc822; U@Example.org")
        XCTAssertEqual(recipients[0]["Action"], "failed")
        XCTAssertEqual(recipients[0]["Status"], "5.1.1")
        XCTAssertEqual(recipients[0]["Diagnostic-Code"], "smtp; 550 5.1.1 <u@example.org>: no such user  second line")
        XCTAssertEqual(recipients[1]["Final-Recipient"], #"utf-8; \x{7528}\x{6237}@\x{4F8B}\x{5B50}.\x{5E7F}\x{544A}"#)
        XCTAssertEqual(parsed["returned"] as? String, "hello")
    }

    func testReturnsHeadersOnlyWhenAskedOrTooBig() throws {
        for message in [dsn(headersOnly: true), dsn(limit: 10)] {
            let parsed = try parse(message)
            XCTAssertEqual((parsed["parts"] as? [String])?.last, "text/rfc822-headers")
            let text = String(decoding: message, as: UTF8.self)
            XCTAssertTrue(text.contains("Subject: hello\r\n"))
            XCTAssertFalse(text.contains("body line"))
        }
    }
}
