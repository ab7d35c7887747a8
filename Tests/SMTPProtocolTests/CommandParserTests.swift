import XCTest

@testable import SMTPProtocol

/// Fixture tests for the command grammar: input line, expected command or expected error.
final class CommandParserTests: XCTestCase {
    private func parse(_ line: String) throws(SMTPParseError) -> SMTPCommand {
        try SMTPCommandParser.parse(Array(line.utf8))
    }

    private func assertParses(_ line: String, _ expected: SMTPCommand, file: StaticString = #filePath, line l: UInt = #line) {
        do {
            let command = try parse(line)
            XCTAssertEqual(command, expected, line, file: file, line: l)
        } catch {
            XCTFail("\(line): \(error)", file: file, line: l)
        }
    }

    private func assertFails(_ line: String, _ kind: SMTPParseError.Kind, file: StaticString = #filePath, line l: UInt = #line) {
        do {
            let command = try parse(line)
            XCTFail("\(line) parsed as \(command)", file: file, line: l)
        } catch {
            XCTAssertEqual(error.kind, kind, "\(line): \(error)", file: file, line: l)
        }
    }

    private func mailbox(_ local: String, _ domain: String, literal: Bool = false) -> Mailbox {
        Mailbox(localPart: local, domain: domain, isAddressLiteral: literal)
    }

    func testSimpleVerbs() {
        assertParses("EHLO client.example.com", .ehlo("client.example.com"))
        assertParses("ehlo   [127.0.0.1]  ", .ehlo("[127.0.0.1]"))
        assertParses("HELO x", .helo("x"))
        assertParses("DATA", .data)
        assertParses("data ", .data)
        assertParses("RSET", .rset)
        assertParses("QUIT", .quit)
        assertParses("NOOP", .noop)
        assertParses("NOOP anything at all", .noop)
        assertParses("STARTTLS", .startTLS)
        assertParses("VRFY root", .vrfy("root"))
        assertParses("EXPN staff", .expn("staff"))
        assertParses("HELP", .help(nil))
        assertParses("HELP MAIL", .help("MAIL"))
        assertParses("BDAT 1000", .bdat(size: 1000, last: false))
        assertParses("BDAT 0 LAST", .bdat(size: 0, last: true))
        assertParses("AUTH PLAIN", .auth(mechanism: "PLAIN", initialResponse: nil))
        assertParses("auth plain AGEAYg==", .auth(mechanism: "PLAIN", initialResponse: "AGEAYg=="))
        assertParses("AUTH LOGIN =", .auth(mechanism: "LOGIN", initialResponse: ""))
    }

    func testMalformedVerbs() {
        assertFails("", .unknownCommand)
        assertFails("FROB", .unknownCommand)
        assertFails("MAIL1 FROM:<a@b>", .unknownCommand)
        assertFails("EHLO", .syntax)
        assertFails("EHLO a b", .syntax)
        assertFails("DATA now", .syntax)
        assertFails("QUIT please", .syntax)
        assertFails("STARTTLS x", .syntax)
        assertFails("VRFY", .syntax)
        assertFails("BDAT", .syntax)
        assertFails("BDAT x", .syntax)
        assertFails("BDAT 10 FIRST", .syntax)
        assertFails("BDAT 99999999999999999999", .syntax)
        assertFails("AUTH", .syntax)
        assertFails("AUTH PLAIN not*base64", .syntax)
        assertFails("NOOP \u{0}", .syntax)
        assertFails("EHLO a\u{7}", .syntax)
    }

    func testMailPaths() {
        assertParses("MAIL FROM:<a@example.com>", .mail(.mailbox(mailbox("a", "example.com")), MailParameters()))
        assertParses("MAIL FROM:<>", .mail(.null, MailParameters()))
        assertParses("mail from: <a@example.com>", .mail(.mailbox(mailbox("a", "example.com")), MailParameters()))
        assertParses("MAIL FROM:a@example.com", .mail(.mailbox(mailbox("a", "example.com")), MailParameters()))
        assertParses(#"MAIL FROM:<"john smith"@example.com>"#, .mail(.mailbox(mailbox(#""john smith""#, "example.com")), MailParameters()))
        assertParses(#"MAIL FROM:<"a\"b"@example.com>"#, .mail(.mailbox(mailbox(#""a\"b""#, "example.com")), MailParameters()))
        assertParses("MAIL FROM:<a.b+tag@sub.example.com>", .mail(.mailbox(mailbox("a.b+tag", "sub.example.com")), MailParameters()))
        assertParses("MAIL FROM:<a@[192.0.2.1]>", .mail(.mailbox(mailbox("a", "[192.0.2.1]", literal: true)), MailParameters()))
        assertParses("MAIL FROM:<a@[IPv6:2001:db8::1]>", .mail(.mailbox(mailbox("a", "[IPv6:2001:db8::1]", literal: true)), MailParameters()))
        assertParses("MAIL FROM:<a@[x-tag:stuff]>", .mail(.mailbox(mailbox("a", "[x-tag:stuff]", literal: true)), MailParameters()))
        // Source routes are accepted and ignored (RFC 5321 Appendix C).
        assertParses("MAIL FROM:<@relay1.example,@relay2.example:a@example.com>", .mail(.mailbox(mailbox("a", "example.com")), MailParameters()))
    }

    func testMalformedMailPaths() {
        for bad in [
            "MAIL FROM:<a@>", "MAIL FROM:<@example.com>", "MAIL FROM:<a@example..com>", "MAIL FROM:<a..b@example.com>",
            "MAIL FROM:<.a@example.com>", "MAIL FROM:<a@-example.com>", "MAIL FROM:<a@example-.com>", "MAIL FROM:<a@example.com",
            "MAIL FROM:<a b@example.com>", #"MAIL FROM:<"unterminated@example.com>"#, "MAIL FROM:<a@[300.0.0.1]>",
            "MAIL FROM:<a@[IPv6:zz::1]>", "MAIL FROM:<a@[1.2.3]>", "MAIL FROM:", "MAIL FROM:<@a.example:>",
            "MAIL FROM:<" + String(repeating: "a", count: 65) + "@example.com>",
            "MAIL FROM:<a@" + String(repeating: "b", count: 64) + ".com>",
            "MAIL FROM:<a@" + Array(repeating: "abcdefghij", count: 26).joined(separator: ".") + ">",
        ] {
            assertFails(bad, .badSender)
        }
        assertFails("MAIL TO:<a@example.com>", .syntax)
        assertFails("MAIL FROM:<a@example.com>x", .syntax)
    }

    func testRcpt() {
        assertParses("RCPT TO:<u@example.org>", .rcpt(.mailbox(mailbox("u", "example.org")), RcptParameters()))
        assertParses("RCPT TO:<Postmaster>", .rcpt(.postmaster, RcptParameters()))
        assertParses("RCPT TO:<postmaster@example.org>", .rcpt(.mailbox(mailbox("postmaster", "example.org")), RcptParameters()))
        assertFails("RCPT TO:<>", .badRecipient)
        assertFails("RCPT TO:<u@@example.org>", .badRecipient)
        assertFails("RCPT FROM:<u@example.org>", .syntax)
    }

    func testSMTPUTF8Addresses() throws {
        let command = try parse("MAIL FROM:<jörg@bücher.example> SMTPUTF8")
        guard case .mail(.mailbox(let m), let p) = command else { return XCTFail("\(command)") }
        XCTAssertEqual(m.localPart, "jörg")
        XCTAssertEqual(m.domain, "bücher.example")
        XCTAssertTrue(m.requiresSMTPUTF8)
        XCTAssertTrue(p.smtpUTF8)
        assertParses("RCPT TO:<用户@例子.广告>", .rcpt(.mailbox(mailbox("用户", "例子.广告")), RcptParameters()))
        // Invalid UTF-8 is refused.
        XCTAssertThrowsError(try SMTPCommandParser.parse(Array("MAIL FROM:<a".utf8) + [0xC3, 0x28] + Array("@b.example>".utf8)))
    }

    func testMailParameters() throws {
        var expected = MailParameters()
        expected.size = 12345
        expected.body = .eightBitMIME
        expected.smtpUTF8 = true
        expected.ret = .headers
        expected.envid = "QQ+1 x"
        expected.auth = "<>"
        assertParses(
            "MAIL FROM:<a@b.example> SIZE=12345 body=8bitmime SMTPUTF8 RET=HDRS ENVID=QQ+2B1+20x AUTH=<>",
            .mail(.mailbox(mailbox("a", "b.example")), expected))
        assertFails("MAIL FROM:<a@b.example> SIZE=", .badParameter)
        assertFails("MAIL FROM:<a@b.example> SIZE=12a", .badParameter)
        assertFails("MAIL FROM:<a@b.example> SIZE=1 SIZE=2", .badParameter)
        assertFails("MAIL FROM:<a@b.example> BODY=9BIT", .badParameter)
        assertFails("MAIL FROM:<a@b.example> RET=ALL", .badParameter)
        assertFails("MAIL FROM:<a@b.example> ENVID=bad+zz", .badParameter)
        assertFails("MAIL FROM:<a@b.example> ENVID=" + String(repeating: "x", count: 101), .badParameter)
        assertFails("MAIL FROM:<a@b.example> SMTPUTF8=yes", .badParameter)
        assertFails("MAIL FROM:<a@b.example> XFOO=1", .unknownParameter)
        assertFails("MAIL FROM:<a@b.example> -X=1", .badParameter)
        // A size beyond Int still parses, as "too big".
        guard case .mail(_, let p) = try parse("MAIL FROM:<a@b.example> SIZE=99999999999999999999") else { return XCTFail() }
        XCTAssertEqual(p.size, Int.max)
    }

    func testRcptParameters() {
        var expected = RcptParameters()
        expected.notify = [.success, .delay]
        expected.orcpt = OriginalRecipient(addressType: "rfc822", address: "u@example.org")
        assertParses("RCPT TO:<u@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u+40example.org", .rcpt(.mailbox(mailbox("u", "example.org")), expected))
        var never = RcptParameters()
        never.notify = .never
        assertParses("RCPT TO:<u@example.org> NOTIFY=never", .rcpt(.mailbox(mailbox("u", "example.org")), never))
        assertFails("RCPT TO:<u@example.org> NOTIFY=NEVER,SUCCESS", .badParameter)
        assertFails("RCPT TO:<u@example.org> NOTIFY=SOMETIMES", .badParameter)
        assertFails("RCPT TO:<u@example.org> NOTIFY=", .badParameter)
        assertFails("RCPT TO:<u@example.org> ORCPT=u@example.org", .badParameter)
        assertFails("RCPT TO:<u@example.org> ORCPT=rfc822;", .badParameter)
        assertFails("RCPT TO:<u@example.org> SIZE=10", .unknownParameter)
    }

    func testEncodingRoundTrips() throws {
        let lines = [
            "MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=x+2By",
            "RCPT TO:<u@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.org",
            "MAIL FROM:<>", "EHLO a.example", "BDAT 12 LAST", "AUTH PLAIN AGEAYg==", "DATA", "QUIT",
        ]
        for line in lines {
            let command = try parse(line)
            XCTAssertEqual(command.encoded, line + "\r\n")
            XCTAssertEqual(try parse(String(decoding: command.encoded.utf8.dropLast(2), as: UTF8.self)), command)
        }
    }

    func testXText() {
        XCTAssertEqual(XText.decode("a+2Bb+3Dc"), "a+b=c")
        XCTAssertNil(XText.decode("a=b"))
        XCTAssertNil(XText.decode("a+2"))
        XCTAssertEqual(XText.encode("a+b=c d"), "a+2Bb+3Dc+20d")
    }

    func testErrorReplies() {
        XCTAssertEqual(SMTPParseError(.unknownCommand, "X").reply.code, 500)
        XCTAssertEqual(SMTPParseError(.unknownCommand, "X").reply.enhanced, .syntaxError)
        XCTAssertEqual(SMTPParseError(.badSender, "x").reply.enhanced, .badSenderSyntax)
        XCTAssertEqual(SMTPParseError(.badRecipient, "x").reply.enhanced, .badDestinationSyntax)
        XCTAssertEqual(SMTPParseError(.unknownParameter, "x").reply.code, 555)
    }

    func testLimitsAreTheRFCs() {
        XCTAssertEqual(SMTPLimits.localPart, 64)
        XCTAssertEqual(SMTPLimits.domain, 255)
        XCTAssertEqual(SMTPLimits.path, 256)
        XCTAssertEqual(SMTPLimits.commandLine, 512)
        XCTAssertEqual(SMTPLimits.textLine, 1000)
        XCTAssertEqual(SMTPLimits.minimumRecipients, 100)
    }
}

final class CommandParserEntryPointTests: XCTestCase {
    /// The array entry point and the generic one read a line the same way.
    func testArrayAndSliceParseAlike() throws {
        let line = Array("xxMAIL FROM:<a@b.example> SIZE=10".utf8)
        let fromSlice = try SMTPCommandParser.parse(line[2...])
        let fromArray = try SMTPCommandParser.parse(Array(line[2...]))
        XCTAssertEqual(fromSlice, fromArray)
    }
}
