/// Every size limit of RFC 5321 §4.5.3.1 in one place, plus the few that SMTP extensions add.
///
/// The RFC's numbers are minimums a server must accept; a server may accept more. Tern accepts
/// exactly these for the grammar (a longer path is a syntax error) and makes the operational
/// limits (message size, recipients per message) configurable on top.
/// - SeeAlso: RFC 5321 §4.5.3.1
public enum SMTPLimits {
    /// §4.5.3.1.1: local-part, octets.
    public static let localPart = 64
    /// §4.5.3.1.2: domain, octets.
    public static let domain = 255
    /// §4.5.3.1.3: reverse-path or forward-path including the angle brackets' content.
    public static let path = 256
    /// §4.5.3.1.4: command line including the verb and CRLF.
    public static let commandLine = 512
    /// The line limit Tern enforces for commands: 512 plus room for ESMTP parameters
    /// (RFC 5321 §4.5.3.1.4 allows extensions to raise it; RFC 1870 and 3461 each add to it).
    public static let commandLineWithExtensions = 2048
    /// §4.5.3.1.5: reply line including the code and CRLF.
    public static let replyLine = 512
    /// The longest reply line Tern reads from a server: RFC 5321 allows 512, real servers
    /// send longer ones, none this long (Postfix's `smtp_line_length_limit` is 990 for lines it
    /// sends; what it reads it cuts at `line_length_limit`, 2048).
    public static let maxReplyLine = 4096
    /// The most bytes one reply (all its lines) may take.
    public static let maxReplyBytes = 32768
    /// §4.5.3.1.6: text line of the message including CRLF.
    public static let textLine = 1000
    /// §4.5.3.1.8: the minimum number of recipients a server must buffer.
    public static let minimumRecipients = 100
    /// RFC 3461 §4.4: ENVID value, characters (after xtext decoding).
    public static let envid = 100
    /// RFC 3461 §4.2: ORCPT value, characters.
    public static let orcpt = 500
    /// RFC 4954 §4: a SASL line from the client, octets. Tern allows more than the 12288 floor
    /// no further: a larger one is an attack, not a credential.
    public static let authLine = 12288
}
