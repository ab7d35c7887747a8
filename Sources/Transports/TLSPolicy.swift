/// How an outbound connection uses STARTTLS.
/// - SeeAlso: RFC 3207; Postfix's `smtp_tls_security_level` (none, may, encrypt, verify)
public enum TLSPolicy: String, Sendable, Equatable, CaseIterable {
    /// Never STARTTLS.
    case none
    /// STARTTLS when offered; when the handshake fails, connect again in plaintext.
    case may
    /// STARTTLS is required; the certificate is not checked.
    case encrypt
    /// STARTTLS is required, with a valid chain to a trusted CA and the right host name.
    case verify

    public var requiresTLS: Bool { self == .encrypt || self == .verify }
}
