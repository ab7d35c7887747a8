import TernCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The trace header Tern prepends. - SeeAlso: RFC 5321 §4.4, RFC 3848 (protocol names)
///
/// ```
/// Received: from app1.example.com ([10.0.0.5])
///         (using TLSv1.3)
///         by relay.example.com (Tern) with ESMTPS id 0KQ3…
///         for <user@example.org>; Sun, 22 Nov 2026 16:41:16 +0000
/// ```
/// `for` is written only for a single recipient, so that a multi-recipient message does not
/// tell each recipient who the others are.
enum ReceivedHeader {
    static func make(
        helo: String?, clientAddress: String, hostname: String, protocolName: String, queueID: String,
        tlsVersion: String?, recipients: [String], localUID: uid_t? = nil, date: time_t = time(nil)
    ) -> String {
        if let localUID {
            // Local submission has no client host: Postfix's pickup form.
            return "Received: by \(hostname) (Tern, from userid \(localUID))\r\n\tid \(queueID); \(MailDate.rfc5322(date))\r\n"
        }
        let literal = clientAddress.contains(":") ? "[IPv6:\(clientAddress)]" : "[\(clientAddress)]"
        var header = "Received: from \(helo ?? "unknown") (\(literal))\r\n"
        if let tlsVersion { header += "\t(using \(tlsVersion))\r\n" }
        header += "\tby \(hostname) (Tern) with \(protocolName) id \(queueID)"
        if recipients.count == 1 {
            header += "\r\n\tfor <\(recipients[0])>; \(MailDate.rfc5322(date))\r\n"
        } else {
            header += ";\r\n\t\(MailDate.rfc5322(date))\r\n"
        }
        return header
    }
}
