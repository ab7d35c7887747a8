#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CUnbound
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// One MX host of a domain, with its addresses in the order to try them.
public struct MXHost: Sendable, Equatable {
    public var name: String
    public var preference: Int
    public var addresses: [String]

    public init(name: String, preference: Int, addresses: [String]) {
        self.name = name
        self.preference = preference
        self.addresses = addresses
    }
}

/// Where a domain's mail can go, or why it cannot. - SeeAlso: RFC 5321 §5.1, RFC 7505
public enum MXLookupResult: Sendable, Equatable {
    /// The hosts to try, in order: by preference, random among equal ones.
    case hosts([MXHost])
    /// The domain publishes a null MX: it accepts no mail (bounce with 5.1.10).
    case nullMX
    /// The domain or every host named for it does not exist (bounce).
    case notFound(String)
    /// The answer could not be had now: SERVFAIL, a timeout (defer).
    case temporaryFailure(String)
}

/// MX and address lookups through libunbound, a caching resolver library: it keeps answers
/// for their TTL and does the DNS wire work. It forwards to the servers in
/// `/etc/resolv.conf`, or to one configured server. `ub_resolve` blocks, so lookups run on
/// a thread pool, never on an event loop.
public final class MXResolver: @unchecked Sendable {
    /// `ub_ctx` is thread-safe when libunbound is built with threads (Debian's is): "The
    /// blocking calls use shared ctx-cache when threaded".
    private let context: OpaquePointer
    private let pool: NIOThreadPool
    /// Answers by domain until they expire (monotonic ms). A cached lookup in libunbound
    /// still sets up a resolver worker per `ub_resolve`, which cost about a millisecond of
    /// CPU per delivery when each message went to its domain's MX hosts.
    private let cache = NIOLockedValueBox([String: (MXLookupResult, UInt64)]())

    public struct SetupError: Error, CustomStringConvertible {
        public var description: String
    }

    /// - Parameter server: `(host, port)` of the DNS server to ask; nil for `resolvConf`.
    public init(server: (host: String, port: Int)?, resolvConf: String = "/etc/resolv.conf", threadPool: NIOThreadPool) throws {
        guard let ctx = ub_ctx_create() else { throw SetupError(description: "ub_ctx_create failed") }
        context = ctx
        pool = threadPool
        // A forwarder on this machine (a local cache, or a test's server) must be usable.
        ub_ctx_set_option(ctx, "do-not-query-localhost:", "no")

        let status: CInt
        if let server {
            status = ub_ctx_set_fwd(ctx, "\(server.host)@\(server.port)")
        } else {
            status = ub_ctx_resolvconf(ctx, resolvConf)
            // As the system's resolver does: names in /etc/hosts (a smarthost kept there).
            if status == 0 { _ = ub_ctx_hosts(ctx, "/etc/hosts") }
        }
        guard status == 0 else {
            let reason = String(cString: ub_strerror(status))
            ub_ctx_delete(ctx)
            throw SetupError(description: server.map { "resolver \($0.host)@\($0.port): \(reason)" } ?? "\(resolvConf): \(reason)")
        }
        // libunbound answers some reserved names itself (NXDOMAIN for .test, .home.arpa, …,
        // RFC 6761 and 8375). A relay asks its configured server about every name: a private
        // network's internal domains live exactly there. (Removing a zone finalizes the
        // context, which adds the default zones first: so this comes last.)
        for zone in Self.reservedZones { _ = ub_ctx_zone_remove(ctx, zone) }
    }

    deinit { ub_ctx_delete(context) }

    static let reservedZones = [
        "test.", "invalid.", "home.arpa.", "onion.", "local.", "resolver.arpa.", "service.arpa.",
    ]

    struct Answer {
        enum Status { case ok, nxdomain, failure(String) }
        var status: Status
        var records: [[UInt8]]
        var ttl: Int = 0
    }

    static let typeA: CInt = 1
    static let typeMX: CInt = 15
    static let typeAAAA: CInt = 28

    private func query(_ name: String, type: CInt) async -> Answer {
        do {
            return try await pool.runIfActive { [self] in
                let ctx = self.context
                var result: UnsafeMutablePointer<ub_result>?
                let err = ub_resolve(ctx, name, type, 1, &result)
                guard err == 0, let r = result else {
                    return Answer(status: .failure(String(cString: ub_strerror(err))), records: [])
                }
                defer { ub_resolve_free(r) }
                if r.pointee.nxdomain != 0 { return Answer(status: .nxdomain, records: []) }
                guard r.pointee.rcode == 0 else {
                    let rcode = r.pointee.rcode == 2 ? "SERVFAIL" : "rcode \(r.pointee.rcode)"
                    return Answer(status: .failure("\(rcode) looking up \(name)"), records: [])
                }
                var records: [[UInt8]] = []
                if r.pointee.havedata != 0, let data = r.pointee.data, let lengths = r.pointee.len {
                    var i = 0
                    while let p = data[i] {
                        records.append(Array(UnsafeRawBufferPointer(start: p, count: Int(lengths[i]))))
                        i += 1
                    }
                }
                return Answer(status: .ok, records: records, ttl: Int(r.pointee.ttl))
            }
        } catch {
            return Answer(status: .failure("resolver stopped"), records: [])
        }
    }

    /// The addresses of a host, IPv4 first; nil with a reason when the lookup failed.
    public func addresses(of host: String) async -> Result<[String], MXLookupFailure> {
        var out: [String] = []
        var nx = 0
        for type in [Self.typeA, Self.typeAAAA] {
            let answer = await query(host, type: type)
            switch answer.status {
            case .ok: out += answer.records.compactMap(Self.addressText)
            case .nxdomain: nx += 1
            case .failure(let why): return .failure(.temporary(why))
            }
        }
        if out.isEmpty { return .failure(.notFound(nx > 0 ? "\(host): no such domain" : "\(host): no address records")) }
        return .success(out)
    }

    public enum MXLookupFailure: Error { case temporary(String), notFound(String) }

    /// The names of a domain's MX hosts and the answer's TTL in seconds (for grouping
    /// domains by provider); nil when there are none or the lookup failed.
    /// The MX answer is kept (as long as its TTL, at most a minute) for the attempt's full
    /// lookup that follows, so a domain's MX records are asked for once for both; the hosts'
    /// addresses are looked up by the attempt, off the scheduler's path.
    public func mxNames(domain: String) async -> (names: [String], ttl: Int)? {
        let answer = await mxAnswer(domain)
        guard case .ok = answer.status else { return nil }
        let names = answer.records.compactMap(Self.parseMX).map(\.1).filter { !$0.isEmpty }
        return names.isEmpty ? nil : (names, answer.ttl)
    }

    /// Recent MX answers, by domain, until when (monotonic ms).
    private let mxAnswers = NIOLockedValueBox([String: (Answer, UInt64)]())

    private func mxAnswer(_ domain: String) async -> Answer {
        let now = NIODeadline.now().uptimeNanoseconds / 1_000_000
        if let (answer, until) = mxAnswers.withLockedValue({ $0[domain] }), now < until { return answer }
        let answer = await query(domain, type: Self.typeMX)
        if case .ok = answer.status {
            mxAnswers.withLockedValue { c in
                if c.count > 10_000 { c.removeAll() }
                c[domain] = (answer, now + UInt64(min(max(answer.ttl, 1), 60)) * 1000)
            }
        }
        return answer
    }

    /// The hosts for a recipient domain, in the order to try them.
    public func lookup(domain: String) async -> MXLookupResult {
        var random = SystemRandomNumberGenerator()
        return await lookup(domain: domain, using: &random)
    }

    public func lookup(domain: String, using random: inout some RandomNumberGenerator) async -> MXLookupResult {
        if let literal = Self.addressLiteral(domain) {
            return .hosts([MXHost(name: domain, preference: 0, addresses: [literal])])
        }
        let now = NIODeadline.now().uptimeNanoseconds / 1_000_000
        if let (result, until) = cache.withLockedValue({ $0[domain] }), now < until {
            // Equal preferences are shuffled again for each use.
            if case .hosts(let hosts) = result {
                let order = Self.order(hosts.map { ($0.preference, $0.name) }, using: &random)
                return .hosts(order.compactMap { p in hosts.first { $0.name == p.1 } })
            }
            return result
        }
        let (result, ttl) = await resolve(domain: domain, using: &random)
        if case .temporaryFailure = result { return result }
        let keep = UInt64(min(max(ttl, 5), 3600)) * 1000
        cache.withLockedValue { c in
            if c.count > 100_000 { c.removeAll() }
            c[domain] = (result, now + keep)
        }
        return result
    }

    /// The lookup itself, with the MX answer's TTL in seconds.
    private func resolve(domain: String, using random: inout some RandomNumberGenerator) async -> (MXLookupResult, Int) {
        let answer = await mxAnswer(domain)
        let ttl = answer.ttl
        return (await hosts(for: domain, answer: answer, using: &random), ttl)
    }

    private func hosts(for domain: String, answer: Answer, using random: inout some RandomNumberGenerator) async -> MXLookupResult {
        switch answer.status {
        case .nxdomain: return .notFound("\(domain): no such domain")
        case .failure(let why): return .temporaryFailure(why)
        case .ok: break
        }
        let records = answer.records.compactMap(Self.parseMX)
        if records.isEmpty {
            // No MX: the domain itself is the host (RFC 5321 §5.1 "implicit MX").
            switch await addresses(of: domain) {
            case .success(let addresses): return .hosts([MXHost(name: domain, preference: 0, addresses: addresses)])
            case .failure(.temporary(let why)): return .temporaryFailure(why)
            case .failure(.notFound(let why)): return .notFound(why)
            }
        }
        if records.contains(where: { $0.1.isEmpty }) { return .nullMX }
        var hosts: [MXHost] = []
        var temporary: String?
        var missing: String?
        for (preference, name) in Self.order(records, using: &random) {
            switch await addresses(of: name) {
            case .success(let addresses): hosts.append(MXHost(name: name, preference: preference, addresses: addresses))
            case .failure(.temporary(let why)): temporary = temporary ?? why
            case .failure(.notFound(let why)): missing = missing ?? why
            }
        }
        if !hosts.isEmpty { return .hosts(hosts) }
        // Every MX host failed to resolve: worth another try only if a failure was temporary.
        if let temporary { return .temporaryFailure(temporary) }
        return .temporaryFailure("MX hosts of \(domain) have no addresses (\(missing ?? "none"))")
    }

    // MARK: - Pure parts

    /// Sorted by preference; hosts of equal preference in random order (RFC 5321 §5.1).
    static func order(_ records: [(Int, String)], using random: inout some RandomNumberGenerator) -> [(Int, String)] {
        var out: [(Int, String)] = []
        let preferences = Set(records.map(\.0)).sorted()
        for p in preferences {
            out += records.filter { $0.0 == p }.shuffled(using: &random)
        }
        return out
    }

    /// MX RDATA as libunbound returns it: a 16-bit preference, then the exchange name as
    /// uncompressed labels. The root name (`.`) comes back as "".
    static func parseMX(_ rdata: [UInt8]) -> (Int, String)? {
        guard rdata.count >= 3 else { return nil }
        let preference = Int(rdata[0]) << 8 | Int(rdata[1])
        var labels: [String] = []
        var i = 2
        while i < rdata.count {
            let length = Int(rdata[i])
            if length == 0 { return (preference, labels.joined(separator: ".").lowercased()) }
            guard length < 64, i + 1 + length <= rdata.count else { return nil }
            labels.append(String(decoding: rdata[(i + 1)...(i + length)], as: UTF8.self))
            i += 1 + length
        }
        return nil
    }

    static func addressText(_ rdata: [UInt8]) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family: CInt
        switch rdata.count {
        case 4: family = AF_INET
        case 16: family = AF_INET6
        default: return nil
        }
        guard inet_ntop(family, rdata, &buffer, socklen_t(buffer.count)) != nil else { return nil }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3): mail for an address, no DNS.
    static func addressLiteral(_ domain: String) -> String? {
        guard domain.hasPrefix("["), domain.hasSuffix("]") else { return nil }
        var inner = domain.dropFirst().dropLast()
        if inner.lowercased().hasPrefix("ipv6:") { inner = inner.dropFirst(5) }
        return String(inner)
    }
}
