#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An address: `Local-part "@" ( Domain / address-literal )`.
///
/// The local part is kept as written (a quoted string keeps its quotes), because its meaning
/// belongs to the receiving domain and relaying must not change it. The domain is kept as
/// written too; `normalizedDomain` is the form to compare.
/// - SeeAlso: RFC 5321 §4.1.2, RFC 6531 §3.3
public struct Mailbox: Hashable, Sendable, CustomStringConvertible {
    public var localPart: String
    public var domain: String
    public var isAddressLiteral: Bool

    public init(localPart: String, domain: String, isAddressLiteral: Bool = false) {
        self.localPart = localPart
        self.domain = domain
        self.isAddressLiteral = isAddressLiteral
    }

    /// True when the address has octets outside ASCII, so that it may only travel with SMTPUTF8.
    public var requiresSMTPUTF8: Bool {
        !localPart.utf8.allSatisfy { $0 < 0x80 } || !domain.utf8.allSatisfy { $0 < 0x80 }
    }

    /// The domain lowercased, for comparisons and routing.
    public var normalizedDomain: String { domain.lowercased() }

    public var description: String { "\(localPart)@\(domain)" }
}

/// `Reverse-path = Path / "<>"`.
public enum ReversePath: Hashable, Sendable, CustomStringConvertible {
    case null
    case mailbox(Mailbox)

    public var mailbox: Mailbox? {
        if case .mailbox(let m) = self { return m }
        return nil
    }

    /// The address without brackets; empty for the null path, as logs print it.
    public var description: String { mailbox?.description ?? "" }
}

/// `Forward-path = Path`, or the special unqualified `<Postmaster>`.
public enum ForwardPath: Hashable, Sendable, CustomStringConvertible {
    case postmaster
    case mailbox(Mailbox)

    public var mailbox: Mailbox? {
        if case .mailbox(let m) = self { return m }
        return nil
    }

    public var description: String { mailbox?.description ?? "Postmaster" }
}

// MARK: - Parsing

/// The address grammar of RFC 5321 §4.1.2, with the UTF-8 extensions of RFC 6531 §3.3.
enum AddressGrammar {
    /// ```
    /// Path           = "<" [ A-d-l ":" ] Mailbox ">"
    /// A-d-l          = At-domain *( "," At-domain )   ; source route: parsed, then ignored
    /// At-domain      = "@" Domain
    /// ```
    /// Also accepts the address without angle brackets, as Postfix does unless
    /// `strict_rfc821_envelopes` is set: application servers send `MAIL FROM:user@host` often.
    static func parsePath(_ c: inout ByteCursor, allowNull: Bool) throws(SMTPParseError) -> Mailbox? {
        let start = c.index
        guard c.consume(UInt8(ascii: "<")) else {
            let bare = c.take(while: { $0 != ASCII.space })
            guard !bare.isEmpty else { throw SMTPParseError(.syntax, "missing address") }
            var inner = ByteCursor(Array(bare))
            let mailbox = try parseMailbox(&inner)
            guard inner.isAtEnd else { throw SMTPParseError(.syntax, "unexpected characters after address") }
            try checkPathLength(c.index - start)
            return mailbox
        }
        if allowNull, c.consume(UInt8(ascii: ">")) { return nil }
        if c.peek == UInt8(ascii: "@") {
            // Source route (RFC 5321 Appendix C): must be accepted, must be ignored.
            repeat {
                guard c.consume(UInt8(ascii: "@")) else { throw SMTPParseError(.syntax, "bad source route") }
                _ = try parseDomain(&c)
            } while c.consume(UInt8(ascii: ","))
            guard c.consume(UInt8(ascii: ":")) else { throw SMTPParseError(.syntax, "bad source route") }
        }
        let mailbox = try parseMailbox(&c)
        guard c.consume(UInt8(ascii: ">")) else { throw SMTPParseError(.syntax, "missing closing angle bracket") }
        try checkPathLength(c.index - start - 2)
        return mailbox
    }

    private static func checkPathLength(_ length: Int) throws(SMTPParseError) {
        guard length <= SMTPLimits.path else { throw SMTPParseError(.syntax, "path longer than \(SMTPLimits.path) octets") }
    }

    /// ```
    /// Mailbox        = Local-part "@" ( Domain / address-literal )
    /// Local-part     = Dot-string / Quoted-string
    /// Dot-string     = Atom *("."  Atom)
    /// Atom           = 1*atext                      ; RFC 6531: atext =/ UTF8-non-ascii
    /// Quoted-string  = DQUOTE *QcontentSMTP DQUOTE
    /// QcontentSMTP   = qtextSMTP / quoted-pairSMTP
    /// quoted-pairSMTP  = %d92 %d32-126
    /// qtextSMTP      = %d32-33 / %d35-91 / %d93-126   ; RFC 6531: =/ UTF8-non-ascii
    /// ```
    static func parseMailbox(_ c: inout ByteCursor) throws(SMTPParseError) -> Mailbox {
        let localStart = c.index
        if c.consume(UInt8(ascii: "\"")) {
            while true {
                guard let b = c.next() else { throw SMTPParseError(.syntax, "unterminated quoted string") }
                if b == UInt8(ascii: "\"") { break }
                if b == UInt8(ascii: "\\") {
                    guard let q = c.next(), (32...126).contains(q) else {
                        throw SMTPParseError(.syntax, "bad quoted pair")
                    }
                    continue
                }
                guard (32...126).contains(b) || b >= 0x80 else {
                    throw SMTPParseError(.syntax, "control character in quoted string")
                }
            }
        } else {
            repeat {
                let atom = c.take(while: { ASCII.isAtext($0) || $0 >= 0x80 })
                guard !atom.isEmpty else { throw SMTPParseError(.syntax, "bad local part") }
            } while c.consume(UInt8(ascii: "."))
        }
        let localBytes = c.bytes[localStart..<c.index]
        guard localBytes.count <= SMTPLimits.localPart else {
            throw SMTPParseError(.syntax, "local part longer than \(SMTPLimits.localPart) octets")
        }
        guard ASCII.isValidUTF8(localBytes) else { throw SMTPParseError(.syntax, "local part is not valid UTF-8") }
        guard c.consume(UInt8(ascii: "@")) else { throw SMTPParseError(.syntax, "missing @ in address") }
        if c.peek == UInt8(ascii: "[") {
            let literal = try parseAddressLiteral(&c)
            return Mailbox(localPart: ASCII.string(localBytes), domain: literal, isAddressLiteral: true)
        }
        let domain = try parseDomain(&c)
        return Mailbox(localPart: ASCII.string(localBytes), domain: domain)
    }

    /// ```
    /// Domain         = sub-domain *("." sub-domain)
    /// sub-domain     = Let-dig [Ldh-str]             ; RFC 6531: sub-domain =/ U-label
    /// Ldh-str        = *( ALPHA / DIGIT / "-" ) Let-dig
    /// ```
    static func parseDomain(_ c: inout ByteCursor) throws(SMTPParseError) -> String {
        let start = c.index
        repeat {
            let label = c.take(while: { ASCII.isLetDig($0) || $0 == UInt8(ascii: "-") || $0 >= 0x80 })
            guard let first = label.first, let last = label.last,
                first != UInt8(ascii: "-"), last != UInt8(ascii: "-")
            else { throw SMTPParseError(.syntax, "bad domain") }
            guard label.count <= 63 else { throw SMTPParseError(.syntax, "domain label longer than 63 octets") }
        } while c.consume(UInt8(ascii: "."))
        let bytes = c.bytes[start..<c.index]
        guard bytes.count <= SMTPLimits.domain else {
            throw SMTPParseError(.syntax, "domain longer than \(SMTPLimits.domain) octets")
        }
        guard ASCII.isValidUTF8(bytes) else { throw SMTPParseError(.syntax, "domain is not valid UTF-8") }
        return ASCII.string(bytes)
    }

    /// ```
    /// address-literal  = "[" ( IPv4-address-literal / IPv6-address-literal /
    ///                          General-address-literal ) "]"
    /// IPv6-address-literal  = "IPv6:" IPv6-addr
    /// General-address-literal  = Standardized-tag ":" 1*dcontent
    /// dcontent       = %d33-90 / %d94-126
    /// ```
    /// Returns the literal with its brackets.
    static func parseAddressLiteral(_ c: inout ByteCursor) throws(SMTPParseError) -> String {
        let start = c.index
        guard c.consume(UInt8(ascii: "[")) else { throw SMTPParseError(.syntax, "bad address literal") }
        let body = c.take(while: { (33...90).contains($0) || (94...126).contains($0) })
        guard c.consume(UInt8(ascii: "]")), !body.isEmpty else { throw SMTPParseError(.syntax, "bad address literal") }
        let text = ASCII.string(body)
        if text.lowercased().hasPrefix("ipv6:") {
            guard isIPv6(String(text.dropFirst(5))) else { throw SMTPParseError(.syntax, "bad IPv6 address literal") }
        } else if let colon = text.firstIndex(of: ":") {
            let tag = text[..<colon]
            guard let f = tag.utf8.first, let l = tag.utf8.last, ASCII.isLetDig(f), ASCII.isLetDig(l),
                tag.utf8.allSatisfy({ ASCII.isLetDig($0) || $0 == UInt8(ascii: "-") }),
                text.index(after: colon) < text.endIndex
            else { throw SMTPParseError(.syntax, "bad general address literal") }
        } else {
            guard isIPv4(text) else { throw SMTPParseError(.syntax, "bad IPv4 address literal") }
        }
        return ASCII.string(c.bytes[start..<c.index])
    }

    /// `IPv4-address-literal = Snum 3("."  Snum)`, Snum = 1*3DIGIT, 0-255.
    static func isIPv4(_ s: String) -> Bool {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4
            && parts.allSatisfy { p in
                (1...3).contains(p.count) && p.utf8.allSatisfy(ASCII.isDigit) && Int(p)! <= 255
            }
    }

    static func isIPv6(_ s: String) -> Bool {
        var storage = in6_addr()
        return s.withCString { inet_pton(AF_INET6, $0, &storage) } == 1
    }
}
