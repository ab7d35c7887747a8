#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The whole configuration, as read from `tern.yaml`. Every key is documented in
/// `config/README.md`; defaults are stated there and here.
public struct TernConfig: Sendable, Decodable {
    /// The name this relay gives itself: greeting, `Received:` headers. Default: the system host name.
    public var hostname: String
    /// The spool directory. Relative paths are relative to the working directory.
    public var spool: String
    public var listeners: [ListenerConfig]
    public var tls: TLSFiles?
    public var access: AccessConfig
    public var limits: LimitsConfig
    public var log: LogConfig
    public var delivery: DeliveryConfig
    /// Ordered; the first match wins. Without routes, all mail goes to the recipients' MX hosts.
    public var routes: [RouteConfig]
    /// Where Prometheus scrapes `/metrics`; off when unset.
    public var metrics: MetricsConfig?
    /// Pre-queue filters, in the order they run.
    public var filters: [FilterConfig]
    /// Receiving providers whose domains share a lane, in order; the first match wins.
    /// `providers_file` (a YAML list of the same entries) comes after these.
    public var providers: [ProviderConfig]
    public var providersFile: String?
    /// The user (and group) `tern serve` runs as once its listeners are bound and its keys
    /// read, when started as root; the spool belongs to it. Unset: it stays who it is.
    public var user: String?
    public var group: String?
    /// Local submission: `tern sendmail`, the maildrop and the local socket.
    public var sendmail: SendmailConfig
    /// Alerts mailed to the operator through Tern itself, for sites without Prometheus.
    public var alerts: AlertsConfig?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case hostname, spool, listeners, tls, access, limits, log, delivery, routes, metrics, filters, providers, user, group
        case sendmail, alerts
        case providersFile = "providers_file"
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        hostname = try c.decodeIfPresent(String.self, forKey: .hostname) ?? Self.systemHostname()
        spool = try c.decodeIfPresent(String.self, forKey: .spool) ?? "var/spool"
        listeners = try c.decode([ListenerConfig].self, forKey: .listeners)
        tls = try c.decodeIfPresent(TLSFiles.self, forKey: .tls)
        access = try c.decodeIfPresent(AccessConfig.self, forKey: .access) ?? AccessConfig()
        limits = try c.decodeIfPresent(LimitsConfig.self, forKey: .limits) ?? LimitsConfig()
        log = try c.decodeIfPresent(LogConfig.self, forKey: .log) ?? LogConfig()
        delivery = try c.decodeIfPresent(DeliveryConfig.self, forKey: .delivery) ?? DeliveryConfig()
        routes = try c.decodeIfPresent([RouteConfig].self, forKey: .routes) ?? []
        metrics = try c.decodeIfPresent(MetricsConfig.self, forKey: .metrics)
        filters = try c.decodeIfPresent([FilterConfig].self, forKey: .filters) ?? []
        providers = try c.decodeIfPresent([ProviderConfig].self, forKey: .providers) ?? []
        providersFile = try c.decodeIfPresent(String.self, forKey: .providersFile)
        user = try c.decodeIfPresent(String.self, forKey: .user)
        group = try c.decodeIfPresent(String.self, forKey: .group)
        sendmail = try c.decodeIfPresent(SendmailConfig.self, forKey: .sendmail) ?? SendmailConfig()
        alerts = try c.decodeIfPresent(AlertsConfig.self, forKey: .alerts)
        if group != nil, user == nil {
            throw DecodingError.dataCorruptedError(forKey: .group, in: c, debugDescription: "group needs user")
        }
    }

    static func systemHostname() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count) == 0 else { return "localhost" }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// What a listener is for. - SeeAlso: RFC 6409 (submission), RFC 8314 (implicit TLS)
public enum ListenerKind: String, Sendable, Decodable, CaseIterable {
    /// Relay port (25, 2525): STARTTLS offered when a certificate is configured.
    case smtp
    /// Submission (587): STARTTLS, then AUTH, before any mail.
    case submission
    /// Submissions (465): TLS from the first byte, then AUTH.
    case smtps

    public var requiresTLSConfig: Bool { self != .smtp }
    public var requiresAuth: Bool { self != .smtp }
}

public struct ListenerConfig: Sendable, Decodable {
    public var name: String
    public var kind: ListenerKind
    public var address: ListenAddress

    enum CodingKeys: String, CodingKey, CaseIterable { case name, kind, address }

    public init(name: String, kind: ListenerKind, address: ListenAddress) {
        self.name = name
        self.kind = kind
        self.address = address
    }

    /// Local submission over the spool's Unix socket (`tern sendmail`): filters name it
    /// `sendmail` in their `listeners:`.
    public static let localName = "sendmail"

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        do {
            kind = try c.decode(ListenerKind.self, forKey: .kind)
        } catch DecodingError.dataCorrupted {
            throw DecodingError.dataCorruptedError(
                forKey: .kind, in: c,
                debugDescription: "must be one of \(ListenerKind.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        address = try c.decode(ListenAddress.self, forKey: .address)
    }
}

public struct TLSFiles: Sendable, Decodable {
    /// PEM certificate chain, leaf first.
    public var certificate: String
    /// PEM private key.
    public var key: String

    enum CodingKeys: String, CodingKey, CaseIterable { case certificate, key }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        certificate = try c.decode(String.self, forKey: .certificate)
        key = try c.decode(String.self, forKey: .key)
    }
}

/// What to do with a bare CR or LF inside DATA. - SeeAlso: `DataDecoder`
public enum BareLineEndingPolicy: String, Sendable, Decodable, CaseIterable {
    /// Reject from everyone (`550 5.6.2`).
    case reject
    /// Reject from clients outside `mynetworks`; turn each into CRLF for clients inside.
    case normalizeTrusted = "normalize-trusted"
    /// Turn each into CRLF for everyone.
    case normalize
}

public struct AccessConfig: Sendable, Decodable {
    /// Clients in these networks may relay without AUTH.
    public var mynetworks: [CIDR]
    /// `name:crypt-hash` lines; AUTH is offered only when this is set (and only over TLS).
    public var usersFile: String?
    /// Per user, the sender addresses (`a@example.com`) or domains (`@example.com`) allowed in
    /// MAIL FROM. A user not listed may use any sender.
    public var allowedSenders: [String: [String]]
    public var bareLineEndings: BareLineEndingPolicy
    /// Envelope senders refused at MAIL, `553 5.7.1`: addresses (`spam@example.com`) or
    /// domains (`@example.com`), as qmail's badmailfrom and Postfix's check_sender_access.
    public var rejectSenders: [String]
    /// A `mynetworks` entry of /0 makes every host on the internet a trusted client (an open
    /// relay): refused unless this says that is meant.
    public var allowOpenRelay: Bool
    /// Adds `Date:`, `Message-ID:` and `From:` when a message from a `mynetworks` client has
    /// none, as Postfix does for `local_header_rewrite_clients`. Local submission always gets them.
    public var addMissingHeaders: Bool

    enum CodingKeys: String, CodingKey, CaseIterable {
        case mynetworks
        case usersFile = "users_file"
        case allowedSenders = "allowed_senders"
        case bareLineEndings = "bare_line_endings"
        case rejectSenders = "reject_senders"
        case allowOpenRelay = "i_know_this_is_an_open_relay"
        case addMissingHeaders = "add_missing_headers"
    }

    public init() {
        mynetworks = [CIDR(parsing: "127.0.0.0/8")!, CIDR(parsing: "::1/128")!]
        usersFile = nil
        allowedSenders = [:]
        bareLineEndings = .normalizeTrusted
        rejectSenders = []
        allowOpenRelay = false
        addMissingHeaders = false
    }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = AccessConfig()
        mynetworks = try c.decodeIfPresent([CIDR].self, forKey: .mynetworks) ?? d.mynetworks
        usersFile = try c.decodeIfPresent(String.self, forKey: .usersFile)
        allowedSenders = try c.decodeIfPresent([String: [String]].self, forKey: .allowedSenders) ?? [:]
        rejectSenders = try c.decodeIfPresent([String].self, forKey: .rejectSenders) ?? []
        allowOpenRelay = try c.decodeIfPresent(Bool.self, forKey: .allowOpenRelay) ?? false
        addMissingHeaders = try c.decodeIfPresent(Bool.self, forKey: .addMissingHeaders) ?? false
        if !allowOpenRelay, let open = mynetworks.firstIndex(where: { $0.prefixLength == 0 }) {
            throw DecodingError.dataCorrupted(.init(
                codingPath: c.codingPath + [CodingKeys.mynetworks, IndexKey(open)],
                debugDescription: "'\(mynetworks[open])' trusts every address on the internet: that is an open relay "
                    + "(set access.i_know_this_is_an_open_relay: true if it is meant)"))
        }
        do {
            bareLineEndings = try c.decodeIfPresent(BareLineEndingPolicy.self, forKey: .bareLineEndings) ?? d.bareLineEndings
        } catch DecodingError.dataCorrupted {
            throw DecodingError.dataCorruptedError(
                forKey: .bareLineEndings, in: c,
                debugDescription: "must be one of \(BareLineEndingPolicy.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }
}

public struct LimitsConfig: Sendable, Decodable {
    public var maxMessageSize = ByteSize(bytes: 10 << 20)
    public var maxRecipients = 1000
    public var maxConnections = 1000
    public var maxConnectionsPerClient = 50
    public var commandTimeout = ConfigDuration(.seconds(300))
    public var dataTimeout = ConfigDuration(.seconds(600))
    /// Bad commands in one session before `421` and close.
    public var maxErrors = 10
    /// Failed AUTH attempts from one client address within `authFailureWindow` before that
    /// address is disconnected on sight; each failure also slows the next reply.
    public var maxAuthFailures = 5
    public var authFailureWindow = ConfigDuration(.seconds(600))
    /// `Received:` headers a message may carry when it arrives (Postfix's `hopcount_limit`):
    /// at this many it is refused, `554 5.4.6`, as a mail loop.
    public var maxHops = 50
    /// The command and data deadlines while more than 80% of `max_connections` are taken
    /// (Postfix's stress mode): idle and slow clients give their slot up sooner.
    /// Memory for messages held whole for filters, all sessions together; a message that
    /// would take the total past it gets `452 4.3.1` after DATA instead of growing the process.
    public var filterMemory = ByteSize(bytes: 512 << 20)
    public var stressCommandTimeout = ConfigDuration(.seconds(10))
    public var stressDataTimeout = ConfigDuration(.seconds(120))
    /// Free space the spool's file system must keep (Postfix's `queue_minfree`): below it,
    /// MAIL gets `452 4.3.1`, and so does a declared SIZE that would not fit above it. By
    /// default 1.5 × `max_message_size`, so that a message under way always fits.
    public var minFreeSpace: ByteSize?
    public var effectiveMinFreeSpace: Int { minFreeSpace?.bytes ?? maxMessageSize.bytes * 3 / 2 }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case maxMessageSize = "max_message_size"
        case maxRecipients = "max_recipients"
        case maxConnections = "max_connections"
        case maxConnectionsPerClient = "max_connections_per_client"
        case commandTimeout = "command_timeout"
        case dataTimeout = "data_timeout"
        case maxErrors = "max_errors"
        case maxAuthFailures = "max_auth_failures"
        case authFailureWindow = "auth_failure_window"
        case maxHops = "max_hops"
        case minFreeSpace = "min_free_space"
        case filterMemory = "filter_memory"
        case stressCommandTimeout = "stress_command_timeout"
        case stressDataTimeout = "stress_data_timeout"
    }

    public init() {}

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = LimitsConfig()
        maxMessageSize = try c.decodeIfPresent(ByteSize.self, forKey: .maxMessageSize) ?? d.maxMessageSize
        maxRecipients = try c.decodePositive(.maxRecipients) ?? d.maxRecipients
        maxConnections = try c.decodePositive(.maxConnections) ?? d.maxConnections
        maxConnectionsPerClient = try c.decodePositive(.maxConnectionsPerClient) ?? d.maxConnectionsPerClient
        commandTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .commandTimeout) ?? d.commandTimeout
        dataTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .dataTimeout) ?? d.dataTimeout
        maxErrors = try c.decodePositive(.maxErrors) ?? d.maxErrors
        maxAuthFailures = try c.decodePositive(.maxAuthFailures) ?? d.maxAuthFailures
        authFailureWindow = try c.decodeIfPresent(ConfigDuration.self, forKey: .authFailureWindow) ?? d.authFailureWindow
        maxHops = try c.decodePositive(.maxHops) ?? d.maxHops
        minFreeSpace = try c.decodeIfPresent(ByteSize.self, forKey: .minFreeSpace)
        filterMemory = try c.decodeIfPresent(ByteSize.self, forKey: .filterMemory) ?? d.filterMemory
        stressCommandTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .stressCommandTimeout) ?? d.stressCommandTimeout
        stressDataTimeout = try c.decodeIfPresent(ConfigDuration.self, forKey: .stressDataTimeout) ?? d.stressDataTimeout
    }
}

/// `alerts:`: thresholds whose crossing Tern mails to the operator, through its own queue, at
/// most once per `repeat` for each kind, and once more when it clears; as the deployment
/// guides' cron script does, without the script.
public struct AlertsConfig: Sendable, Decodable, Equatable {
    /// Who gets the alerts.
    public var to: [String]
    /// The sender (default: `tern@` the sendmail origin).
    public var from: String?
    /// Messages queued (default 1000).
    public var queueDepth: Int? = 1000
    /// The oldest queued message's age (default 1h).
    public var oldestMessage: ConfigDuration? = ConfigDuration(.seconds(3600))
    /// Logins refused by next hops within `window` (default 1).
    public var upstreamAuthFailures: Int? = 1
    /// Failed TLS with next hops within `window` (default 5).
    public var tlsFailures: Int? = 5
    /// Bounced share of the deliveries within `window`, in percent (default 5), once at least
    /// `min_deliveries` were made.
    public var bounceRate: Double? = 5
    public var minDeliveries = 20
    public var window = ConfigDuration(.seconds(3600))
    /// At most one mail per kind of alert per this long (default 1h).
    public var `repeat` = ConfigDuration(.seconds(3600))
    /// How often thresholds are checked (default 1m).
    public var checkEvery = ConfigDuration(.seconds(60))

    enum CodingKeys: String, CodingKey, CaseIterable {
        case to, from, window, `repeat`
        case queueDepth = "queue_depth"
        case oldestMessage = "oldest_message"
        case upstreamAuthFailures = "upstream_auth_failures"
        case tlsFailures = "tls_failures"
        case bounceRate = "bounce_rate"
        case minDeliveries = "min_deliveries"
        case checkEvery = "check_every"
    }

    public init(to: [String]) { self.to = to }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        to = try c.decode([String].self, forKey: .to)
        guard !to.isEmpty, to.allSatisfy({ $0.contains("@") && !$0.contains(where: { $0 == " " || $0 == "<" || $0 == ">" }) }) else {
            throw DecodingError.dataCorruptedError(forKey: .to, in: c, debugDescription: "needs at least one address (user@domain)")
        }
        from = try c.decodeIfPresent(String.self, forKey: .from)
        // A threshold set to `off` (null) is not checked.
        func threshold<T: Decodable>(_ key: CodingKeys, _ fallback: T?) throws -> T? {
            guard c.contains(key) else { return fallback }
            return try c.decodeNil(forKey: key) ? nil : c.decode(T.self, forKey: key)
        }
        queueDepth = try threshold(.queueDepth, queueDepth)
        oldestMessage = try threshold(.oldestMessage, oldestMessage)
        upstreamAuthFailures = try threshold(.upstreamAuthFailures, upstreamAuthFailures)
        tlsFailures = try threshold(.tlsFailures, tlsFailures)
        bounceRate = try threshold(.bounceRate, bounceRate)
        if let rate = bounceRate, !(0...100).contains(rate) {
            throw DecodingError.dataCorruptedError(forKey: .bounceRate, in: c, debugDescription: "a percentage, 0 to 100")
        }
        minDeliveries = try c.decodeIfPresent(Int.self, forKey: .minDeliveries) ?? minDeliveries
        window = try c.decodeIfPresent(ConfigDuration.self, forKey: .window) ?? window
        self.repeat = try c.decodeIfPresent(ConfigDuration.self, forKey: .repeat) ?? self.repeat
        checkEvery = try c.decodeIfPresent(ConfigDuration.self, forKey: .checkEvery) ?? checkEvery
    }
}

public struct MetricsConfig: Sendable, Decodable {
    /// `host:port` of the HTTP endpoint serving `/metrics` in the Prometheus text format.
    public var address: ListenAddress

    enum CodingKeys: String, CodingKey, CaseIterable { case address }

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        address = try c.decode(ListenAddress.self, forKey: .address)
    }
}

/// Local submission (`tern sendmail`): who may submit, and the domain of local senders.
///
/// The daemon listens on `<spool>/public/sendmail`, a Unix socket; when it is down, `tern
/// sendmail` writes to `<spool>/maildrop`, which the daemon picks up. Both are open to root,
/// the daemon's user and the members of `group`, never to everyone (as Postfix's `postdrop`
/// group guards its maildrop).
public struct SendmailConfig: Sendable, Decodable {
    /// The group whose members may submit. Unset: only root and the daemon's user.
    public var group: String?
    /// The domain of a local user's address (`user@origin`) when no `-f` names the sender,
    /// as Postfix's `myorigin`. Default: `hostname`.
    public var origin: String?

    enum CodingKeys: String, CodingKey, CaseIterable { case group, origin }

    public init() {}

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        group = try c.decodeIfPresent(String.self, forKey: .group)
        origin = try c.decodeIfPresent(String.self, forKey: .origin)
        if let origin, origin.isEmpty || origin.contains(where: { $0 == "@" || $0 == " " || $0 == "<" || $0 == ">" }) {
            throw DecodingError.dataCorruptedError(forKey: .origin, in: c, debugDescription: "must be a domain name")
        }
    }
}

public struct LogConfig: Sendable, Decodable {
    /// trace, debug, info, notice, warning, error, critical.
    public var level: String = "info"
    /// Where lines go: standard error, the local syslog (facility `mail`, so rsyslog puts
    /// them in /var/log/mail.log), or a file that SIGUSR1 or `tern reload` reopens.
    public var output: LogSink.Output = .stderr
    /// `tern` (ISO timestamps, the level) or `postfix` (syslog timestamps, host name,
    /// `tern/smtpd[pid]`), for grep habits and pflogsumm. Syslog output is always the latter.
    public var style: LogSink.Style = .tern

    enum CodingKeys: String, CodingKey, CaseIterable {
        case level, output, file, style
        case syslogSocket = "syslog_socket"
    }
    static let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]

    public init() {}

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        level = try c.decodeIfPresent(String.self, forKey: .level) ?? "info"
        guard Self.levels.contains(level) else {
            throw DecodingError.dataCorruptedError(
                forKey: .level, in: c, debugDescription: "must be one of \(Self.levels.joined(separator: ", "))")
        }
        let styleName = try c.decodeIfPresent(String.self, forKey: .style) ?? "tern"
        guard let style = LogSink.Style(rawValue: styleName) else {
            throw DecodingError.dataCorruptedError(forKey: .style, in: c, debugDescription: "must be one of tern, postfix")
        }
        self.style = style
        let kind = try c.decodeIfPresent(String.self, forKey: .output) ?? "stderr"
        let file = try c.decodeIfPresent(String.self, forKey: .file)
        switch kind {
        case "stderr":
            output = .stderr
        case "syslog":
            output = .syslog(socket: try c.decodeIfPresent(String.self, forKey: .syslogSocket) ?? "/dev/log")
        case "file":
            guard let file else {
                throw DecodingError.dataCorruptedError(forKey: .output, in: c, debugDescription: "output: file needs log.file: PATH")
            }
            output = .file(file)
        default:
            throw DecodingError.dataCorruptedError(forKey: .output, in: c, debugDescription: "must be one of stderr, syslog, file")
        }
    }
}

// MARK: - Strict decoding

struct AnyCodingKey: CodingKey {
    var stringValue: String
    var intValue: Int?
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) {
        self.stringValue = String(intValue)
        self.intValue = intValue
    }
}

/// Thrown for a key the schema does not know; the loader turns it into a `ConfigError`.
struct UnknownKeyError: Error {
    var codingPath: [any CodingKey]
    var known: [String]
}

extension Decoder {
    /// A misspelt key must not be silently ignored: it usually means a setting the operator
    /// believes is in force is not.
    public func rejectUnknownKeys<K: CodingKey & CaseIterable>(_ keys: K.Type) throws {
        let c = try container(keyedBy: AnyCodingKey.self)
        let known = K.allCases.map(\.stringValue)
        for key in c.allKeys where !known.contains(key.stringValue) {
            throw UnknownKeyError(codingPath: codingPath + [key], known: known)
        }
    }
}

extension KeyedDecodingContainer {
    func decodePositive(_ key: Key) throws -> Int? {
        guard let n = try decodeIfPresent(Int.self, forKey: key) else { return nil }
        guard n > 0 else { throw DecodingError.dataCorruptedError(forKey: key, in: self, debugDescription: "must be greater than 0") }
        return n
    }
}

/// A position in a list, for error paths such as `access.mynetworks[1]`.
private struct IndexKey: CodingKey {
    var stringValue: String
    var intValue: Int?
    init(_ index: Int) {
        stringValue = "Index \(index)"
        intValue = index
    }
    init?(stringValue: String) { return nil }
    init?(intValue: Int) { self.init(intValue) }
}
