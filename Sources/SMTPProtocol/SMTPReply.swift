/// A server reply: a three-digit code, an optional enhanced status code, and one or more lines.
///
/// The enhanced code, where present, leads each line's text (RFC 2034 §4: every line of a
/// multi-line reply carries it).
/// - SeeAlso: RFC 5321 §4.2, RFC 2034
public struct SMTPReply: Hashable, Sendable, CustomStringConvertible {
    public var code: Int
    public var enhanced: EnhancedStatusCode?
    public var lines: [String]

    public init(_ code: Int, _ enhanced: EnhancedStatusCode? = nil, _ lines: [String]) {
        precondition((200...599).contains(code), "reply code out of range")
        precondition(!lines.isEmpty, "a reply has at least one line")
        self.code = code
        self.enhanced = enhanced
        self.lines = lines
    }

    public init(_ code: Int, _ enhanced: EnhancedStatusCode? = nil, _ text: String) {
        self.init(code, enhanced, [text])
    }

    public var isPositive: Bool { code < 400 }
    public var isTransientFailure: Bool { (400..<500).contains(code) }
    public var isPermanentFailure: Bool { code >= 500 }

    /// The reply's text as a log wants it: code, enhanced code and lines joined with spaces.
    public var description: String {
        let prefix = enhanced.map { "\(code) \($0)" } ?? "\(code)"
        return prefix + " " + lines.joined(separator: " ")
    }

    // MARK: - Encoding

    /// The reply as it goes on the wire, CRLF after each line.
    public var encoded: String { String(decoding: encodedBytes, as: UTF8.self) }

    /// `encoded`, as the bytes written to the socket (built as bytes: a reply is sent for
    /// every command).
    public var encodedBytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(lines.reduce(0) { $0 + $1.utf8.count + 16 })
        let code = Array(String(code).utf8)
        let enhanced = enhanced.map { Array($0.description.utf8) }
        for (index, line) in lines.enumerated() {
            out += code
            out.append(index == lines.count - 1 ? UInt8(ascii: " ") : UInt8(ascii: "-"))
            if let enhanced {
                out += enhanced
                if !line.isEmpty { out.append(UInt8(ascii: " ")) }
            }
            // A reply text must not carry a line break: that would let text inject a reply.
            // (CR and LF are never part of a longer UTF-8 sequence.)
            for byte in line.utf8 where byte != 0x0D && byte != 0x0A { out.append(byte) }
            out += [0x0D, 0x0A]
        }
        return out
    }
}

// MARK: - Replies Tern sends in more than one place

extension SMTPReply {
    public static let ok = SMTPReply(250, .ok, "Ok")
    public static let badSequence = SMTPReply(503, .invalidCommand, "Bad sequence of commands")
    public static let unknownCommand = SMTPReply(500, .syntaxError, "Error: command not recognized")
    public static let lineTooLong = SMTPReply(500, .syntaxError, "Error: line too long")
    public static let tooManyErrors = SMTPReply(421, .tooManyBadCommands, "Error: too many errors, closing connection")
    public static let relayDenied = SMTPReply(554, .deliveryNotAuthorized, "Relay access denied")
    public static let startTLSFirst = SMTPReply(530, .securityPolicy, "Must issue a STARTTLS command first")
    public static let authRequired = SMTPReply(530, .securityPolicy, "Authentication required")
    /// The spool's file system is (nearly) full: try again later (RFC 1870 §6.1, RFC 3463 4.3.1).
    public static let insufficientStorage = SMTPReply(452, .systemFull, "Insufficient system storage")
    /// The client's bytes no longer make sense where the session stands; nothing after them can.
    public static let protocolError = SMTPReply(421, .protocolError, "Error: protocol error, closing connection")
}

/// Gathers reply lines from a server into replies.
///
/// "Need more lines" is distinct from "bad line": `feed` returns nil until the last line of a
/// multi-line reply arrives and throws only on a line that is not a reply at all.
/// - SeeAlso: RFC 5321 §4.2.1
public struct SMTPReplyParser: Sendable {
    private var code: Int?
    private var lines: [String] = []
    private var enhanced: EnhancedStatusCode?
    private var bytes = 0

    /// No server needs more for one reply (an EHLO reply has a line per extension, a
    /// greeting banner a few); past these the reply is refused rather than kept growing.
    public static let maxLines = 100
    public static let maxBytes = SMTPLimits.maxReplyBytes

    public init() {}

    /// Feeds one line, without its CRLF.
    public mutating func feed(line: Substring) throws(SMTPParseError) -> SMTPReply? {
        try feed(bytes: Array(line.utf8))
    }

    /// Feeds one line as it came off the wire, without its CRLF.
    public mutating func feed(bytes: [UInt8]) throws(SMTPParseError) -> SMTPReply? {
        guard bytes.count >= 3, bytes[0...2].allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
            throw SMTPParseError(.badReply, "not a reply line")
        }
        let code = Int(bytes[0] - 0x30) * 100 + Int(bytes[1] - 0x30) * 10 + Int(bytes[2] - 0x30)
        guard (200...599).contains(code) else { throw SMTPParseError(.badReply, "not a reply line") }
        if let current = self.code, current != code {
            throw SMTPParseError(.badReply, "code changed inside a multi-line reply")
        }
        let separator: UInt8 = bytes.count > 3 ? bytes[3] : 0x20
        guard separator == 0x20 || separator == 0x2D else {
            throw SMTPParseError(.badReply, "bad separator after reply code")
        }
        // A server's text reaches logs, stored errors, bounces and `tern queue list`: no
        // control character of its gets that far.
        var text = bytes.count > 4 ? Substring(LogEscape.escape(bytes: bytes[4...])) : ""
        if let first = text.split(separator: " ", maxSplits: 1).first,
            let esc = EnhancedStatusCode(parsing: first), esc.klass == code / 100
        {
            if self.lines.isEmpty { self.enhanced = esc }
            text = text.dropFirst(first.count).drop(while: { $0 == " " })
        }
        self.bytes += bytes.count + 2
        guard lines.count < Self.maxLines, self.bytes <= Self.maxBytes else {
            throw SMTPParseError(.badReply, "reply longer than \(Self.maxLines) lines or \(Self.maxBytes) bytes")
        }
        self.code = code
        self.lines.append(String(text))
        guard separator == 0x20 else { return nil }
        let reply = SMTPReply(code, self.enhanced, self.lines)
        self = SMTPReplyParser()
        return reply
    }
}
