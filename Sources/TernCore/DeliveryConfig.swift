#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How mail leaves: timeouts, the retry schedule, the queue lifetime, per-lane defaults and
/// bounces. Routes (which recipients go where) are a separate top-level list.
public struct DeliveryConfig: Sendable, Decodable {
    /// Queue mail but deliver none (maintenance, or a relay that is only being tested);
    /// like Postfix's `defer_transports`.
    public var paused = false
    /// Port for direct MX delivery (25 on the internet; tests use another).
    public var mxPort = 25
    /// `host:port` of the DNS server to ask; `/etc/resolv.conf` when not set.
    public var resolver: ListenAddress?
    /// TLS policy for direct MX delivery: `may` (opportunistic), as Postfix does by default.
    public var mxTLS = TLSPolicyName.may
    public var connectTimeout = ConfigDuration(.seconds(30))
    public var commandTimeout = ConfigDuration(.seconds(300))
    public var dataTimeout = ConfigDuration(.seconds(600))
    /// First retry delay; it doubles after each failed attempt, up to `retry_maximum`.
    public var retryFirst = ConfigDuration(.seconds(300))
    public var retryMaximum = ConfigDuration(.seconds(14_400))
    /// Fraction of each delay added or removed at random (0 to 1).
    public var retryJitter = 0.2
    /// Recipients still deferred this long after arrival are bounced.
    public var queueLifetime = ConfigDuration(.seconds(432_000))
    /// When set, a sender whose mail has been deferred this long gets one delay warning.
    public var delayWarning: ConfigDuration?
    /// Where bounces of bounces (mail from `<>` that cannot be delivered) go; dropped when unset.
    public var postmaster: String?
    /// Default limits of each destination lane.
    public var lane = LaneLimits()
    /// What to do when a server's reply matches: suspend the lane, slow it, or bounce.
    public var replyRules: [ReplyRule] = []
    /// A lane with nothing queued, open, slowed or suspended for this long is forgotten
    /// (made again from its limits when mail for it comes).
    public var laneIdleTime = ConfigDuration(.seconds(600))
    /// Transactions handed to lanes and not yet done, in all (Postfix's active queue,
    /// `qmgr_message_active_limit`); more due mail waits in the queue, in arrival order.
    public var activeLimit = 20_000

    enum CodingKeys: String, CodingKey, CaseIterable {
        case paused
        case mxPort = "mx_port"
        case resolver
        case mxTLS = "mx_tls"
        case connectTimeout = "connect_timeout"
        case commandTimeout = "command_timeout"
        case dataTimeout = "data_timeout"
        case retryFirst = "retry_first"
        case retryMaximum = "retry_maximum"
        case retryJitter = "retry_jitter"
        case queueLifetime = "queue_lifetime"
        case delayWarning = "delay_warning"
        case postmaster
        case lane
        case replyRules = "reply_rules"
        case laneIdleTime = "lane_idle_time"
        case activeLimit = "active_limit"
    }

    public init() {}

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = DeliveryConfig()
        paused = try c.decodeIfPresent(Bool.self, forKey: .paused) ?? d.paused
        mxPort = try c.decodeIfPresent(Int.self, forKey: .mxPort) ?? d.mxPort
        guard (1...65535).contains(mxPort) else {
            throw DecodingError.dataCorruptedError(forKey: .mxPort, in: c, debugDescription: "must be a port, 1 to 65535")
        }
        resolver = try c.decodeIfPresent(ListenAddress.self, forKey: .resolver)
        mxTLS = try c.decodeEnum(.mxTLS) ?? d.mxTLS
        connectTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .connectTimeout) ?? d.connectTimeout
        commandTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .commandTimeout) ?? d.commandTimeout
        dataTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .dataTimeout) ?? d.dataTimeout
        retryFirst = try c.decodeIfPresent(ConfigDuration.self, forKey: .retryFirst) ?? d.retryFirst
        retryMaximum = try c.decodeIfPresent(ConfigDuration.self, forKey: .retryMaximum) ?? d.retryMaximum
        retryJitter = try c.decodeIfPresent(Double.self, forKey: .retryJitter) ?? d.retryJitter
        queueLifetime = try c.decodeIfPresent(ConfigDuration.self, forKey: .queueLifetime) ?? d.queueLifetime
        delayWarning = try c.decodeIfPresent(ConfigDuration.self, forKey: .delayWarning)
        postmaster = try c.decodeIfPresent(String.self, forKey: .postmaster)
        lane = try c.decodeIfPresent(LaneLimits.self, forKey: .lane) ?? d.lane
        replyRules = try c.decodeIfPresent([ReplyRule].self, forKey: .replyRules) ?? []
        laneIdleTime = try c.decodeIfPresent(ConfigDuration.self, forKey: .laneIdleTime) ?? d.laneIdleTime
        activeLimit = try c.decodePositive(.activeLimit) ?? d.activeLimit
        for (key, value) in [
            (CodingKeys.retryFirst, retryFirst), (.connectTimeout, connectTimeout), (.commandTimeout, commandTimeout), (.dataTimeout, dataTimeout),
            (.laneIdleTime, laneIdleTime),
        ]
        where value.duration <= .zero {
            throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "must be longer than 0s")
        }
        guard retryMaximum.duration >= retryFirst.duration else {
            throw DecodingError.dataCorruptedError(forKey: .retryMaximum, in: c, debugDescription: "must not be shorter than retry_first (\(retryFirst))")
        }
        guard (0...1).contains(retryJitter) else {
            throw DecodingError.dataCorruptedError(forKey: .retryJitter, in: c, debugDescription: "must be between 0 and 1")
        }
        if let p = postmaster, !p.contains("@") {
            throw DecodingError.dataCorruptedError(forKey: .postmaster, in: c, debugDescription: "'\(p)' is not an address such as postmaster@example.com")
        }
    }
}

/// Limits of one destination lane (a smarthost, or a recipient domain's MX hosts).
public struct LaneLimits: Sendable, Decodable, Equatable {
    /// Connections open at once, at most.
    public var maxConnections = 20
    /// Messages sent over one connection before it is closed and a new one opened.
    public var messagesPerConnection = 100
    /// Connections a lane starts with; the window grows by one per success up to
    /// `max_connections`, and shrinks on connection or greeting failures (Postfix's
    /// `initial_destination_concurrency`).
    public var initialConnections = 5
    /// How long a destination that failed every connection in a window rests before the
    /// next try. Mail for it waits meanwhile, deferred.
    public var deadTime = ConfigDuration(.seconds(300))
    /// Messages per second, minute or hour, at most (a token bucket); unlimited when unset.
    public var rate: RateLimit?
    /// Messages that may go at once after a quiet spell (the bucket's size).
    public var burst = 1
    /// New connections per second, minute or hour, at most; unlimited when unset.
    public var connectionRate: RateLimit?
    /// Connections that may open at once after a quiet spell under `connection_rate`.
    public var connectionBurst = 1
    /// Recipients in one transaction, at most; a message with more is sent in several.
    public var maxRecipients = 100
    /// Transactions handed to the lane and not yet done, at most; more mail for it waits in
    /// the queue (not in the lane) until the lane has room, so that one slow destination
    /// cannot fill the active queue.
    public var maxQueued = 2000
    /// The local address connections to this destination leave from.
    public var sourceAddress: String?
    /// Share of soft failures (4xx, failed connections) over the last 20 attempts at which
    /// the lane halves its connections and rate; 0 turns the automatic backoff off.
    public var backoffThreshold = 0.5

    enum CodingKeys: String, CodingKey, CaseIterable {
        case maxConnections = "max_connections"
        case messagesPerConnection = "messages_per_connection"
        case initialConnections = "initial_connections"
        case deadTime = "dead_time"
        case rate, burst
        case connectionRate = "connection_rate"
        case connectionBurst = "connection_burst"
        case maxRecipients = "max_recipients"
        case maxQueued = "max_queued"
        case sourceAddress = "source_address"
        case backoffThreshold = "backoff_threshold"
    }

    public init() {}

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = LaneLimits()
        maxConnections = try c.decodePositive(.maxConnections) ?? d.maxConnections
        messagesPerConnection = try c.decodePositive(.messagesPerConnection) ?? d.messagesPerConnection
        initialConnections = min(try c.decodePositive(.initialConnections) ?? d.initialConnections, maxConnections)
        deadTime = try c.decodeIfPresent(ConfigDuration.self, forKey: .deadTime) ?? d.deadTime
        rate = try c.decodeIfPresent(RateLimit.self, forKey: .rate)
        burst = try c.decodePositive(.burst) ?? d.burst
        connectionRate = try c.decodeIfPresent(RateLimit.self, forKey: .connectionRate)
        connectionBurst = try c.decodePositive(.connectionBurst) ?? d.connectionBurst
        maxRecipients = try c.decodePositive(.maxRecipients) ?? d.maxRecipients
        maxQueued = try c.decodePositive(.maxQueued) ?? d.maxQueued
        sourceAddress = try Self.decodeAddress(c, .sourceAddress)
        backoffThreshold = try Self.decodeShare(c, .backoffThreshold) ?? d.backoffThreshold
    }

    static func decodeShare(_ c: KeyedDecodingContainer<CodingKeys>, _ key: CodingKeys) throws -> Double? {
        guard let v = try c.decodeIfPresent(Double.self, forKey: key) else { return nil }
        guard (0...1).contains(v) else { throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "must be between 0 and 1") }
        return v
    }

    static func decodeAddress(_ c: KeyedDecodingContainer<CodingKeys>, _ key: CodingKeys) throws -> String? {
        guard let text = try c.decodeIfPresent(String.self, forKey: key) else { return nil }
        guard IPAddress(parsing: text) != nil else {
            throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "'\(text)' is not an IP address")
        }
        return text
    }
}

/// `60/min`, `10/s`, `5000/h`.
public struct RateLimit: Sendable, Decodable, Equatable, CustomStringConvertible {
    public var count: Int
    public var perMillis: Int64

    public init?(parsing text: String) {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let n = Int(parts[0].filter { $0 != " " }), n > 0 else { return nil }
        switch parts[1].filter({ $0 != " " }).lowercased() {
        case "s", "sec", "second": perMillis = 1000
        case "m", "min", "minute": perMillis = 60_000
        case "h", "hour": perMillis = 3_600_000
        default: return nil
        }
        count = n
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let r = RateLimit(parsing: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text)' is not a rate such as 10/s, 60/min or 5000/h")
        }
        self = r
    }

    public var description: String { "\(count)/\(perMillis == 1000 ? "s" : perMillis == 60_000 ? "min" : "h")" }
}

/// The TLS policies a config can name; `Transports.TLSPolicy` is this type.
public enum TLSPolicyName: String, Sendable, Decodable, CaseIterable {
    case none, may, encrypt, verify
}

/// One line of the ordered `routes` table: which recipients (and, optionally, which senders)
/// it covers, and where their mail goes. The first line that matches wins.
public struct RouteConfig: Sendable, Decodable {
    public enum Transport: String, Sendable, Decodable, CaseIterable { case mx, smarthost }

    public var name: String
    /// Recipient domains: `example.com` (exactly), `.example.com` (its subdomains) or `*`.
    public var domains: [String]
    /// Sender domains, the same forms; the route applies only to mail from these when set.
    public var senderDomains: [String]?
    public var transport: Transport
    public var smarthost: SmarthostConfig?
    /// Lane limits for this route's destinations; unset keys come from `delivery.lane`.
    public var lane: LaneOverrides?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, domains
        case senderDomains = "sender_domains"
        case transport, smarthost, lane
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        domains = try c.decode([String].self, forKey: .domains).map { $0.lowercased() }
        senderDomains = try c.decodeIfPresent([String].self, forKey: .senderDomains)?.map { $0.lowercased() }
        guard let t = try c.decodeEnum(.transport) as Transport? else {
            throw DecodingError.keyNotFound(CodingKeys.transport, .init(codingPath: c.codingPath, debugDescription: "transport is required"))
        }
        transport = t
        smarthost = try c.decodeIfPresent(SmarthostConfig.self, forKey: .smarthost)
        lane = try c.decodeIfPresent(LaneOverrides.self, forKey: .lane)
        for pattern in domains + (senderDomains ?? []) where !Self.isValidPattern(pattern) {
            throw DecodingError.dataCorruptedError(
                forKey: .domains, in: c, debugDescription: "'\(pattern)' is not a domain, a .subdomain pattern or *")
        }
        switch (transport, smarthost) {
        case (.smarthost, nil):
            throw DecodingError.dataCorruptedError(forKey: .smarthost, in: c, debugDescription: "transport smarthost needs a smarthost: section")
        case (.mx, .some):
            throw DecodingError.dataCorruptedError(forKey: .smarthost, in: c, debugDescription: "only for transport: smarthost")
        default: break
        }
    }

    static func isValidPattern(_ p: String) -> Bool {
        if p == "*" { return true }
        let body = p.hasPrefix(".") ? p.dropFirst() : Substring(p)
        return !body.isEmpty && !body.contains("@") && !body.contains(" ") && !body.hasPrefix(".") && !body.hasSuffix(".")
    }
}

/// Route-level lane limits; each key overrides `delivery.lane` when present.
public struct LaneOverrides: Sendable, Decodable {
    public var maxConnections: Int?
    public var messagesPerConnection: Int?
    public var initialConnections: Int?
    public var deadTime: ConfigDuration?
    public var rate: RateLimit?
    public var burst: Int?
    public var connectionRate: RateLimit?
    public var connectionBurst: Int?
    public var maxRecipients: Int?
    public var maxQueued: Int?
    public var sourceAddress: String?
    public var backoffThreshold: Double?

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(LaneLimits.CodingKeys.self)
        let c = try decoder.container(keyedBy: LaneLimits.CodingKeys.self)
        maxConnections = try c.decodePositive(.maxConnections)
        messagesPerConnection = try c.decodePositive(.messagesPerConnection)
        initialConnections = try c.decodePositive(.initialConnections)
        deadTime = try c.decodeIfPresent(ConfigDuration.self, forKey: .deadTime)
        rate = try c.decodeIfPresent(RateLimit.self, forKey: .rate)
        burst = try c.decodePositive(.burst)
        connectionRate = try c.decodeIfPresent(RateLimit.self, forKey: .connectionRate)
        connectionBurst = try c.decodePositive(.connectionBurst)
        maxRecipients = try c.decodePositive(.maxRecipients)
        maxQueued = try c.decodePositive(.maxQueued)
        sourceAddress = try LaneLimits.decodeAddress(c, .sourceAddress)
        backoffThreshold = try LaneLimits.decodeShare(c, .backoffThreshold)
    }

    public func applied(to defaults: LaneLimits) -> LaneLimits {
        var l = defaults
        if let v = maxConnections { l.maxConnections = v }
        if let v = messagesPerConnection { l.messagesPerConnection = v }
        if let v = initialConnections { l.initialConnections = v }
        if let v = deadTime { l.deadTime = v }
        if let v = rate { l.rate = v }
        if let v = burst { l.burst = v }
        if let v = connectionRate { l.connectionRate = v }
        if let v = connectionBurst { l.connectionBurst = v }
        if let v = maxRecipients { l.maxRecipients = v }
        if let v = maxQueued { l.maxQueued = v }
        if let v = sourceAddress { l.sourceAddress = v }
        if let v = backoffThreshold { l.backoffThreshold = v }
        l.initialConnections = min(l.initialConnections, l.maxConnections)
        return l
    }
}

/// An upstream relay (SES, Mailgun, a managed relay).
public struct SmarthostConfig: Sendable, Decodable {
    public var host: String
    public var port: Int
    /// `verify` by default: a smarthost gets our credentials and all our mail.
    public var tls: TLSPolicyName
    /// PEM CA bundle for `verify`; the system's trust store when unset.
    public var caFile: String?
    public var auth: SmarthostAuth?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case host, port, tls
        case caFile = "ca_file"
        case auth
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        host = try c.decode(String.self, forKey: .host)
        port = try c.decodeIfPresent(Int.self, forKey: .port) ?? 587
        guard (1...65535).contains(port) else {
            throw DecodingError.dataCorruptedError(forKey: .port, in: c, debugDescription: "must be a port, 1 to 65535")
        }
        tls = try c.decodeEnum(.tls) ?? .verify
        caFile = try c.decodeIfPresent(String.self, forKey: .caFile)
        auth = try c.decodeIfPresent(SmarthostAuth.self, forKey: .auth)
    }
}

public struct SmarthostAuth: Sendable, Decodable {
    public var user: String
    /// A file holding the password on its first line. It must not be readable by group or
    /// others (like Postfix's `sasl_passwd`); Tern refuses to start otherwise.
    public var passwordFile: String
    /// AUTH over a connection without TLS; off unless set here explicitly.
    public var allowPlaintext: Bool

    enum CodingKeys: String, CodingKey, CaseIterable {
        case user
        case passwordFile = "password_file"
        case allowPlaintext = "allow_plaintext"
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        user = try c.decode(String.self, forKey: .user)
        passwordFile = try c.decode(String.self, forKey: .passwordFile)
        allowPlaintext = try c.decodeIfPresent(Bool.self, forKey: .allowPlaintext) ?? false
    }

    /// Reads the password, refusing a file that group or others can read.
    public func readPassword() throws(ConfigError) -> String {
        var st = stat()
        guard stat(passwordFile, &st) == 0 else {
            throw ConfigError(file: passwordFile, line: nil, keyPath: "", message: "cannot read: \(String(cString: strerror(errno)))")
        }
        guard st.st_mode & 0o077 == 0 else {
            let mode = String(st.st_mode & 0o777, radix: 8)
            throw ConfigError(
                file: passwordFile, line: nil, keyPath: "",
                message: "mode \(mode) lets other users read the password; chmod 600 it")
        }
        guard let text = ConfigLoader.readFile(passwordFile) else {
            throw ConfigError(file: passwordFile, line: nil, keyPath: "", message: "cannot read: \(String(cString: strerror(errno)))")
        }
        let line = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        let password = line.hasSuffix("\r") ? String(line.dropLast()) : line
        guard !password.isEmpty else {
            throw ConfigError(file: passwordFile, line: nil, keyPath: "", message: "the first line (the password) is empty")
        }
        return password
    }
}

extension KeyedDecodingContainer {
    /// An enum value, with the allowed values named in the error.
    public func decodeEnum<T: RawRepresentable & Decodable & CaseIterable>(_ key: Key) throws -> T? where T.RawValue == String {
        do {
            return try decodeIfPresent(T.self, forKey: key)
        } catch DecodingError.dataCorrupted {
            throw DecodingError.dataCorruptedError(
                forKey: key, in: self, debugDescription: "must be one of \(T.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }
}

/// A receiving provider ("site"): every recipient domain whose MX hosts match one of its
/// patterns shares one lane and its limits (Gmail and every Google Workspace domain, say).
public struct ProviderConfig: Sendable, Decodable {
    public var name: String
    /// MX host names: `*.google.com` (any host under it) or an exact name.
    public var mx: [String]
    public var lane: LaneOverrides?

    enum CodingKeys: String, CodingKey, CaseIterable { case name, mx, lane }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        mx = try c.decode([String].self, forKey: .mx).map { $0.lowercased() }
        lane = try c.decodeIfPresent(LaneOverrides.self, forKey: .lane)
        for p in mx where p.isEmpty || p.contains(" ") || (p.contains("*") && !p.hasPrefix("*.")) {
            throw DecodingError.dataCorruptedError(forKey: .mx, in: c, debugDescription: "'\(p)' is not a host name or a *.domain pattern")
        }
    }

    /// Whether an MX host name belongs to this provider.
    public func matches(_ host: String) -> Bool {
        let h = host.lowercased()
        return mx.contains { p in p.hasPrefix("*.") ? h.hasSuffix(p.dropFirst()) : h == p }
    }
}

/// A rule on the replies a lane gets (Yahoo's `421 4.7.0 [TS04]`, Gmail's `421 4.7.28`):
/// when a reply matches, the lane is suspended or slowed for a while, or the recipient is
/// bounced instead of retried.
public struct ReplyRule: @unchecked Sendable, Decodable {
    public enum Action: String, Sendable, Decodable, CaseIterable { case suspend, reduce, bounce }

    /// Reply code (421) or class (4, 5); any when unset.
    public var code: Int?
    /// Enhanced status code prefix (`4.7.28`, `4.7`); any when unset.
    public var enhanced: String?
    /// A regular expression searched in the reply text; any when unset.
    public var text: String?
    /// `text`, compiled once. (Regex is immutable once built; it is only matched against.)
    private var regex: Regex<AnyRegexOutput>?
    /// Only for these lanes (`provider:yahoo`, `example.com`); every lane when unset.
    public var lanes: [String]?
    public var action: Action
    /// How long a suspension or reduction lasts.
    public var duration: ConfigDuration
    /// For `reduce`: the share of connections and rate kept (0.5 halves them).
    public var factor: Double

    enum CodingKeys: String, CodingKey, CaseIterable {
        case code, enhanced, text, lanes, action
        case duration = "for"
        case factor
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        code = try c.decodeIfPresent(Int.self, forKey: .code)
        enhanced = try c.decodeIfPresent(String.self, forKey: .enhanced)
        text = try c.decodeIfPresent(String.self, forKey: .text)
        lanes = try c.decodeIfPresent([String].self, forKey: .lanes)
        guard let a = try c.decodeEnum(.action) as Action? else {
            throw DecodingError.keyNotFound(CodingKeys.action, .init(codingPath: c.codingPath, debugDescription: "action is required"))
        }
        action = a
        duration = try c.decodeIfPresent(ConfigDuration.self, forKey: .duration) ?? ConfigDuration(.seconds(3600))
        factor = try c.decodeIfPresent(Double.self, forKey: .factor) ?? 0.5
        if let code, !(4...5).contains(code), !(400...599).contains(code) {
            throw DecodingError.dataCorruptedError(forKey: .code, in: c, debugDescription: "must be a 4xx or 5xx code, or 4 or 5")
        }
        if let text {
            do { regex = try Regex(text) } catch {
                throw DecodingError.dataCorruptedError(forKey: .text, in: c, debugDescription: "'\(text)' is not a valid regular expression")
            }
        }
        guard factor > 0, factor < 1 else {
            throw DecodingError.dataCorruptedError(forKey: .factor, in: c, debugDescription: "must be between 0 and 1")
        }
        if code == nil, enhanced == nil, text == nil {
            throw DecodingError.dataCorruptedError(forKey: .action, in: c, debugDescription: "a rule needs code, enhanced or text to match")
        }
    }

    /// Whether a reply (`421 4.7.0 text`, as the diagnostic carries it) matches.
    public func matches(code replyCode: Int, enhanced replyEnhanced: String?, text replyText: String, lane: String) -> Bool {
        // A lane with its own source address (`provider:yahoo/192.0.2.7`) is also matched by
        // its destination alone.
        if let lanes, !lanes.contains(lane), !lanes.contains(where: { lane.hasPrefix($0 + "/") }) { return false }
        if let code {
            if code < 10 { guard replyCode / 100 == code else { return false } } else { guard replyCode == code else { return false } }
        }
        if let enhanced {
            guard let e = replyEnhanced, e == enhanced || e.hasPrefix(enhanced + ".") else { return false }
        }
        if let regex {
            guard (try? regex.firstMatch(in: replyText)) != nil else { return false }
        }
        return true
    }
}
