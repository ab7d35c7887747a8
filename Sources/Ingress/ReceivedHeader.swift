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
        tlsVersion: String?, recipients: [String], date: time_t = time(nil)
    ) -> String {
        let literal = clientAddress.contains(":") ? "[IPv6:\(clientAddress)]" : "[\(clientAddress)]"
        var header = "Received: from \(helo ?? "unknown") (\(literal))\r\n"
        if let tlsVersion { header += "\t(using \(tlsVersion))\r\n" }
        header += "\tby \(hostname) (Tern) with \(protocolName) id \(queueID)"
        if recipients.count == 1 {
            header += "\r\n\tfor <\(recipients[0])>; \(rfc5322Date(date))\r\n"
        } else {
            header += ";\r\n\t\(rfc5322Date(date))\r\n"
        }
        return header
    }

    /// RFC 5322 §3.3 date-time, in local time with its numeric zone.
    static func rfc5322Date(_ t: time_t) -> String {
        var seconds = t
        var parts = tm()
        localtime_r(&seconds, &parts)
        let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        let offset = parts.tm_gmtoff / 60
        let sign = offset < 0 ? "-" : "+"
        func two(_ n: Int) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(days[Int(parts.tm_wday)]), \(parts.tm_mday) \(months[Int(parts.tm_mon)]) \(parts.tm_year + 1900) "
            + "\(two(Int(parts.tm_hour))):\(two(Int(parts.tm_min))):\(two(Int(parts.tm_sec))) "
            + "\(sign)\(two(abs(offset) / 60))\(two(abs(offset) % 60))"
    }
}
