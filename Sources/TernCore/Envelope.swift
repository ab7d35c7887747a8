import SMTPProtocol

/// Everything the relay knows about a message besides its content: what the spool stores and
/// delivery reads. - SeeAlso: RFC 5321 §2.3.1, RFC 3461 (DSN parameters)
public struct Envelope: Sendable, Codable, Hashable {
    /// The reverse-path as text; empty for the null sender `<>`.
    public var sender: String
    public var recipients: [EnvelopeRecipient]
    /// BODY= as given (7BIT, 8BITMIME), if given.
    public var body: String?
    public var smtpUTF8: Bool
    public var ret: DSNReturn?
    public var envid: String?
    /// The client that handed the message over.
    public var client: ClientInfo
    /// The SASL user name, when the client authenticated.
    public var authUser: String?
    /// The listener's name from the config.
    public var listener: String
    /// Arrival, milliseconds since 1970.
    public var arrivalMillis: Int64

    public init(
        sender: String, recipients: [EnvelopeRecipient], body: String? = nil, smtpUTF8: Bool = false,
        ret: DSNReturn? = nil, envid: String? = nil, client: ClientInfo, authUser: String? = nil,
        listener: String, arrivalMillis: Int64
    ) {
        self.sender = sender
        self.recipients = recipients
        self.body = body
        self.smtpUTF8 = smtpUTF8
        self.ret = ret
        self.envid = envid
        self.client = client
        self.authUser = authUser
        self.listener = listener
        self.arrivalMillis = arrivalMillis
    }
}

public struct EnvelopeRecipient: Sendable, Codable, Hashable {
    public var address: String
    public var notify: DSNNotify?
    public var orcpt: OriginalRecipient?

    public init(address: String, notify: DSNNotify? = nil, orcpt: OriginalRecipient? = nil) {
        self.address = address
        self.notify = notify
        self.orcpt = orcpt
    }
}

public struct ClientInfo: Sendable, Codable, Hashable {
    public var address: String
    public var port: Int
    /// The name given in HELO/EHLO.
    public var helo: String?
    /// ESMTP, ESMTPS, ESMTPA, ESMTPSA, SMTP, … (RFC 3848).
    public var `protocol`: String
    public var tlsVersion: String?

    public init(address: String, port: Int, helo: String? = nil, protocol: String = "SMTP", tlsVersion: String? = nil) {
        self.address = address
        self.port = port
        self.helo = helo
        self.protocol = `protocol`
        self.tlsVersion = tlsVersion
    }
}
