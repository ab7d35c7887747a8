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
///
/// The stages run as the SMTP commands arrive (Postfix's `smtpd_milters`): a refusal at
/// connect, HELO, MAIL or RCPT is the reply to that command, and the client decides what to
/// do with it; the end-of-message stage answers DATA. A filter that keeps state across one
/// session's stages (a milter's connection) returns its own `FilterConnection` from `open`.
public protocol MessageFilter: Sendable {
    var name: String { get }
    /// True when the filter looks at connect, HELO, MAIL or RCPT at all; false lets the
    /// session skip those stages for it.
    var usesCommandStages: Bool { get }
    /// One session's pass through this filter.
    func open(_ session: FilterSession) async throws -> any FilterConnection
    func connect(_ session: FilterSession) async throws -> FilterVerdict
    func helo(_ session: FilterSession, name: String) async throws -> FilterVerdict
    func mail(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict
    func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async throws -> FilterVerdict
    /// The whole message; the filter may change it in place.
    func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict
}

/// One SMTP session's pass through one filter: the stages in the order the commands come,
/// then (per message) the end of the message, `abort` when a transaction ends without one
/// (RSET, a new MAIL after a refusal), and `close` when the session ends. Used by one session
/// at a time, one call after another.
public protocol FilterConnection: Sendable {
    func connect(_ session: FilterSession) async throws -> FilterVerdict
    func helo(_ session: FilterSession, name: String) async throws -> FilterVerdict
    func mail(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict
    func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async throws -> FilterVerdict
    func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict
    func abort() async
    func close() async
}

/// A filter without per-session state: each stage calls the filter's own method.
public struct StatelessFilterConnection: FilterConnection {
    let filter: any MessageFilter
    public init(_ filter: any MessageFilter) { self.filter = filter }
    public func connect(_ session: FilterSession) async throws -> FilterVerdict { try await filter.connect(session) }
    public func helo(_ session: FilterSession, name: String) async throws -> FilterVerdict { try await filter.helo(session, name: name) }
    public func mail(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict {
        try await filter.mail(session, sender: sender, parameters: parameters)
    }
    public func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async throws -> FilterVerdict {
        try await filter.rcpt(session, recipient: recipient, parameters: parameters)
    }
    public func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict {
        try await filter.endOfMessage(session, &message)
    }
    public func abort() async {}
    public func close() async {}
}

extension MessageFilter {
    public var usesCommandStages: Bool { false }
    public func open(_ session: FilterSession) async throws -> any FilterConnection { StatelessFilterConnection(self) }
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

        public init(verdict: FilterVerdict, filter: String?, failures: [String]) {
            self.verdict = verdict
            self.filter = filter
            self.failures = failures
        }
    }
}

// MARK: - One session's pass through the chain

extension FilterChain {
    /// The filters for `listener`, ready to follow one SMTP session; nil when none applies.
    public func session(listener: String) -> FilterChainSession? {
        let mine = entries.filter { $0.listeners?.contains(listener) ?? true }
        return mine.isEmpty ? nil : FilterChainSession(mine)
    }
}

/// The chain following one SMTP session: each filter's connection is opened at its first
/// stage and kept to the end of the session, so a milter sees connect, HELO, MAIL and each
/// RCPT as they happen and answers them, and the message on the same connection.
///
/// A filter that fails (cannot be reached, does not answer in time) is handled by its
/// `on_failure`: `accept` leaves it out for the rest of the session; `tempfail` and `reject`
/// refuse the command at hand, and, when it failed at connect or HELO, each MAIL after.
/// Used by one session, one call after another.
public final class FilterChainSession: @unchecked Sendable {
    private struct Slot {
        var entry: FilterChain.Entry
        var connection: (any FilterConnection)?
        /// Said `accept` at connect or HELO, or failed with `on_failure: accept`.
        var doneForSession = false
        /// Said `accept` at MAIL or RCPT: done until the message ends.
        var doneForMessage = false
        /// Failed before MAIL: each MAIL gets this refusal.
        var standingRefusal: FilterVerdict?
    }

    private var slots: [Slot]
    /// MAIL went to the filters and neither the end of the message nor an abort followed.
    private var messageOpen = false
    /// A filter said `discard` at MAIL or RCPT: the message is answered 250 and dropped.
    private var discardMessage: String?

    /// Some filter looks at connect, HELO, MAIL or RCPT.
    public let usesCommandStages: Bool

    init(_ entries: [FilterChain.Entry]) {
        slots = entries.map { Slot(entry: $0) }
        usesCommandStages = entries.contains { $0.filter.usesCommandStages }
    }

    public typealias Outcome = FilterChain.Outcome

    public func connect(_ session: FilterSession) async -> Outcome {
        await stage(session, sessionLevel: true) { try await $0.connect(session) }
    }

    public func helo(_ session: FilterSession, name: String) async -> Outcome {
        await stage(session, sessionLevel: true) { try await $0.helo(session, name: name) }
    }

    public func mail(_ session: FilterSession, sender: String, parameters: [String]) async -> Outcome {
        for slot in slots {
            if let refusal = slot.standingRefusal {
                return Outcome(verdict: refusal, filter: slot.entry.filter.name, failures: [])
            }
        }
        messageOpen = true
        discardMessage = nil
        return await stage(session, sessionLevel: false) { try await $0.mail(session, sender: sender, parameters: parameters) }
    }

    public func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async -> Outcome {
        await stage(session, sessionLevel: false) { try await $0.rcpt(session, recipient: recipient, parameters: parameters) }
    }

    /// The message, through every filter still in; each may change it in place.
    public func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async -> Outcome {
        defer { endMessage() }
        if let filter = discardMessage { return Outcome(verdict: .discard, filter: filter, failures: []) }
        var failures: [String] = []
        for i in slots.indices where !slots[i].doneForSession && !slots[i].doneForMessage {
            let verdict: FilterVerdict
            do {
                let connection = try await connection(i, session)
                verdict = try await connection.endOfMessage(session, &message)
            } catch {
                switch failed(i, error, atCommandStage: false, failures: &failures) {
                case .none: continue
                case .some(let refusal): return Outcome(verdict: refusal, filter: slots[i].entry.filter.name, failures: failures)
                }
            }
            if verdict != .continue { return Outcome(verdict: verdict, filter: slots[i].entry.filter.name, failures: failures) }
        }
        return Outcome(verdict: .continue, filter: nil, failures: failures)
    }

    /// The transaction ended without the end of the message (RSET, a new EHLO, a refused
    /// DATA, a client gone): filters that saw MAIL forget the message.
    public func abortIfOpen() async {
        guard messageOpen else { return }
        for slot in slots { await slot.connection?.abort() }
        endMessage()
    }

    public func close() async {
        for i in slots.indices {
            await slots[i].connection?.close()
            slots[i].connection = nil
        }
    }

    private func endMessage() {
        messageOpen = false
        discardMessage = nil
        for i in slots.indices { slots[i].doneForMessage = false }
    }

    private func connection(_ i: Int, _ session: FilterSession) async throws -> any FilterConnection {
        if let c = slots[i].connection { return c }
        let c = try await slots[i].entry.filter.open(session)
        slots[i].connection = c
        return c
    }

    /// Runs one command stage through the filters that use such stages.
    private func stage(
        _ session: FilterSession, sessionLevel: Bool, _ call: (any FilterConnection) async throws -> FilterVerdict
    ) async -> Outcome {
        var failures: [String] = []
        for i in slots.indices where slots[i].entry.filter.usesCommandStages && !slots[i].doneForSession && !slots[i].doneForMessage {
            let verdict: FilterVerdict
            do {
                verdict = try await call(try await connection(i, session))
            } catch {
                switch failed(i, error, atCommandStage: sessionLevel, failures: &failures) {
                case .none: continue
                case .some(let refusal): return Outcome(verdict: refusal, filter: slots[i].entry.filter.name, failures: failures)
                }
            }
            switch verdict {
            case .continue, .quarantine:
                continue
            case .accept:
                if sessionLevel { slots[i].doneForSession = true } else { slots[i].doneForMessage = true }
            case .discard:
                discardMessage = slots[i].entry.filter.name
            case .reject, .tempfail:
                return Outcome(verdict: verdict, filter: slots[i].entry.filter.name, failures: failures)
            }
        }
        return Outcome(verdict: .continue, filter: nil, failures: failures)
    }

    /// Applies `on_failure`; nil: go on without this filter.
    private func failed(_ i: Int, _ error: any Error, atCommandStage beforeMail: Bool, failures: inout [String]) -> FilterVerdict? {
        let entry = slots[i].entry
        failures.append("\(entry.filter.name): \(error); \(entry.onFailure.rawValue)")
        let refusal: FilterVerdict
        switch entry.onFailure {
        case .accept:
            slots[i].doneForSession = true
            return nil
        case .tempfail: refusal = .tempfail(SMTPReply(451, EnhancedStatusCode(4, 7, 1), "Service unavailable, try again later"))
        case .reject: refusal = .reject(SMTPReply(550, EnhancedStatusCode(5, 7, 1), "Message refused by policy"))
        }
        // A filter that cannot follow the session is not asked again; before MAIL its
        // refusal stands for every transaction of the session.
        slots[i].doneForSession = true
        if beforeMail { slots[i].standingRefusal = refusal }
        return beforeMail ? nil : refusal
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
