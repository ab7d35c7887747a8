import XCTest

@testable import SMTPProtocol

final class ReplyTests: XCTestCase {
    func testSingleLineEncoding() {
        XCTAssertEqual(SMTPReply(250, .ok, "Ok").encoded, "250 2.0.0 Ok\r\n")
        XCTAssertEqual(SMTPReply(220, nil, "relay ESMTP").encoded, "220 relay ESMTP\r\n")
        XCTAssertEqual(SMTPReply(334, nil, "").encoded, "334 \r\n")
    }

    func testMultiLineEncodingRepeatsTheEnhancedCode() {
        let reply = SMTPReply(250, nil, ["relay", "PIPELINING", "SIZE 10"])
        XCTAssertEqual(reply.encoded, "250-relay\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        XCTAssertEqual(SMTPReply(550, .deliveryNotAuthorized, ["a", "b"]).encoded, "550-5.7.1 a\r\n550 5.7.1 b\r\n")
    }

    func testReplyTextCannotInjectLines() {
        XCTAssertEqual(SMTPReply(550, .deliveryNotAuthorized, "<a\r\n250 ok>").encoded, "550 5.7.1 <a250 ok>\r\n")
        // A bare CR or LF alone, next to UTF-8 (a client's SMTPUTF8 address echoed back).
        XCTAssertEqual(
            SMTPReply(553, nil, ["<jö\rrg@exämple.org>", "\n250 x"]).encodedBytes,
            Array("553-<jörg@exämple.org>\r\n553 250 x\r\n".utf8))
    }

    func testParserGathersMultiLineReplies() throws {
        var parser = SMTPReplyParser()
        XCTAssertNil(try parser.feed(line: "250-mx.example"))
        XCTAssertNil(try parser.feed(line: "250-PIPELINING"))
        let reply = try parser.feed(line: "250 SIZE 100")
        XCTAssertEqual(reply, SMTPReply(250, nil, ["mx.example", "PIPELINING", "SIZE 100"]))
        let rejected = try parser.feed(line: "550 5.1.1 <u@example.org>: no such user")
        XCTAssertEqual(rejected?.enhanced, EnhancedStatusCode(5, 1, 1))
        XCTAssertEqual(rejected?.lines, ["<u@example.org>: no such user"])
        XCTAssertEqual(try parser.feed(line: "421"), SMTPReply(421, nil, [""]))
    }

    func testParserRejectsNonReplies() {
        var parser = SMTPReplyParser()
        XCTAssertThrowsError(try parser.feed(line: "hello"))
        XCTAssertThrowsError(try parser.feed(line: "999 too high"))
        XCTAssertThrowsError(try parser.feed(line: "250x"))
        var changing = SMTPReplyParser()
        XCTAssertNil(try changing.feed(line: "250-a"))
        XCTAssertThrowsError(try changing.feed(line: "251 b"))
    }

    func testEnhancedCodeParsing() {
        XCTAssertEqual(EnhancedStatusCode(parsing: "4.7.28"), EnhancedStatusCode(4, 7, 28))
        XCTAssertNil(EnhancedStatusCode(parsing: "3.0.0"))
        XCTAssertNil(EnhancedStatusCode(parsing: "5.1"))
        XCTAssertNil(EnhancedStatusCode(parsing: "5.1.1000"))
    }

    func testAReplyHasABoundedNumberOfLines() throws {
        var parser = SMTPReplyParser()
        for _ in 0..<SMTPReplyParser.maxLines { XCTAssertNil(try parser.feed(line: "220-banner")) }
        XCTAssertThrowsError(try parser.feed(line: "220-one too many"))

        var bytes = SMTPReplyParser()
        let long = "250-" + String(repeating: "x", count: 4000)
        XCTAssertThrowsError(try { for _ in 0..<20 { _ = try bytes.feed(line: Substring(long)) } }())
    }

    func testControlCharactersInReplyTextAreEscaped() throws {
        var parser = SMTPReplyParser()
        let reply = try XCTUnwrap(parser.feed(line: "550 5.1.1 \u{1B}[31mred\u{0}cut\u{7F}"))
        XCTAssertEqual(reply.lines, ["\\x1B[31mred\\x00cut\\x7F"])
    }

    func testLogEscape() {
        XCTAssertEqual(LogEscape.escape("plain text, ünïcødé"), "plain text, ünïcødé")
        XCTAssertEqual(LogEscape.escape("a\nb\rc\u{0}d\te"), "a\\x0Ab\\x0Dc\\x00d\\x09e")
        XCTAssertEqual(LogEscape.escape("x\u{85}y\u{2028}z\u{202E}"), "x\\x85y\\u{2028}z\\u{202E}")
        XCTAssertEqual(LogEscape.escape(bytes: [0x61, 0x0A, 0xFF]), "a\\x0A\u{FFFD}")
    }
}
