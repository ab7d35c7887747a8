/// The header section of a message as filters see it: one entry per logical header, folded
/// continuation lines included, in order, with the bytes exactly as received so that an
/// untouched header is written back byte for byte.
/// - SeeAlso: RFC 5322 §2.2 (header fields), §2.2.3 (folding)
public struct HeaderBlock: Sendable, Equatable {
    public struct Field: Sendable, Equatable {
        /// The field name as written (`Received`), or "" for a line that is not a header.
        public var name: String
        /// The whole field: `Name: value`, continuation lines and every CRLF included.
        public var raw: [UInt8]

        public init(name: String, raw: [UInt8]) {
            self.name = name
            self.raw = raw
        }

        /// A new field `Name: value` (value may contain folded lines joined by CRLF + WSP).
        public init(name: String, value: String) {
            self.name = name
            self.raw = Array("\(name): \(value)\r\n".utf8)
        }

        /// The field as one logical line, without the final CRLF (what a pattern is matched
        /// against; folding CRLFs are kept, so a pattern can see them).
        public var text: String {
            var bytes = raw
            if bytes.suffix(2) == [0x0D, 0x0A] { bytes.removeLast(2) }
            return String(decoding: bytes, as: UTF8.self)
        }

        /// The value after the colon, unfolded and trimmed.
        public var value: String {
            guard let colon = raw.firstIndex(of: UInt8(ascii: ":")) else { return "" }
            var unfolded = Array(raw[(colon + 1)...].filter { $0 != 0x0D && $0 != 0x0A })
            while let first = unfolded.first, first == 0x20 || first == 0x09 { unfolded.removeFirst() }
            while let last = unfolded.last, last == 0x20 || last == 0x09 { unfolded.removeLast() }
            return String(decoding: unfolded, as: UTF8.self)
        }

        public func isNamed(_ other: String) -> Bool { name.lowercased() == other.lowercased() }
    }

    public var fields: [Field]

    public init(fields: [Field]) { self.fields = fields }

    /// Splits a message (CRLF line endings) into its header block and the offset where the
    /// body starts (after the empty line; the message's length when there is no body).
    public static func parse(_ message: [UInt8]) -> (HeaderBlock, bodyOffset: Int) {
        var fields: [Field] = []
        var i = 0
        let n = message.count
        while i < n {
            // The empty line ends the header section.
            if message[i] == 0x0D, i + 1 < n, message[i + 1] == 0x0A { return (HeaderBlock(fields: fields), i + 2) }
            let start = i
            var end = lineEnd(message, from: i)
            // Folded continuation lines start with a space or a tab.
            while end < n, message[end] == 0x20 || message[end] == 0x09 { end = lineEnd(message, from: end) }
            let raw = Array(message[start..<end])
            let name: String
            if let colon = raw.firstIndex(of: UInt8(ascii: ":")), colon > 0,
                raw[..<colon].allSatisfy({ $0 > 0x20 && $0 < 0x7F })
            {
                name = String(decoding: raw[..<colon], as: UTF8.self)
            } else {
                name = ""
            }
            fields.append(Field(name: name, raw: raw))
            i = end
        }
        return (HeaderBlock(fields: fields), n)
    }

    private static func lineEnd(_ m: [UInt8], from i: Int) -> Int {
        var j = i
        while j < m.count {
            if m[j] == 0x0A { return j + 1 }
            j += 1
        }
        return m.count
    }

    /// The header section again, ending with the empty line.
    public var serialized: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(fields.reduce(2) { $0 + $1.raw.count })
        for f in fields {
            out += f.raw
            if f.raw.suffix(2) != [0x0D, 0x0A] { out += [0x0D, 0x0A] }
        }
        out += [0x0D, 0x0A]
        return out
    }
}
