import TernCore
/// How an outbound connection uses STARTTLS: the config's own enum, one set of cases for
/// both (no conversion that could fall back silently if they drifted).
/// - `none`: never STARTTLS.
/// - `may`: STARTTLS when offered; when the handshake fails, connect again in plaintext.
/// - `encrypt`: STARTTLS is required; the certificate is not checked.
/// - `verify`: STARTTLS is required, with a valid chain to a trusted CA and the right host name.
/// - SeeAlso: RFC 3207; Postfix's `smtp_tls_security_level` (none, may, encrypt, verify)
public typealias TLSPolicy = TLSPolicyName

extension TLSPolicyName {
    public var requiresTLS: Bool { self == .encrypt || self == .verify }
}
