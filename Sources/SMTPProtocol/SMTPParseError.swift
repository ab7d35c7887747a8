/// A command or reply that breaks the grammar. It carries the reply a server sends for it.
///
/// Kept as a struct around a private code so that new kinds can be added without breaking
/// anyone who switches over them.
public struct SMTPParseError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        /// The verb is not one Tern knows.
        case unknownCommand
        /// The verb is known but its arguments are malformed.
        case syntax
        /// The reverse-path is malformed.
        case badSender
        /// The forward-path is malformed.
        case badRecipient
        /// An ESMTP parameter is malformed, duplicated or has a bad value.
        case badParameter
        /// An ESMTP parameter Tern does not implement.
        case unknownParameter
        /// A reply line from a server is malformed.
        case badReply
    }

    public var kind: Kind
    public var detail: String

    public init(_ kind: Kind, _ detail: String) {
        self.kind = kind
        self.detail = detail
    }

    public var description: String { "\(kind): \(detail)" }

    /// The reply a server sends for this error (RFC 5321 §4.2.2, RFC 1869 §6, RFC 3463).
    public var reply: SMTPReply {
        switch kind {
        case .unknownCommand: return .unknownCommand
        case .syntax: return SMTPReply(501, .parameterSyntax, "Syntax error: \(detail)")
        case .badSender: return SMTPReply(501, .badSenderSyntax, "Bad sender address syntax: \(detail)")
        case .badRecipient: return SMTPReply(501, .badDestinationSyntax, "Bad recipient address syntax: \(detail)")
        case .badParameter: return SMTPReply(501, .parameterSyntax, "Bad parameter: \(detail)")
        case .unknownParameter: return SMTPReply(555, .parameterSyntax, "Unsupported option: \(detail)")
        case .badReply: return SMTPReply(500, .syntaxError, detail)
        }
    }
}
