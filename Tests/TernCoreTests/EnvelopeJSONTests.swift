import Foundation
import SMTPProtocol
import XCTest

@testable import TernCore

final class EnvelopeJSONTests: XCTestCase {
    private func encoded(_ envelope: Envelope) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(envelope))
    }

    /// Strings as a client can send them: quotes, backslashes, slashes, every control
    /// character, DEL, and UTF-8 (SMTPUTF8 addresses).
    private func hostileString(_ rng: inout SystemRandomNumberGenerator) -> String {
        let pieces = ["a", "\"", "\\", "/", "\u{7F}", "é", "日本", "😀", "\u{2028}", "@", " ", "<>", "\\u0000"]
            + (0..<0x20).map { String(UnicodeScalar(UInt8($0))) }
        return (0..<Int.random(in: 0...12, using: &rng)).map { _ in pieces.randomElement(using: &rng)! }.joined()
    }

    func testTheSameBytesAsJSONEncoderForAnyEnvelope() throws {
        var rng = SystemRandomNumberGenerator()
        func maybe<T>(_ value: @autoclosure () -> T) -> T? { Bool.random(using: &rng) ? value() : nil }
        for _ in 0..<2000 {
            let recipients = (0..<Int.random(in: 1...4, using: &rng)).map { _ in
                EnvelopeRecipient(
                    address: hostileString(&rng), notify: maybe(DSNNotify(rawValue: UInt8.random(in: 0...15, using: &rng))),
                    orcpt: maybe(OriginalRecipient(addressType: hostileString(&rng), address: hostileString(&rng))))
            }
            let envelope = Envelope(
                sender: hostileString(&rng), recipients: recipients, body: maybe(hostileString(&rng)),
                smtpUTF8: Bool.random(using: &rng), ret: maybe(Bool.random() ? .full : .headers), envid: maybe(hostileString(&rng)),
                client: ClientInfo(
                    address: hostileString(&rng), port: Int.random(in: 0...65535, using: &rng), helo: maybe(hostileString(&rng)),
                    protocol: hostileString(&rng), tlsVersion: maybe(hostileString(&rng))),
                authUser: maybe(hostileString(&rng)), listener: hostileString(&rng),
                arrivalMillis: Int64.random(in: Int64.min...Int64.max, using: &rng))
            let bytes = envelope.jsonBytes
            XCTAssertEqual(String(decoding: bytes, as: UTF8.self), String(decoding: try encoded(envelope), as: UTF8.self))
            XCTAssertEqual(try JSONDecoder().decode(Envelope.self, from: Data(bytes)), envelope)
            // One line: the spool's record ends at the first newline.
            XCTAssertFalse(bytes.contains(0x0A))
        }
    }
}
