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
}
