import XCTest

@testable import SMTPProtocol

final class HopCounterTests: XCTestCase {
    private let message = Array(
        "Received: from a\r\nX-Other: 1\r\nRECEIVED: from b\r\n\tcontinued\r\nReceivedX: no\r\n\r\nReceived: in the body\r\n".utf8)

    func testCountsReceivedFieldsInTheHeaderSectionOnly() {
        var counter = HopCounter()
        counter.feed(message)
        XCTAssertEqual(counter.received, 2)
    }

    /// Every way of cutting the stream in two, and byte by byte.
    func testTheCountDoesNotDependOnHowTheBytesArrive() {
        for cut in 0...message.count {
            var counter = HopCounter()
            counter.feed(Array(message[..<cut]))
            counter.feed(Array(message[cut...]))
            XCTAssertEqual(counter.received, 2, "cut at \(cut)")
        }
        var byByte = HopCounter()
        for byte in message { byByte.feed([byte]) }
        XCTAssertEqual(byByte.received, 2)
    }

    func testAnEmptyLineWithLFAloneEndsTheHeaders() {
        var counter = HopCounter()
        counter.feed(Array("Received: a\n\nReceived: b\n".utf8))
        XCTAssertEqual(counter.received, 1)
    }
}
