import HeaderRewrite
import TernCore
import XCTest

final class HeaderBlockTests: XCTestCase {
    func testParsesFoldedHeadersAndRoundTrips() {
        let message = Array(
            "Received: from app1 (app1 [10.0.0.5])\r\n\tby relay; Sun, 22 Nov 2026\r\nSubject: hi\r\nX-Long: a\r\n b\r\n\r\nbody\r\n".utf8)
        let (block, offset) = HeaderBlock.parse(message)
        XCTAssertEqual(block.fields.map(\.name), ["Received", "Subject", "X-Long"])
        XCTAssertEqual(block.fields[2].value, "a b")
        XCTAssertEqual(String(decoding: message[offset...], as: UTF8.self), "body\r\n")
        XCTAssertEqual(block.serialized + Array(message[offset...]), message, "untouched headers are written back byte for byte")
    }

    func testNoBodyAndNoHeaders() {
        let (block, offset) = HeaderBlock.parse(Array("Subject: x\r\n".utf8))
        XCTAssertEqual(block.fields.count, 1)
        XCTAssertEqual(offset, 12)
        let (empty, bodyAt) = HeaderBlock.parse(Array("\r\njust a body\r\n".utf8))
        XCTAssertEqual(empty.fields, [])
        XCTAssertEqual(bodyAt, 2)
    }
}

final class HeaderRewriteTests: XCTestCase {
    func defaults(stripXMailer: Bool = false) throws -> HeaderRewriteFilter {
        HeaderRewriteFilter(name: "hr", rules: try HeaderRewriteFilter.defaultRules(stripXMailer: stripXMailer))
    }

    func rewrite(_ filter: HeaderRewriteFilter, _ headers: String) -> String {
        let (block, _) = HeaderBlock.parse(Array((headers + "\r\n").utf8))
        return String(decoding: filter.rewrite(block).serialized.dropLast(2), as: UTF8.self)
    }

    func testDefaultRulesDropOnlyPrivateReceivedLines() throws {
        let input = [
            "Received: from mx.partner.example (mx.partner.example [198.51.100.7])\r\n\tby relay.example; Sun, 22 Nov 2026 10:00:00 +0000",
            "Received: from app1 (app1 [10.1.2.3])\r\n\tby relay.example; Sun, 22 Nov 2026 10:00:00 +0000",
            "Received: from web (web [192.168.7.1]) by gw",
            "Received: from cron (localhost [127.0.0.1]) by gw",
            "Received: from v6 (v6 [IPv6:fd12:3456::1]) by gw",
            "Received: from dock (dock [172.20.0.2]) by gw",
            "Received: from edge (edge [172.32.0.2]) by gw",
            "X-Originating-IP: [10.0.0.9]",
            "X-PHP-Originating-Script: 33:mailer.php",
            "X-Mailer: PHPMailer 6",
            "Subject: 10.0.0.1 is not a Received line",
        ].map { $0 + "\r\n" }.joined()
        let out = rewrite(try defaults(), input)
        XCTAssertEqual(
            out,
            [
                "Received: from mx.partner.example (mx.partner.example [198.51.100.7])\r\n\tby relay.example; Sun, 22 Nov 2026 10:00:00 +0000",
                "Received: from edge (edge [172.32.0.2]) by gw",
                "X-Mailer: PHPMailer 6",
                "Subject: 10.0.0.1 is not a Received line",
            ].map { $0 + "\r\n" }.joined())
        XCTAssertFalse(rewrite(try defaults(stripXMailer: true), input).contains("X-Mailer"))
    }

    func testMessageWithNothingToStripPassesByteIdentical() throws {
        let headers = "From: a@example.com\r\nTo: b@example.org\r\nSubject:  spaced  \r\nX-Folded: one\r\n  two\r\n"
        XCTAssertEqual(rewrite(try defaults(), headers), headers)
    }

    func testOwnRulesReplacePrependAppendAndComeFirst() throws {
        let filter = HeaderRewriteFilter(
            name: "hr",
            rules: [
                try .init(pattern: "^X-Env:", action: .replace, with: "X-Env: production"),
                try .init(pattern: "^Subject:", action: .prepend, with: "X-Seen: yes"),
                try .init(pattern: "^To:", action: .append, with: "X-After-To: 1"),
                try .init(pattern: "(?i)^received:", action: .remove),
            ])
        let out = rewrite(filter, "Received: from public\r\nX-Env: staging\r\nTo: b@example.org\r\nSubject: s\r\n")
        XCTAssertEqual(out, "X-Env: production\r\nTo: b@example.org\r\nX-After-To: 1\r\nX-Seen: yes\r\nSubject: s\r\n")
    }

    func testConfigNamesTheBadRule() {
        let registry = FilterRegistry([FilterRegistry.plugin(HeaderRewritePlugin.self)])
        let base = "listeners:\n  - { name: mx, kind: smtp, address: \"127.0.0.1:2525\" }\nfilters:\n"
        for (yaml, expected) in [
            ("  - { name: hr, type: header_rewrite, settings: { rules: [ { match: \"(unclosed\" } ] } }\n", "filters[0].settings.rules[0].match"),
            ("  - { name: hr, type: header_rewrite, settings: { rules: [ { match: \"^A:\", action: replace } ] } }\n", "filters[0].settings.rules[0].with: is required"),
            ("  - { name: hr, type: header_rewrite, settings: { rules: [ { match: \"^A:\", action: replace, with: \"no colon\" } ] } }\n", "filters[0].settings.rules[0].with"),
            ("  - { name: hr, type: header_rewrite, settings: { rulez: [] } }\n", "filters[0].settings.rulez: unknown key"),
            ("  - { name: hr, type: spamfilter }\n", "unknown filter type 'spamfilter' (known: header_rewrite)"),
            ("  - { name: hr, type: header_rewrite, listeners: [submission] }\n", "no listener is named 'submission'"),
        ] {
            XCTAssertThrowsError(try ConfigLoader.parse(base + yaml, file: "t.yaml", plugins: registry), yaml) {
                XCTAssertTrue("\($0)".contains(expected), "\($0) should say \(expected)")
            }
        }
        XCTAssertNoThrow(try ConfigLoader.parse(base + "  - { name: hr, type: header_rewrite }\n", file: "t.yaml", plugins: registry))
    }
}
