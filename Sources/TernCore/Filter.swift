import SMTPProtocol

/// What a filter knows of the session a message came in on.
public struct FilterSession: Sendable {
    public var client: ClientInfo
    /// The client's name from reverse DNS, when known.
    public var clientName: String?
    public var listener: String
    /// The listener's own address (`{daemon_addr}`).
    public var listenerAddress: String?
    public var authUser: String?
    public var authMechanism: String?
    /// This relay's name (`hostname`).
    public var hostname: String
    /// The MAIL command's ESMTP parameters, as the client gave them (`SIZE=…`, `BODY=…`).
    public var mailParameters: [String] = []

    public init(
        client: ClientInfo, clientName: String? = nil, listener: String, listenerAddress: String? = nil, authUser: String? = nil,
        authMechanism: String? = nil, hostname: String
    ) {
        self.client = client
        self.clientName = clientName
        self.listener = listener
        self.listenerAddress = listenerAddress
        self.authUser = authUser
        self.authMechanism = authMechanism
        self.hostname = hostname
    }
}

/// A message at the end of DATA, as the chain passes it from filter to filter. Filters
/// change it in place: headers, body, sender, recipients.
public struct FilterMessage: Sendable {
    public var queueID: String
    public var sender: String
    public var recipients: [EnvelopeRecipient]
    public var headers: HeaderBlock
    /// Everything after the empty line that ends the headers (CRLF line endings).
    public var body: [UInt8]

    public init(queueID: String, sender: String, recipients: [EnvelopeRecipient], headers: HeaderBlock, body: [UInt8]) {
        self.queueID = queueID
        self.sender = sender
        self.recipients = recipients
        self.headers = headers
        self.body = body
    }

    /// The message as it will be queued.
    public var content: [UInt8] { headers.serialized + body }
}

/// A filter's answer at one stage.
public enum FilterVerdict: Sendable, Equatable {
    /// Go on to the next filter.
    case `continue`
    /// Queue the message without asking the filters after this one.
    case accept
    /// Refuse with this reply (5xx), which the client gets as the answer to the command.
    case reject(SMTPReply)
    /// Refuse for now (4xx).
    case tempfail(SMTPReply)
    /// Answer 250 but queue nothing; logged.
    case discard
    /// Queue the message on hold, with the reason.
    case quarantine(String)
}

/// What a filter does when it fails or does not answer in time.
public enum FilterFailureAction: String, Sendable, Decodable, CaseIterable {
    case accept, tempfail, reject
}

/// A pre-queue filter. Every stage has a default that lets the message through, so a filter
/// implements only the stages it cares about. Filters may be called concurrently for
/// different sessions.
public protocol MessageFilter: Sendable {
    var name: String { get }
    func connect(_ session: FilterSession) async throws -> FilterVerdict
    func helo(_ session: FilterSession, name: String) async throws -> FilterVerdict
    func mail(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict
    func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async throws -> FilterVerdict
    /// The whole message; the filter may change it in place.
    func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict
}

extension MessageFilter {
    public func connect(_ session: FilterSession) async throws -> FilterVerdict { .continue }
    public func helo(_ session: FilterSession, name: String) async throws -> FilterVerdict { .continue }
    public func mail(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict { .continue }
    public func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async throws -> FilterVerdict { .continue }
}

/// Filters in their configured order, each with the action that applies when it fails.
public struct FilterChain: Sendable {
    public struct Entry: Sendable {
        public var filter: any MessageFilter
        public var onFailure: FilterFailureAction
        /// Listener names it applies to; all when nil.
        public var listeners: Set<String>?

        public init(filter: any MessageFilter, onFailure: FilterFailureAction, listeners: Set<String>? = nil) {
            self.filter = filter
            self.onFailure = onFailure
            self.listeners = listeners
        }
    }

    public var entries: [Entry]

    public init(_ entries: [Entry]) { self.entries = entries }

    public func applies(to listener: String) -> Bool {
        entries.contains { $0.listeners?.contains(listener) ?? true }
    }

    /// The outcome of a run: the verdict that ended it (`.continue` when every filter let
    /// the message through) and which filter gave it.
    public struct Outcome: Sendable, Equatable {
        public var verdict: FilterVerdict
        public var filter: String?
        /// Filters that failed, with their error, and the action applied for them.
        public var failures: [String]
    }

    /// Runs the end-of-message stage through every filter for this listener.
    public func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async -> Outcome {
        var failures: [String] = []
        for entry in entries where entry.listeners?.contains(session.listener) ?? true {
            let verdict: FilterVerdict
            do {
                verdict = try await entry.filter.endOfMessage(session, &message)
            } catch {
                failures.append("\(entry.filter.name): \(error); \(entry.onFailure.rawValue)")
                switch entry.onFailure {
                case .accept: continue
                case .tempfail:
                    return Outcome(
                        verdict: .tempfail(SMTPReply(451, EnhancedStatusCode(4, 7, 1), "Service unavailable, try again later")),
                        filter: entry.filter.name, failures: failures)
                case .reject:
                    return Outcome(
                        verdict: .reject(SMTPReply(550, EnhancedStatusCode(5, 7, 1), "Message refused by policy")),
                        filter: entry.filter.name, failures: failures)
                }
            }
            if verdict != .continue { return Outcome(verdict: verdict, filter: entry.filter.name, failures: failures) }
        }
        return Outcome(verdict: .continue, filter: nil, failures: failures)
    }
}

// MARK: - Plugins and their configuration

/// A kind of filter that can be named in the config (`filters[].type`). Each plugin target
/// provides one; the executable lists them in its registry. The plugin decodes its own
/// `settings:` (strictly, so errors name the key and line) and makes the filter.
public protocol FilterPlugin {
    static var type: String { get }
    /// Reads `settings:`; `decoder` is positioned at that key (which may be absent: then
    /// the plugin's defaults apply).
    static func settings(from decoder: (any Decoder)?) throws -> any Sendable
    static func make(name: String, settings: any Sendable) throws -> any MessageFilter
}

/// One entry of `filters:`.
public struct FilterConfig: Sendable, Decodable {
    public var name: String
    public var type: String
    /// Listener names it applies to; every listener when unset.
    public var listeners: [String]?
    public var onFailure: FilterFailureAction
    /// Decoded by the plugin of `type`.
    public var settings: any Sendable

    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, type, listeners
        case onFailure = "on_failure"
        case settings
    }

    /// The plugins the executable knows, handed to the decoder by `ConfigLoader`.
    static let registryKey = CodingUserInfoKey(rawValue: "tern.filterPlugins")!

    public init(from decoder: any Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        type = try c.decode(String.self, forKey: .type)
        listeners = try c.decodeIfPresent([String].self, forKey: .listeners)
        onFailure = try c.decodeEnum(.onFailure) ?? .tempfail
        let registry = decoder.userInfo[Self.registryKey] as? FilterRegistry ?? FilterRegistry([])
        guard let plugin = registry.entry(type) else {
            throw DecodingError.dataCorruptedError(
                forKey: .type, in: c, debugDescription: "unknown filter type '\(type)' (known: \(registry.types.joined(separator: ", ")))")
        }
        let settingsDecoder: (any Decoder)? = c.contains(.settings) ? try c.superDecoder(forKey: .settings) : nil
        settings = try plugin.settings(settingsDecoder)
    }
}

/// The filter plugins an executable provides.
public struct FilterRegistry: Sendable {
    public struct Entry: Sendable {
        var type: String
        var settings: @Sendable ((any Decoder)?) throws -> any Sendable
        var make: @Sendable (String, any Sendable) throws -> any MessageFilter
    }

    let entries: [Entry]

    public init(_ entries: [Entry]) { self.entries = entries }

    public static func plugin<P: FilterPlugin>(_ plugin: P.Type) -> Entry {
        Entry(type: P.type, settings: { try P.settings(from: $0) }, make: { try P.make(name: $0, settings: $1) })
    }

    var types: [String] { entries.map(\.type) }
    func entry(_ type: String) -> Entry? { entries.first { $0.type == type } }

    /// The chain the config asks for, in its order.
    public func chain(_ configs: [FilterConfig]) throws -> FilterChain {
        try FilterChain(
            configs.map { config in
                guard let plugin = entry(config.type) else { preconditionFailure("the config was decoded with another registry") }
                return FilterChain.Entry(
                    filter: try plugin.make(config.name, config.settings), onFailure: config.onFailure,
                    listeners: config.listeners.map(Set.init))
            })
    }
}
