/// An enhanced mail system status code, `class.subject.detail`.
/// - SeeAlso: RFC 3463, RFC 2034
public struct EnhancedStatusCode: Hashable, Sendable, CustomStringConvertible {
    public var klass: Int
    public var subject: Int
    public var detail: Int

    public init(_ klass: Int, _ subject: Int, _ detail: Int) {
        self.klass = klass
        self.subject = subject
        self.detail = detail
    }

    /// Parses `X.Y.Z` as it stands at the start of a reply text.
    public init?(parsing text: Substring) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3,
            let k = Int(parts[0]), [2, 4, 5].contains(k),
            parts[1].count <= 3, let s = Int(parts[1]),
            parts[2].count <= 3, let d = Int(parts[2])
        else { return nil }
        self.init(k, s, d)
    }

    public var description: String { "\(klass).\(subject).\(detail)" }

    // MARK: - The codes Tern uses

    public static let ok = EnhancedStatusCode(2, 0, 0)
    public static let senderOK = EnhancedStatusCode(2, 1, 0)
    public static let destinationOK = EnhancedStatusCode(2, 1, 5)
    public static let authOK = EnhancedStatusCode(2, 7, 0)
    public static let cannotVerify = EnhancedStatusCode(2, 5, 2)

    public static let badDestinationSyntax = EnhancedStatusCode(5, 1, 3)
    public static let badSenderSyntax = EnhancedStatusCode(5, 1, 7)
    public static let tooManyRecipients = EnhancedStatusCode(4, 5, 3)
    public static let messageTooBig = EnhancedStatusCode(5, 3, 4)
    public static let systemFull = EnhancedStatusCode(4, 3, 1)
    public static let transientSystem = EnhancedStatusCode(4, 3, 0)
    public static let permanentSystem = EnhancedStatusCode(5, 3, 0)
    public static let timeout = EnhancedStatusCode(4, 4, 2)
    public static let invalidCommand = EnhancedStatusCode(5, 5, 1)
    public static let syntaxError = EnhancedStatusCode(5, 5, 2)
    public static let tooManyBadCommands = EnhancedStatusCode(4, 7, 0)
    public static let parameterSyntax = EnhancedStatusCode(5, 5, 4)
    public static let wrongProtocolVersion = EnhancedStatusCode(5, 5, 5)
    public static let badContent = EnhancedStatusCode(5, 6, 0)
    public static let badLineEnding = EnhancedStatusCode(5, 6, 2)
    public static let utf8NotPermitted = EnhancedStatusCode(5, 6, 7)
    public static let securityPolicy = EnhancedStatusCode(5, 7, 0)
    public static let deliveryNotAuthorized = EnhancedStatusCode(5, 7, 1)
    public static let authFailed = EnhancedStatusCode(5, 7, 8)
    public static let authTooWeak = EnhancedStatusCode(5, 7, 4)
    public static let encryptionRequired = EnhancedStatusCode(5, 7, 11)
    public static let temporaryAuthFailure = EnhancedStatusCode(4, 7, 0)
    public static let serviceShuttingDown = EnhancedStatusCode(4, 3, 2)
    public static let protocolError = EnhancedStatusCode(4, 5, 0)
}
