/// A read position over the bytes of one line, used by every parser in this module.
struct ByteCursor {
    let bytes: [UInt8]
    var index: Int

    init(_ bytes: [UInt8], index: Int = 0) {
        self.bytes = bytes
        self.index = index
    }

    var isAtEnd: Bool { index >= bytes.count }
    var peek: UInt8? { index < bytes.count ? bytes[index] : nil }
    var rest: ArraySlice<UInt8> { bytes[index...] }

    mutating func next() -> UInt8? {
        guard index < bytes.count else { return nil }
        defer { index += 1 }
        return bytes[index]
    }

    /// Consumes `byte` if it is next.
    mutating func consume(_ byte: UInt8) -> Bool {
        guard peek == byte else { return false }
        index += 1
        return true
    }

    /// Consumes an ASCII word, case-insensitively, if it is next.
    mutating func consume(caseInsensitive word: String) -> Bool {
        let w = Array(word.utf8)
        guard bytes.count - index >= w.count else { return false }
        for (offset, expected) in w.enumerated() where ASCII.lower(bytes[index + offset]) != ASCII.lower(expected) {
            return false
        }
        index += w.count
        return true
    }

    /// Consumes bytes while `predicate` holds and returns them.
    mutating func take(while predicate: (UInt8) -> Bool) -> ArraySlice<UInt8> {
        let start = index
        while index < bytes.count, predicate(bytes[index]) { index += 1 }
        return bytes[start..<index]
    }

    mutating func skipSpaces() { _ = take(while: { $0 == ASCII.space }) }
}

enum ASCII {
    static let space: UInt8 = 0x20
    static let tab: UInt8 = 0x09
    static let cr: UInt8 = 0x0D
    static let lf: UInt8 = 0x0A

    static func lower(_ b: UInt8) -> UInt8 { (0x41...0x5A).contains(b) ? b | 0x20 : b }
    static func isAlpha(_ b: UInt8) -> Bool { (0x41...0x5A).contains(b) || (0x61...0x7A).contains(b) }
    static func isDigit(_ b: UInt8) -> Bool { (0x30...0x39).contains(b) }
    static func isLetDig(_ b: UInt8) -> Bool { isAlpha(b) || isDigit(b) }
    static func isHexDigit(_ b: UInt8) -> Bool {
        isDigit(b) || (0x41...0x46).contains(b) || (0x61...0x66).contains(b)
    }

    /// RFC 5322 atext.
    static func isAtext(_ b: UInt8) -> Bool {
        if isLetDig(b) { return true }
        switch b {
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"),
            UInt8(ascii: "'"), UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "/"),
            UInt8(ascii: "="), UInt8(ascii: "?"), UInt8(ascii: "^"), UInt8(ascii: "_"), UInt8(ascii: "`"),
            UInt8(ascii: "{"), UInt8(ascii: "|"), UInt8(ascii: "}"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    static func string(_ bytes: ArraySlice<UInt8>) -> String { String(decoding: bytes, as: UTF8.self) }

    /// Whether `bytes` is well-formed UTF-8 (no overlongs, no surrogates).
    static func isValidUTF8<C: Collection>(_ bytes: C) -> Bool where C.Element == UInt8 {
        var iterator = bytes.makeIterator()
        var decoder = UTF8()
        while true {
            switch decoder.decode(&iterator) {
            case .scalarValue: continue
            case .emptyInput: return true
            case .error: return false
            }
        }
    }
}
