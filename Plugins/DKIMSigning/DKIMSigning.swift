#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import TernCore

/// Adds a `DKIM-Signature:` for the domain of the `From:` address, with that domain's key
/// (or a parent domain's, or a default key, as configured). Mail from a domain without a
/// key passes unsigned, and the log says so. It runs last in a chain so that the signature
/// covers the final headers.
public struct DKIMSigningFilter: MessageFilter {
    public let name: String
    let signer: DKIMSigner
    let keys: [String: DKIMKey]
    let useParentDomains: Bool
    let defaultKey: DKIMKey?
    let logger = Logger(label: "tern.dkim")

    /// Which key signs mail whose `From:` is in `domain`.
    func key(for domain: String) -> DKIMKey? {
        var d = domain.lowercased()
        if let k = keys[d] { return k }
        if useParentDomains {
            while let dot = d.firstIndex(of: ".") {
                d = String(d[d.index(after: dot)...])
                guard d.contains(".") else { break }
                if let k = keys[d] { return k }
            }
        }
        return defaultKey
    }

    /// The domain of the first address in a `From:` value: `Name <a@b>` or `a@b`.
    static func fromDomain(_ value: String) -> String? {
        var address = Substring(value)
        if let open = value.lastIndex(of: "<"), let close = value.lastIndex(of: ">"), open < close {
            address = value[value.index(after: open)..<close]
        } else if let comma = value.firstIndex(of: ",") {
            address = value[..<comma]
        }
        guard let at = address.lastIndex(of: "@") else { return nil }
        let domain = address[address.index(after: at)...].filter { $0 != " " && $0 != "\t" }
        return domain.isEmpty ? nil : domain.lowercased()
    }

    public func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict {
        guard let from = message.headers.fields.first(where: { $0.isNamed("From") }), let domain = Self.fromDomain(from.value) else {
            logger.info("\(message.queueID): not DKIM-signed: no From: address")
            return .continue
        }
        guard let key = key(for: domain) else {
            logger.info("\(message.queueID): not DKIM-signed: no key for \(domain)")
            return .continue
        }
        let (headers, body, signer, id) = (message.headers.serialized, message.body, self.signer, message.queueID)
        // Hashing a large body is CPU work: off the cooperative pool, and no joined copy.
        let signature = try await FilterWork.run { try signer.sign(headers: headers, body: body, key: key, jobID: id) }
        message.headers.fields.insert(HeaderBlock.Field(name: "DKIM-Signature", raw: signature), at: 0)
        logger.info("\(message.queueID): DKIM-Signature added, d=\(key.domain), s=\(key.selector), a=\(key.algorithm.rawValue)")
        return .continue
    }
}

/// `type: dkim_sign` in `filters:`.
public enum DKIMSigningPlugin: FilterPlugin {
    public static let type = "dkim_sign"

    /// RFC 6376 §5.4.1's recommendations, plus MIME and list headers.
    public static let defaultHeaders = [
        "From", "Reply-To", "Subject", "Date", "To", "Cc", "Resent-Date", "Resent-From", "Resent-To", "Resent-Cc",
        "In-Reply-To", "References", "List-Id", "List-Help", "List-Unsubscribe", "List-Subscribe", "List-Post",
        "List-Owner", "List-Archive", "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    ]

    struct Settings: Sendable {
        var keys: [DKIMKey]
        var headers: [String]
        var oversign: [String]
        var headerCanon: Canonicalization
        var bodyCanon: Canonicalization
        var useParentDomains: Bool
        var defaultDomain: String?
    }

    struct KeyConfig: Decodable {
        var key: DKIMKey
        enum CodingKeys: String, CodingKey, CaseIterable {
            case domain, selector
            case keyFile = "key_file"
            case algorithm
        }

        init(from decoder: any Decoder) throws {
            try decoder.rejectUnknownKeys(CodingKeys.self)
            let c = try decoder.container(keyedBy: CodingKeys.self)
            let domain = try c.decode(String.self, forKey: .domain)
            let selector = try c.decode(String.self, forKey: .selector)
            let file = try c.decode(String.self, forKey: .keyFile)
            let algorithm = try c.decodeEnum(.algorithm) ?? DKIMKey.Algorithm.rsaSHA256
            var st = stat()
            guard stat(file, &st) == 0, let text = ConfigLoader.readFile(file) else {
                throw DecodingError.dataCorruptedError(forKey: .keyFile, in: c, debugDescription: "cannot read \(file)")
            }
            guard st.st_mode & 0o077 == 0 else {
                throw DecodingError.dataCorruptedError(
                    forKey: .keyFile, in: c,
                    debugDescription: "\(file) has mode \(String(st.st_mode & 0o777, radix: 8)), which lets other users read the private key; chmod 600 it")
            }
            guard text.contains("PRIVATE KEY-----") else {
                throw DecodingError.dataCorruptedError(forKey: .keyFile, in: c, debugDescription: "\(file) is not a PEM private key")
            }
            key = DKIMKey(domain: domain, selector: selector, algorithm: algorithm, pem: Array(text.utf8))
        }
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case keys, headers
        case oversign
        case canonicalization
        case parentDomains = "parent_domains"
        case defaultDomain = "default_domain"
    }

    public static func settings(from decoder: (any Decoder)?) throws -> any Sendable {
        guard let decoder else {
            throw DecodingError.keyNotFound(CodingKeys.keys, .init(codingPath: [], debugDescription: "dkim_sign needs settings.keys"))
        }
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let keys = try c.decode([KeyConfig].self, forKey: .keys).map(\.key)
        let canon = try c.decodeIfPresent(String.self, forKey: .canonicalization) ?? "relaxed/relaxed"
        let parts = canon.split(separator: "/").map(String.init)
        guard (1...2).contains(parts.count), let h = Canonicalization(rawValue: parts[0]),
            let b = Canonicalization(rawValue: parts.count == 2 ? parts[1] : "simple")
        else {
            throw DecodingError.dataCorruptedError(
                forKey: .canonicalization, in: c, debugDescription: "'\(canon)' is not relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple")
        }
        let defaultDomain = try c.decodeIfPresent(String.self, forKey: .defaultDomain)?.lowercased()
        if let d = defaultDomain, !keys.contains(where: { $0.domain == d }) {
            throw DecodingError.dataCorruptedError(forKey: .defaultDomain, in: c, debugDescription: "no key is for \(d)")
        }
        return Settings(
            keys: keys, headers: try c.decodeIfPresent([String].self, forKey: .headers) ?? defaultHeaders,
            oversign: try c.decodeIfPresent([String].self, forKey: .oversign) ?? ["From"], headerCanon: h, bodyCanon: b,
            useParentDomains: try c.decodeIfPresent(Bool.self, forKey: .parentDomains) ?? true, defaultDomain: defaultDomain)
    }

    public static func make(name: String, settings: any Sendable) throws -> any MessageFilter {
        let s = settings as! Settings
        let library = try DKIMLibrary(signedHeaders: s.headers, oversignedHeaders: s.oversign)
        var byDomain: [String: DKIMKey] = [:]
        for k in s.keys where byDomain[k.domain] == nil { byDomain[k.domain] = k }
        return DKIMSigningFilter(
            name: name, signer: DKIMSigner(library: library, headerCanon: s.headerCanon, bodyCanon: s.bodyCanon), keys: byDomain,
            useParentDomains: s.useParentDomains, defaultKey: s.defaultDomain.flatMap { byDomain[$0] })
    }
}
