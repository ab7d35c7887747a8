#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A byte count written as `10485760`, `512KB`, `10MB` or `1GB` (binary multiples: 1 KB = 1024).
public struct ByteSize: Hashable, Sendable, Decodable, CustomStringConvertible {
    public var bytes: Int

    public init(bytes: Int) { self.bytes = bytes }

    public init?(parsing text: String) {
        let t = text.trimmingCharacters(in: " ").uppercased()
        let units: [(String, Int)] = [
            ("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30),
            ("KB", 1 << 10), ("MB", 1 << 20), ("GB", 1 << 30), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("B", 1),
        ]
        var number = Substring(t)
        var multiplier = 1
        for (suffix, m) in units where t.hasSuffix(suffix) {
            number = t.dropLast(suffix.count)
            multiplier = m
            break
        }
        guard let n = Int(number.trimmingCharacters(in: " ")), n >= 0 else { return nil }
        let (product, overflow) = n.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { return nil }
        bytes = product
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(Int.self), n >= 0 {
            bytes = n
            return
        }
        let text = try c.decode(String.self)
        guard let parsed = ByteSize(parsing: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text)' is not a size such as 10MB")
        }
        self = parsed
    }

    public var description: String {
        if bytes >= 1 << 20, bytes % (1 << 20) == 0 { return "\(bytes >> 20)MB" }
        if bytes >= 1 << 10, bytes % (1 << 10) == 0 { return "\(bytes >> 10)KB" }
        return "\(bytes)"
    }
}

/// A duration written as `500ms`, `30s`, `5m`, `1h` or `2d`.
public struct ConfigDuration: Hashable, Sendable, Decodable, CustomStringConvertible {
    public var duration: Duration

    public init(_ duration: Duration) { self.duration = duration }

    public init?(parsing text: String) {
        let t = text.trimmingCharacters(in: " ").lowercased()
        let units: [(String, Int64)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)]
        for (suffix, ms) in units where t.hasSuffix(suffix) {
            guard let n = Int64(t.dropLast(suffix.count)), n >= 0 else { return nil }
            duration = .milliseconds(n * ms)
            return
        }
        return nil
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let parsed = ConfigDuration(parsing: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text)' is not a duration such as 30s, 5m or 1h")
        }
        self = parsed
    }

    public var description: String {
        let ms = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
        for (suffix, unit) in [("d", Int64(86_400_000)), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] where ms % unit == 0 && ms >= unit {
            return "\(ms / unit)\(suffix)"
        }
        return "\(ms)ms"
    }
}

/// A listening address, `host:port`, `[v6]:port` or `*:port`.
public struct ListenAddress: Hashable, Sendable, Decodable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(parsing text: String) {
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            hostPart = text[text.index(after: text.startIndex)..<close]
            portPart = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else { return nil }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
        }
        guard let port = Int(portPart), (0...65535).contains(port), !hostPart.isEmpty else { return nil }
        let host = hostPart == "*" ? "::" : String(hostPart)
        guard IPAddress(parsing: host) != nil else { return nil }
        self.host = host
        self.port = port
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let parsed = ListenAddress(parsing: text) else {
            throw DecodingError.dataCorruptedError(
                in: c, debugDescription: "'\(text)' is not an address such as 127.0.0.1:2525 or [::1]:2525")
        }
        self = parsed
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// An IPv4 or IPv6 address as bytes (4 or 16).
public struct IPAddress: Hashable, Sendable, CustomStringConvertible {
    public var bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    public init?(parsing text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if text.withCString({ inet_pton(AF_INET, $0, &v4) }) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if text.withCString({ inet_pton(AF_INET6, $0, &v6) }) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }

    public var isIPv4: Bool { bytes.count == 4 }

    /// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), or self.
    public var unmapped: IPAddress {
        if bytes.count == 16, bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
            return IPAddress(bytes: Array(bytes[12...]))!
        }
        return self
    }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: 64)
        var copy = bytes
        let family = bytes.count == 4 ? AF_INET : AF_INET6
        _ = inet_ntop(family, &copy, &buffer, socklen_t(buffer.count))
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A network in CIDR notation; a bare address is a /32 or /128.
public struct CIDR: Hashable, Sendable, Decodable, CustomStringConvertible {
    public var network: IPAddress
    public var prefixLength: Int

    public init?(parsing text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let address = IPAddress(parsing: String(parts[0])) else { return nil }
        let maxLength = address.bytes.count * 8
        if parts.count == 2 {
            guard let p = Int(parts[1]), (0...maxLength).contains(p) else { return nil }
            prefixLength = p
        } else {
            prefixLength = maxLength
        }
        network = address
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let parsed = CIDR(parsing: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text)' is not a network such as 10.0.0.0/8 or ::1/128")
        }
        self = parsed
    }

    public func contains(_ address: IPAddress) -> Bool {
        let a = address.bytes.count == network.bytes.count ? address : address.unmapped
        guard a.bytes.count == network.bytes.count else { return false }
        var remaining = prefixLength
        for i in 0..<a.bytes.count where remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            if a.bytes[i] & mask != network.bytes[i] & mask { return false }
            remaining -= bits
        }
        return true
    }

    public var description: String { "\(network)/\(prefixLength)" }
}

extension String {
    func trimmingCharacters(in character: Character) -> String {
        String(self.drop(while: { $0 == character }).reversed().drop(while: { $0 == character }).reversed())
    }
}

extension Substring {
    func trimmingCharacters(in character: Character) -> String { String(self).trimmingCharacters(in: character) }
}
