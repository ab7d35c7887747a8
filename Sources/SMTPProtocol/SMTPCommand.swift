/// One SMTP command as a client sends it.
/// - SeeAlso: RFC 5321 §4.1.1, RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 3030 (BDAT)
public enum SMTPCommand: Hashable, Sendable {
    case helo(String)
    case ehlo(String)
    case mail(ReversePath, MailParameters)
    case rcpt(ForwardPath, RcptParameters)
    case data
    case bdat(size: Int, last: Bool)
    case rset
    case noop
    case quit
    case vrfy(String)
    case expn(String)
    case help(String?)
    case startTLS
    /// `AUTH mechanism [initial-response]`; the response stays base64 as sent ("=" is empty).
    case auth(mechanism: String, initialResponse: String?)

    /// The verb, uppercased, as logs print it.
    public var verb: String {
        switch self {
        case .helo: "HELO"
        case .ehlo: "EHLO"
        case .mail: "MAIL"
        case .rcpt: "RCPT"
        case .data: "DATA"
        case .bdat: "BDAT"
        case .rset: "RSET"
        case .noop: "NOOP"
        case .quit: "QUIT"
        case .vrfy: "VRFY"
        case .expn: "EXPN"
        case .help: "HELP"
        case .startTLS: "STARTTLS"
        case .auth: "AUTH"
        }
    }

    // MARK: - Encoding

    /// The command line as a client sends it, with CRLF.
    public var encoded: String {
        let line: String
        switch self {
        case .helo(let name): line = "HELO \(name)"
        case .ehlo(let name): line = "EHLO \(name)"
        case .mail(let path, let params): line = "MAIL FROM:<\(path)>\(params.encoded)"
        case .rcpt(let path, let params): line = "RCPT TO:<\(path)>\(params.encoded)"
        case .data: line = "DATA"
        case .bdat(let size, let last): line = "BDAT \(size)" + (last ? " LAST" : "")
        case .rset: line = "RSET"
        case .noop: line = "NOOP"
        case .quit: line = "QUIT"
        case .vrfy(let s): line = "VRFY \(s)"
        case .expn(let s): line = "EXPN \(s)"
        case .help(let s): line = s.map { "HELP \($0)" } ?? "HELP"
        case .startTLS: line = "STARTTLS"
        case .auth(let mech, let initial): line = "AUTH \(mech)" + (initial.map { " \($0.isEmpty ? "=" : $0)" } ?? "")
        }
        return line + "\r\n"
    }
}

// MARK: - Parsing

/// Parses one command line (without its CRLF) into an `SMTPCommand`.
///
/// The line-length limit belongs to the framing layer, which never hands over a longer line;
/// this parser checks the grammar only.
public enum SMTPCommandParser {
    public static func parse(_ line: some Collection<UInt8>) throws(SMTPParseError) -> SMTPCommand {
        try parse(Array(line))
    }

    /// The same for a line already in an array: what the session hands over. Not generic,
    /// so a caller in another module does not go through the collection's witness table
    /// for each byte.
    public static func parse(_ bytes: [UInt8]) throws(SMTPParseError) -> SMTPCommand {
        // Controls other than TAB have no place in a command (RFC 5321 §4.1.1: printable text).
        if bytes.contains(where: { ($0 < 0x20 && $0 != ASCII.tab) || $0 == 0x7F }) {
            throw SMTPParseError(.syntax, "control character in command")
        }
        var c = ByteCursor(bytes)
        let verb = ASCII.string(c.take(while: ASCII.isAlpha)).uppercased()
        guard c.isAtEnd || c.peek == ASCII.space else { throw SMTPParseError(.unknownCommand, verb) }

        switch verb {
        case "EHLO", "HELO":
            let name = try domainArgument(&c, verb: verb)
            return verb == "EHLO" ? .ehlo(name) : .helo(name)
        case "MAIL":
            // mail = "MAIL FROM:" Reverse-path [SP Mail-parameters] CRLF
            guard c.consume(ASCII.space), c.consume(caseInsensitive: "FROM:") else {
                throw SMTPParseError(.syntax, "MAIL FROM:<address>")
            }
            c.skipSpaces()  // "MAIL FROM: <a@b>" is common; Postfix accepts it too.
            let path: ReversePath
            do {
                path = try AddressGrammar.parsePath(&c, allowNull: true).map(ReversePath.mailbox) ?? .null
            } catch {
                throw SMTPParseError(.badSender, error.detail)
            }
            try requireSpaceOrEnd(c)
            return .mail(path, try ParameterGrammar.parseMail(&c))
        case "RCPT":
            // rcpt = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" / Forward-path ) [SP Rcpt-parameters]
            guard c.consume(ASCII.space), c.consume(caseInsensitive: "TO:") else {
                throw SMTPParseError(.syntax, "RCPT TO:<address>")
            }
            c.skipSpaces()
            let path: ForwardPath
            if c.consume(caseInsensitive: "<Postmaster>") {
                path = .postmaster
            } else {
                let mailbox: Mailbox?
                do {
                    mailbox = try AddressGrammar.parsePath(&c, allowNull: false)
                } catch {
                    throw SMTPParseError(.badRecipient, error.detail)
                }
                guard let mailbox else { throw SMTPParseError(.badRecipient, "empty recipient") }
                path = .mailbox(mailbox)
            }
            try requireSpaceOrEnd(c)
            return .rcpt(path, try ParameterGrammar.parseRcpt(&c))
        case "DATA": try noArguments(&c, verb); return .data
        case "RSET": try noArguments(&c, verb); return .rset
        case "QUIT": try noArguments(&c, verb); return .quit
        case "STARTTLS": try noArguments(&c, verb); return .startTLS
        case "NOOP":
            return .noop  // RFC 5321 §4.1.1.9: a parameter may be given and is ignored.
        case "HELP":
            let arg = trimmedRest(&c)
            return .help(arg.isEmpty ? nil : arg)
        case "VRFY", "EXPN":
            let arg = trimmedRest(&c)
            guard !arg.isEmpty else { throw SMTPParseError(.syntax, "\(verb) needs an argument") }
            return verb == "VRFY" ? .vrfy(arg) : .expn(arg)
        case "BDAT":
            // bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF ; chunk-size = 1*DIGIT
            guard c.consume(ASCII.space) else { throw SMTPParseError(.syntax, "BDAT chunk-size [LAST]") }
            let digits = c.take(while: ASCII.isDigit)
            guard !digits.isEmpty, digits.count <= 18, let size = Int(ASCII.string(digits)) else {
                throw SMTPParseError(.syntax, "BDAT chunk-size [LAST]")
            }
            var last = false
            if c.consume(ASCII.space) {
                guard c.consume(caseInsensitive: "LAST") else { throw SMTPParseError(.syntax, "BDAT chunk-size [LAST]") }
                last = true
            }
            c.skipSpaces()
            guard c.isAtEnd else { throw SMTPParseError(.syntax, "BDAT chunk-size [LAST]") }
            return .bdat(size: size, last: last)
        case "AUTH":
            // auth-command = "AUTH" SP sasl-mech [SP initial-response] ; RFC 4954 §4
            guard c.consume(ASCII.space) else { throw SMTPParseError(.syntax, "AUTH mechanism [initial-response]") }
            let mech = c.take(while: { ASCII.isLetDig($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") })
            guard (1...20).contains(mech.count) else { throw SMTPParseError(.syntax, "bad SASL mechanism name") }
            var initial: String?
            if c.consume(ASCII.space) {
                let response = c.take(while: { $0 != ASCII.space })
                guard !response.isEmpty, response == [UInt8(ascii: "=")] || response.allSatisfy(isBase64) else {
                    throw SMTPParseError(.syntax, "initial response is not base64")
                }
                initial = response == [UInt8(ascii: "=")] ? "" : ASCII.string(response)
            }
            c.skipSpaces()
            guard c.isAtEnd else { throw SMTPParseError(.syntax, "AUTH mechanism [initial-response]") }
            return .auth(mechanism: ASCII.string(mech).uppercased(), initialResponse: initial)
        default:
            throw SMTPParseError(.unknownCommand, verb.isEmpty ? "empty command" : verb)
        }
    }

    static func isBase64(_ b: UInt8) -> Bool {
        ASCII.isLetDig(b) || b == UInt8(ascii: "+") || b == UInt8(ascii: "/") || b == UInt8(ascii: "=")
    }

    /// `ehlo = "EHLO" SP ( Domain / address-literal )`. Checked loosely, as Postfix does by
    /// default: clients send bare host names, underscores and worse, and refusing them buys
    /// nothing on a relay whose trust comes from the client address or AUTH.
    private static func domainArgument(_ c: inout ByteCursor, verb: String) throws(SMTPParseError) -> String {
        guard c.consume(ASCII.space) else { throw SMTPParseError(.syntax, "\(verb) hostname") }
        c.skipSpaces()
        let name = c.take(while: { $0 > ASCII.space })
        c.skipSpaces()
        guard !name.isEmpty, c.isAtEnd, ASCII.isValidUTF8(name) else { throw SMTPParseError(.syntax, "\(verb) hostname") }
        return ASCII.string(name)
    }

    private static func noArguments(_ c: inout ByteCursor, _ verb: String) throws(SMTPParseError) {
        c.skipSpaces()
        guard c.isAtEnd else { throw SMTPParseError(.syntax, "\(verb) takes no arguments") }
    }

    private static func requireSpaceOrEnd(_ c: ByteCursor) throws(SMTPParseError) {
        guard c.isAtEnd || c.peek == ASCII.space else { throw SMTPParseError(.syntax, "unexpected characters after address") }
    }

    private static func trimmedRest(_ c: inout ByteCursor) -> String {
        c.skipSpaces()
        var rest = c.rest
        while rest.last == ASCII.space || rest.last == ASCII.tab { rest = rest.dropLast() }
        return ASCII.string(rest)
    }
}
