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

    /// Every way of cutting the stream, through the array and the generic entry points alike.
    func testTheCountDoesNotDependOnHowTheBytesArrive() {
        for cut in 0...message.count {
            var byArray = HopCounter()
            byArray.feed(Array(message[..<cut]))
            byArray.feed(Array(message[cut...]))
            var bySlice = HopCounter()
            bySlice.feed(message[..<cut])
            bySlice.feed(message[cut...])
            XCTAssertEqual(byArray.received, 2, "cut at \(cut)")
            XCTAssertEqual(bySlice.received, 2, "cut at \(cut)")
        }
    }

    func testAnEmptyLineWithLFAloneEndsTheHeaders() {
        var counter = HopCounter()
        counter.feed("Received: a\n\nReceived: b\n".utf8)
        XCTAssertEqual(counter.received, 1)
    }
}
