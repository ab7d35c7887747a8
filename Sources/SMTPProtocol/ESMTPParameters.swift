/// `BODY=` values. - SeeAlso: RFC 6152, RFC 3030 §3
public enum BodyType: String, Hashable, Sendable {
    case sevenBit = "7BIT"
    case eightBitMIME = "8BITMIME"
    case binaryMIME = "BINARYMIME"
}

/// `RET=` values. - SeeAlso: RFC 3461 §4.3
public enum DSNReturn: String, Hashable, Sendable, Codable {
    case full = "FULL"
    case headers = "HDRS"
}

/// `NOTIFY=`: NEVER, or any of SUCCESS, FAILURE, DELAY. - SeeAlso: RFC 3461 §4.1
public struct DSNNotify: OptionSet, Hashable, Sendable, Codable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let never = DSNNotify(rawValue: 1 << 0)
    public static let success = DSNNotify(rawValue: 1 << 1)
    public static let failure = DSNNotify(rawValue: 1 << 2)
    public static let delay = DSNNotify(rawValue: 1 << 3)

    public var description: String {
        if contains(.never) { return "NEVER" }
        var words: [String] = []
        if contains(.success) { words.append("SUCCESS") }
        if contains(.failure) { words.append("FAILURE") }
        if contains(.delay) { words.append("DELAY") }
        return words.joined(separator: ",")
    }
}

/// `ORCPT=addr-type;xtext`, decoded. - SeeAlso: RFC 3461 §4.2
public struct OriginalRecipient: Hashable, Sendable, Codable {
    public var addressType: String
    public var address: String

    public init(addressType: String, address: String) {
        self.addressType = addressType
        self.address = address
    }
}

/// The parameters of `MAIL FROM`. - SeeAlso: RFC 1870, RFC 6152, RFC 6531, RFC 3461, RFC 4954 §5
public struct MailParameters: Hashable, Sendable {
    public var size: Int?
    public var body: BodyType?
    public var smtpUTF8 = false
    public var ret: DSNReturn?
    /// ENVID, xtext-decoded.
    public var envid: String?
    /// AUTH=, xtext-decoded: a mailbox or `<>`.
    public var auth: String?

    public init() {}
}

/// The parameters of `RCPT TO`. - SeeAlso: RFC 3461 §4.1, §4.2
public struct RcptParameters: Hashable, Sendable {
    public var notify: DSNNotify?
    public var orcpt: OriginalRecipient?

    public init() {}
}

// MARK: - Parsing

enum ParameterGrammar {
    /// ```
    /// Mail-parameters  = esmtp-param *(SP esmtp-param)
    /// esmtp-param    = esmtp-keyword ["=" esmtp-value]
    /// esmtp-keyword  = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
    /// esmtp-value    = 1*(%d33-60 / %d62-126)          ; RFC 6531: =/ UTF8-non-ascii
    /// ```
    static func split(_ c: inout ByteCursor) throws(SMTPParseError) -> [(keyword: String, value: String?)] {
        var result: [(String, String?)] = []
        var seen = Set<String>()
        while true {
            c.skipSpaces()
            if c.isAtEnd { return result }
            let keyword = c.take(while: { ASCII.isLetDig($0) || $0 == UInt8(ascii: "-") })
            guard let first = keyword.first, ASCII.isLetDig(first) else {
                throw SMTPParseError(.badParameter, "bad parameter keyword")
            }
            let name = ASCII.string(keyword).uppercased()
            var value: String?
            if c.consume(UInt8(ascii: "=")) {
                let v = c.take(while: { (33...60).contains($0) || (62...126).contains($0) || $0 >= 0x80 })
                guard !v.isEmpty, ASCII.isValidUTF8(v) else { throw SMTPParseError(.badParameter, "\(name) has no value") }
                value = ASCII.string(v)
            }
            guard c.isAtEnd || c.peek == ASCII.space else { throw SMTPParseError(.badParameter, "bad character in \(name)") }
            guard seen.insert(name).inserted else { throw SMTPParseError(.badParameter, "\(name) given twice") }
            result.append((name, value))
        }
    }

    static func parseMail(_ c: inout ByteCursor) throws(SMTPParseError) -> MailParameters {
        var p = MailParameters()
        for (name, value) in try split(&c) {
            switch name {
            case "SIZE":
                // RFC 1870: size-value = 1*20DIGIT
                guard let value, (1...20).contains(value.utf8.count), value.utf8.allSatisfy(ASCII.isDigit) else {
                    throw SMTPParseError(.badParameter, "SIZE needs a number")
                }
                p.size = Int(value) ?? Int.max
            case "BODY":
                guard let value, let body = BodyType(rawValue: value.uppercased()) else {
                    throw SMTPParseError(.badParameter, "BODY must be 7BIT or 8BITMIME")
                }
                p.body = body
            case "SMTPUTF8":
                guard value == nil else { throw SMTPParseError(.badParameter, "SMTPUTF8 takes no value") }
                p.smtpUTF8 = true
            case "RET":
                guard let value, let ret = DSNReturn(rawValue: value.uppercased()) else {
                    throw SMTPParseError(.badParameter, "RET must be FULL or HDRS")
                }
                p.ret = ret
            case "ENVID":
                guard let value, let decoded = XText.decode(value), decoded.count <= SMTPLimits.envid else {
                    throw SMTPParseError(.badParameter, "bad ENVID")
                }
                p.envid = decoded
            case "AUTH":
                guard let value, let decoded = XText.decode(value) else { throw SMTPParseError(.badParameter, "bad AUTH") }
                p.auth = decoded
            default:
                throw SMTPParseError(.unknownParameter, name)
            }
        }
        return p
    }

    static func parseRcpt(_ c: inout ByteCursor) throws(SMTPParseError) -> RcptParameters {
        var p = RcptParameters()
        for (name, value) in try split(&c) {
            switch name {
            case "NOTIFY":
                // RFC 3461 §4.1: "NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" )
                guard let value else { throw SMTPParseError(.badParameter, "NOTIFY needs a value") }
                var notify: DSNNotify = []
                for word in value.uppercased().split(separator: ",", omittingEmptySubsequences: false) {
                    switch word {
                    case "NEVER": notify.insert(.never)
                    case "SUCCESS": notify.insert(.success)
                    case "FAILURE": notify.insert(.failure)
                    case "DELAY": notify.insert(.delay)
                    default: throw SMTPParseError(.badParameter, "bad NOTIFY value")
                    }
                }
                guard !notify.contains(.never) || notify == .never else {
                    throw SMTPParseError(.badParameter, "NOTIFY=NEVER cannot be combined")
                }
                p.notify = notify
            case "ORCPT":
                // RFC 3461 §4.2: addr-type ";" xtext
                guard let value, let semi = value.firstIndex(of: ";") else {
                    throw SMTPParseError(.badParameter, "ORCPT needs addr-type;address")
                }
                let type = String(value[..<semi])
                guard !type.isEmpty, type.utf8.allSatisfy({ ASCII.isLetDig($0) || $0 == UInt8(ascii: "-") }),
                    let address = XText.decode(String(value[value.index(after: semi)...])), !address.isEmpty,
                    address.utf8.count <= SMTPLimits.orcpt
                else { throw SMTPParseError(.badParameter, "bad ORCPT") }
                p.orcpt = OriginalRecipient(addressType: type, address: address)
            default:
                throw SMTPParseError(.unknownParameter, name)
            }
        }
        return p
    }
}

/// xtext: printable ASCII except "+" and "=", with "+XX" hex escapes. - SeeAlso: RFC 3461 §4
public enum XText {
    public static func decode(_ s: String) -> String? {
        var out: [UInt8] = []
        var bytes = s.utf8.makeIterator()
        while let b = bytes.next() {
            if b == UInt8(ascii: "+") {
                guard let h = bytes.next(), let l = bytes.next(), ASCII.isHexDigit(h), ASCII.isHexDigit(l),
                    let value = UInt8(String(decoding: [h, l], as: UTF8.self), radix: 16)
                else { return nil }
                out.append(value)
            } else if (33...126).contains(b), b != UInt8(ascii: "=") {
                out.append(b)
            } else {
                return nil
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func encode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            if (33...126).contains(b), b != UInt8(ascii: "+"), b != UInt8(ascii: "=") {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                out += "+" + String(b, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return out
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

// MARK: - Encoding

extension MailParameters {
    /// The parameters as they follow `MAIL FROM:<…>` on the wire, each preceded by a space.
    public var encoded: String {
        var out = ""
        if let size { out += " SIZE=\(size)" }
        if let body { out += " BODY=\(body.rawValue)" }
        if smtpUTF8 { out += " SMTPUTF8" }
        if let ret { out += " RET=\(ret.rawValue)" }
        if let envid { out += " ENVID=\(XText.encode(envid))" }
        if let auth { out += " AUTH=\(XText.encode(auth))" }
        return out
    }
}

extension RcptParameters {
    public var encoded: String {
        var out = ""
        if let notify { out += " NOTIFY=\(notify)" }
        if let orcpt { out += " ORCPT=\(orcpt.addressType);\(XText.encode(orcpt.address))" }
        return out
    }
}
