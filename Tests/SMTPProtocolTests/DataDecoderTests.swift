import XCTest

@testable import SMTPProtocol

final class DataDecoderTests: XCTestCase {
    /// Decodes `input` fed in pieces of `split` bytes; returns the message, the bytes left
    /// after the end of data, and the violations. nil message when the end was not found.
    private func decode(_ input: [UInt8], split: Int = .max, normalize: Bool = false)
        -> (message: [UInt8], rest: [UInt8], violations: DataDecoder.Violations)?
    {
        var decoder = DataDecoder(normalizeBareLineEndings: normalize)
        var out: [UInt8] = []
        var offset = 0
        while offset < input.count {
            let end = min(input.count, offset + split)
            let piece = Array(input[offset..<end])
            let result = piece.withUnsafeBytes { decoder.feed($0, into: &out) }
            if case .end(let consumed) = result {
                return (out, Array(input[(offset + consumed)...]), decoder.violations)
            }
            offset = end
        }
        return nil
    }

    private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// Every fixture must decode the same however the input is cut.
    private func assertDecodes(
        _ input: String, _ message: String?, rest: String = "", violations: DataDecoder.Violations = [],
        normalize: Bool = false, file: StaticString = #filePath, line: UInt = #line
    ) {
        for split in [1, 2, 3, 5, 7, .max] {
            let result = decode(bytes(input), split: split, normalize: normalize)
            guard let message else {
                XCTAssertNil(result, "split \(split): found an end in \(input.debugDescription)", file: file, line: line)
                continue
            }
            guard let result else {
                XCTFail("split \(split): no end in \(input.debugDescription)", file: file, line: line)
                continue
            }
            XCTAssertEqual(String(decoding: result.message, as: UTF8.self), message, "split \(split)", file: file, line: line)
            XCTAssertEqual(String(decoding: result.rest, as: UTF8.self), rest, "split \(split)", file: file, line: line)
            XCTAssertEqual(result.violations, violations, "split \(split)", file: file, line: line)
        }
    }

    func testEndOfData() {
        assertDecodes("Subject: x\r\n\r\nbody\r\n.\r\n", "Subject: x\r\n\r\nbody\r\n")
        assertDecodes(".\r\n", "")
        assertDecodes("a\r\n.\r\nQUIT\r\n", "a\r\n", rest: "QUIT\r\n")
    }

    func testDotUnstuffing() {
        assertDecodes("..a\r\n...\r\n.\r\n", ".a\r\n..\r\n")
        assertDecodes("a.\r\n.b\r\n.\r\n", "a.\r\nb\r\n")
    }

    func testSmugglingTerminatorsAreText() {
        // Only CRLF.CRLF ends the data; these never do.
        assertDecodes("a\n.\nb", nil)
        assertDecodes("a\r.\rb", nil)
        assertDecodes("a\r\n.\nb", nil)
        assertDecodes("a\n.\r\nb", nil)
        assertDecodes("a\r.\r\nb", nil)
        assertDecodes("a\n.\nMAIL FROM:<x@y>\r\n.\r\n", "a\n.\nMAIL FROM:<x@y>\r\n", violations: [.bareLF])
    }

    func testBareLineEndingsAreRecorded() {
        assertDecodes("a\nb\r\n.\r\n", "a\nb\r\n", violations: [.bareLF])
        assertDecodes("a\rb\r\n.\r\n", "a\rb\r\n", violations: [.bareCR])
        assertDecodes(".\rx\r\n.\r\n", "\rx\r\n", violations: [.bareCR])
        assertDecodes("a\0b\r\n.\r\n", "a\0b\r\n", violations: [.nul])
    }

    func testNormalisation() {
        assertDecodes("a\nb\rc\r\n.\r\n", "a\r\nb\r\nc\r\n", violations: [.bareLF, .bareCR], normalize: true)
        // After a normalised bare LF the next dot is text, not stuffing nor an end.
        assertDecodes("a\n.\r\n.\r\n", "a\r\n.\r\n", violations: [.bareLF], normalize: true)
    }

    func testDotStufferRoundTrip() {
        let message = bytes(".starts with a dot\r\nmiddle\r\n..two\r\n.\r\nend")
        var stuffer = DotStuffer()
        var wire: [UInt8] = []
        message.withUnsafeBytes { stuffer.stuff($0, into: &wire) }
        wire += stuffer.terminator
        XCTAssertEqual(
            String(decoding: wire, as: UTF8.self), "..starts with a dot\r\nmiddle\r\n...two\r\n..\r\nend\r\n.\r\n")
        let decoded = decode(wire)
        XCTAssertEqual(decoded?.message, message + bytes("\r\n"))
        XCTAssertEqual(decoded?.rest, [])
    }

    func testDotStufferGivesTheSameWireAtEverySplit() {
        let message = bytes(".a\r\n.\r\nb\r\n..c\r\nd.e\r\n.")
        var whole = DotStuffer()
        var expected: [UInt8] = []
        message.withUnsafeBytes { whole.stuff($0, into: &expected) }
        expected += whole.terminator
        for split in 0...message.count {
            var stuffer = DotStuffer()
            var wire: [UInt8] = []
            Array(message[..<split]).withUnsafeBytes { stuffer.stuff($0, into: &wire) }
            Array(message[split...]).withUnsafeBytes { stuffer.stuff($0, into: &wire) }
            wire += stuffer.terminator
            XCTAssertEqual(wire, expected, "split at \(split)")
        }
        XCTAssertEqual(String(decoding: expected, as: UTF8.self), "..a\r\n..\r\nb\r\n...c\r\nd.e\r\n..\r\n.\r\n")
    }

    /// The decoder against the plain definition, one byte at a time: the stream's bytes from
    /// an alphabet of the bytes that matter (CR, LF, dot, NUL) and text, cut at random
    /// places. The decoder copies whole clean lines at once; nothing about the result may
    /// depend on that.
    func testTheSameAsAByteAtATimeReferenceAtRandomSplits() {
        var rng = SystemRandomNumberGenerator()
        let alphabet: [UInt8] = [0x0D, 0x0A, 0x2E, 0x00, 0x41, 0x42, 0x20, 0x0D, 0x0A, 0x41]
        for _ in 0..<20_000 {
            let length = Int.random(in: 0...60, using: &rng)
            var input = (0..<length).map { _ in alphabet.randomElement(using: &rng)! }
            if Bool.random(using: &rng) { input += [0x0D, 0x0A, 0x2E, 0x0D, 0x0A, 0x51] }
            let normalize = Bool.random(using: &rng)
            let expected = Self.reference(input, normalize: normalize)
            let split = Int.random(in: 1...max(1, length + 6), using: &rng)
            let got = decode(input, split: split, normalize: normalize)
            XCTAssertEqual(got?.message, expected?.message, "\(input) split \(split)")
            XCTAssertEqual(got?.rest, expected?.rest, "\(input) split \(split)")
            XCTAssertEqual(got?.violations, expected?.violations, "\(input) split \(split)")
        }
    }

    /// RFC 5321 §4.5.2 and the rules above, written out plainly.
    private static func reference(_ input: [UInt8], normalize: Bool) -> (message: [UInt8], rest: [UInt8], violations: DataDecoder.Violations)? {
        var out: [UInt8] = []
        var violations: DataDecoder.Violations = []
        var atLineStart = true
        var i = 0
        func bare(_ byte: UInt8, _ kind: DataDecoder.Violations) {
            violations.insert(kind)
            out += normalize ? [0x0D, 0x0A] : [byte]
        }
        while i < input.count {
            if atLineStart, input[i] == 0x2E {
                if i + 2 < input.count, input[i + 1] == 0x0D, input[i + 2] == 0x0A {
                    return (out, Array(input[(i + 3)...]), violations)
                }
                i += 1  // stuffing
                atLineStart = false
                continue
            }
            atLineStart = false
            let b = input[i]
            if b == 0x0D, i + 1 < input.count, input[i + 1] == 0x0A {
                out += [0x0D, 0x0A]
                i += 2
                atLineStart = true
                continue
            }
            if b == 0x0D {
                // A CR at the very end may yet be followed by LF: no end is found either way.
                if i + 1 == input.count { return nil }
                bare(b, .bareCR)
            } else if b == 0x0A {
                bare(b, .bareLF)
            } else {
                if b == 0 { violations.insert(.nul) }
                out.append(b)
            }
            i += 1
        }
        return nil
    }
}

final class LineEndingCheckerTests: XCTestCase {
    private func check(_ pieces: [String], normalize: Bool = false) -> (String, DataDecoder.Violations) {
        var checker = LineEndingChecker(normalizeBareLineEndings: normalize)
        var out: [UInt8] = []
        for p in pieces { Array(p.utf8).withUnsafeBytes { checker.feed($0, into: &out) } }
        checker.finish(into: &out)
        return (String(decoding: out, as: UTF8.self), checker.violations)
    }

    func testCleanInputPassesUnchanged() {
        XCTAssertEqual(check(["a\r\n.\r\nb\r\n"]).0, "a\r\n.\r\nb\r\n")
        XCTAssertEqual(check(["a\r\n.\r\nb\r\n"]).1, [])
        XCTAssertEqual(check(["a\r", "\nb"]).1, [], "a CRLF split across chunks is not bare")
    }

    func testBareEndingsAndNUL() {
        XCTAssertEqual(check(["a\nb"]).1, [.bareLF])
        XCTAssertEqual(check(["a\rb"]).1, [.bareCR])
        XCTAssertEqual(check(["a\r"]).1, [.bareCR], "a CR at the very end is bare")
        XCTAssertEqual(check(["a\0"]).1, [.nul])
        XCTAssertEqual(check(["a\nb\rc\r"], normalize: true).0, "a\r\nb\r\nc\r\n")
    }
}
