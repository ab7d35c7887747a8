import CMilter
import Logging
import NIOCore
import NIOPosix
import SMTPProtocol
import TernCore

/// An external milter (OpenDKIM, rspamd, a spam or virus scanner) as a pre-queue filter.
///
/// At the end of DATA the bridge opens a connection, negotiates options, and replays the
/// session to the milter: connect, HELO, MAIL, each RCPT, DATA, the headers, the end of
/// headers, the body in chunks of at most 65,535 bytes and the end of the message, each
/// with the macros milters look for. It then applies the milter's changes (headers, body,
/// sender, recipients) and ends the connection with QUIT. Every refusal therefore reaches
/// the client as the reply to DATA.
public struct MilterFilter: MessageFilter {
    public enum Endpoint: Sendable, Equatable {
        case inet(host: String, port: Int)
        case unix(String)

        /// `inet:host:port`, `inet:port@host` (sendmail's form) or `unix:/path`.
        public init?(_ text: String) {
            if text.hasPrefix("unix:") || text.hasPrefix("local:") {
                let path = String(text.drop(while: { $0 != ":" }).dropFirst())
                guard !path.isEmpty else { return nil }
                self = .unix(path)
            } else if text.hasPrefix("inet:") || text.hasPrefix("inet6:") {
                let rest = String(text.drop(while: { $0 != ":" }).dropFirst())
                if let at = rest.firstIndex(of: "@"), let port = Int(rest[..<at]) {
                    self = .inet(host: String(rest[rest.index(after: at)...]), port: port)
                } else if let colon = rest.lastIndex(of: ":"), let port = Int(rest[rest.index(after: colon)...]) {
                    var host = String(rest[..<colon])
                    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
                    self = .inet(host: host, port: port)
                } else {
                    return nil
                }
            } else {
                return nil
            }
        }
    }

    public let name: String
    public let endpoint: Endpoint
    public let connectTimeout: Duration
    /// For each reply to a command before the message content.
    public let timeout: Duration
    /// For each reply once the headers and body are under way (milters scan content).
    public let contentTimeout: Duration
    let logger = Logger(label: "tern.milter")

    public init(name: String, endpoint: Endpoint, connectTimeout: Duration, timeout: Duration, contentTimeout: Duration) {
        self.name = name
        self.endpoint = endpoint
        self.connectTimeout = connectTimeout
        self.timeout = timeout
        self.contentTimeout = contentTimeout
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// A milter answers connect, HELO, MAIL and RCPT as they come.
    public var usesCommandStages: Bool { true }

    public func open(_ session: FilterSession) async throws -> any FilterConnection {
        MilterConnection(filter: self)
    }

    /// The whole exchange at once, for a caller without a session: connect to the end of
    /// the message on one connection, then QUIT.
    public func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict {
        let connection = MilterConnection(filter: self)
        defer { Task { await connection.close() } }
        for stage in [0, 1, 2] {
            let verdict: FilterVerdict
            switch stage {
            case 0: verdict = try await connection.connect(session)
            case 1: verdict = try await connection.helo(session, name: session.client.helo ?? "")
            default: verdict = try await connection.mail(session, sender: message.sender, parameters: session.mailParameters)
            }
            if verdict != .continue { return verdict == .accept ? .continue : verdict }
        }
        var kept: [EnvelopeRecipient] = []
        var lastRefusal: FilterVerdict?
        for r in message.recipients {
            switch try await connection.rcpt(session, recipient: r.address, parameters: []) {
            case .reject(let reply): lastRefusal = .reject(reply)
            case .tempfail(let reply): lastRefusal = .tempfail(reply)
            case .accept, .discard: return .continue
            default: kept.append(r)
            }
        }
        if kept.isEmpty, let lastRefusal { return lastRefusal }
        message.recipients = kept
        return try await connection.endOfMessage(session, &message)
    }

    /// Opens the channel to the milter.
    func connectChannel() async throws -> NIOAsyncChannel<Milter.Packet, Milter.Packet> {
        do {
            let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connectTimeout(TimeAmount(connectTimeout))
            let timeout = self.timeout
            let initializer: @Sendable (any Channel) -> EventLoopFuture<NIOAsyncChannel<Milter.Packet, Milter.Packet>> = { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(MilterPacketDecoder()))
                    try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(MilterPacketEncoder()))
                    try channel.pipeline.syncOperations.addHandler(MilterDeadlineHandler(timeout: TimeAmount(timeout)))
                    return try NIOAsyncChannel<Milter.Packet, Milter.Packet>(wrappingChannelSynchronously: channel)
                }
            }
            switch endpoint {
            case .inet(let host, let port): return try await bootstrap.connect(host: host, port: port, channelInitializer: initializer)
            case .unix(let path): return try await bootstrap.connect(unixDomainSocketPath: path, channelInitializer: initializer)
            }
        } catch {
            throw Failure(description: "cannot connect to \(endpoint): \(error)")
        }
    }

    /// One message's exchange with the milter.
    struct Conversation {
        var inbound: NIOAsyncChannelInboundStream<Milter.Packet>.AsyncIterator
        let outbound: NIOAsyncChannelOutboundWriter<Milter.Packet>
        /// Switches the read timeout to the content timeout.
        let enterContent: @Sendable () async throws -> Void
        var negotiated = Milter.Negotiated(version: 6, actions: 0, flags: 0)

        mutating func read() async throws -> Milter.Packet {
            guard let packet = try await inbound.next() else { throw Failure(description: "the milter closed the connection") }
            return packet
        }

        /// Reads replies until one that is not `progress`.
        mutating func reply() async throws -> Milter.Reply {
            while true {
                let r = try Milter.reply(try await read())
                if r != .progress { return r }
            }
        }

        func send(_ p: Milter.Packet) async throws { try await outbound.write(p) }

        func macros(_ stage: UInt8, _ pairs: [(String, String?)]) async throws {
            // The milter's own list for this stage, when it sent one (names with or without braces).
            let wanted = negotiated.macroLists[Self.macroStage(stage)]
            let present = pairs.compactMap { k, v -> [String]? in
                guard let v else { return nil }
                if let wanted, !wanted.contains(k), !wanted.contains(k.trimmingCharacters(in: "{").trimmingCharacters(in: "}")) { return nil }
                return [k, v]
            }.flatMap { $0 }
            guard !present.isEmpty else { return }
            var data: [UInt8] = [stage]
            data += Milter.Packet.strings(0, present).data
            try await send(Milter.Packet(command: TERN_SMFIC_MACRO, data: data))
        }

        /// The SMFIM_* stage a command's macros belong to.
        static func macroStage(_ command: UInt8) -> Int {
            switch command {
            case TERN_SMFIC_CONNECT: return Int(SMFIM_CONNECT)
            case TERN_SMFIC_HELO: return Int(SMFIM_HELO)
            case TERN_SMFIC_MAIL: return Int(SMFIM_ENVFROM)
            case TERN_SMFIC_RCPT: return Int(SMFIM_ENVRCPT)
            case TERN_SMFIC_DATA: return Int(SMFIM_DATA)
            case TERN_SMFIC_EOH: return Int(SMFIM_EOH)
            default: return Int(SMFIM_EOM)
            }
        }

        /// Sends a step, and reads its reply unless the milter said it sends none.
        mutating func step(_ p: Milter.Packet, noReply: Int) async throws -> Milter.Reply {
            try await send(p)
            if negotiated.has(noReply) { return .continue }
            return try await reply()
        }

        mutating func negotiate() async throws {
            try await send(
                Milter.Packet(command: TERN_SMFIC_OPTNEG, data: Milter.u32(Milter.version) + Milter.u32(Milter.actions) + Milter.u32(Milter.protocolFlags)))
            negotiated = try Milter.negotiated(try await read())
        }

        mutating func connectStage(_ session: FilterSession) async throws -> FilterVerdict {
            let client = session.client
            let clientName = session.clientName ?? "[\(client.address)]"
            try await macros(
                TERN_SMFIC_CONNECT,
                [
                    ("j", session.hostname), ("{daemon_name}", session.listener), ("{daemon_addr}", session.listenerAddress), ("v", "Tern"),
                    ("_", "\(clientName) [\(client.address)]"), ("{client_addr}", client.address), ("{client_name}", clientName),
                    ("{client_port}", String(client.port)),
                ])
            guard !negotiated.has(Int(SMFIP_NOCONNECT)) else { return .continue }
            let family = client.address.contains(":") ? TERN_SMFIA_INET6 : TERN_SMFIA_INET
            var data = Milter.Packet.strings(0, [clientName]).data
            data.append(family)
            data += [UInt8(client.port >> 8 & 0xFF), UInt8(client.port & 0xFF)]
            data += Milter.Packet.strings(0, [client.address]).data
            return try verdict(await step(Milter.Packet(command: TERN_SMFIC_CONNECT, data: data), noReply: Int(SMFIP_NR_CONN))) ?? .continue
        }

        mutating func heloStage(_ session: FilterSession, name: String) async throws -> FilterVerdict {
            try await macros(TERN_SMFIC_HELO, [("{tls_version}", session.client.tlsVersion)])
            guard !negotiated.has(Int(SMFIP_NOHELO)) else { return .continue }
            let p = Milter.Packet.strings(TERN_SMFIC_HELO, [name])
            return try verdict(await step(p, noReply: Int(SMFIP_NR_HELO))) ?? .continue
        }

        mutating func mailStage(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict {
            try await macros(
                TERN_SMFIC_MAIL,
                [
                    ("{auth_type}", session.authMechanism ?? (session.authUser == nil ? nil : "PLAIN")),
                    ("{auth_authen}", session.authUser), ("{mail_addr}", sender),
                ])
            guard !negotiated.has(Int(SMFIP_NOMAIL)) else { return .continue }
            let p = Milter.Packet.strings(TERN_SMFIC_MAIL, ["<\(sender)>"] + parameters)
            return try verdict(await step(p, noReply: Int(SMFIP_NR_MAIL))) ?? .continue
        }

        mutating func rcptStage(_ recipient: String, parameters: [String]) async throws -> FilterVerdict {
            try await macros(TERN_SMFIC_RCPT, [("{rcpt_addr}", recipient)])
            guard !negotiated.has(Int(SMFIP_NORCPT)) else { return .continue }
            let reply = try await step(Milter.Packet.strings(TERN_SMFIC_RCPT, ["<\(recipient)>"] + parameters), noReply: Int(SMFIP_NR_RCPT))
            return try verdict(reply) ?? .continue
        }

        /// DATA, the headers, the body and the end of the message; then the milter's changes.
        mutating func content(_ message: inout FilterMessage, milter: String) async throws -> FilterVerdict {
            if negotiated.version >= 4, !negotiated.has(Int(SMFIP_NODATA)) {
                if let v = try verdict(await step(Milter.Packet(command: TERN_SMFIC_DATA, data: []), noReply: Int(SMFIP_NR_DATA))) {
                    return v
                }
            }
            try await enterContent()
            if !negotiated.has(Int(SMFIP_NOHDRS)) {
                for field in message.headers.fields where !field.name.isEmpty {
                    var value = Array(field.raw.dropFirst(field.name.utf8.count + 1))
                    if value.suffix(2) == [0x0D, 0x0A] { value.removeLast(2) }
                    value.removeAll { $0 == 0x0D }
                    if !negotiated.has(Int(SMFIP_HDR_LEADSPC)), value.first == 0x20 { value.removeFirst() }
                    var data = Array(field.name.utf8) + [0]
                    data += value + [0]
                    let reply = try await step(Milter.Packet(command: TERN_SMFIC_HEADER, data: data), noReply: Int(SMFIP_NR_HDR))
                    if let v = try verdict(reply) { return v }
                }
            }
            if !negotiated.has(Int(SMFIP_NOEOH)) {
                if let v = try verdict(await step(Milter.Packet(command: TERN_SMFIC_EOH, data: []), noReply: Int(SMFIP_NR_EOH))) { return v }
            }
            if !negotiated.has(Int(SMFIP_NOBODY)) {
                var offset = 0
                bodyLoop: while offset < message.body.count {
                    let end = min(message.body.count, offset + Milter.chunkSize)
                    let reply = try await step(
                        Milter.Packet(command: TERN_SMFIC_BODY, data: Array(message.body[offset..<end])), noReply: Int(SMFIP_NR_BODY))
                    if reply == .skip { break bodyLoop }
                    if let v = try verdict(reply) { return v }
                    offset = end
                }
            }
            try await macros(TERN_SMFIC_BODYEOB, [("i", message.queueID)])
            try await send(Milter.Packet(command: TERN_SMFIC_BODYEOB, data: []))
            var modifications: [Milter.Modification] = []
            var quarantine: String?
            while true {
                switch try await reply() {
                case .modification(let m): modifications.append(m)
                case .quarantine(let reason): quarantine = reason
                case let final:
                    // At the end of the message, accept and continue both mean: keep it,
                    // with the changes.
                    if final != .accept, final != .continue, let v = try verdict(final) { return v }
                    Milter.apply(modifications, to: &message)
                    if let quarantine { return .quarantine("milter \(milter): \(quarantine)") }
                    return .continue
                }
            }
        }

        /// nil: go on with the next step. A milter's accept ends its part (`.continue` for the
        /// chain), not the chain.
        func verdict(_ reply: Milter.Reply) throws -> FilterVerdict? {
            switch reply {
            case .continue, .progress, .skip, .modification: return nil
            case .accept: return .continue
            case .reject: return .reject(SMTPReply(550, EnhancedStatusCode(5, 7, 1), "Command rejected"))
            case .tempfail: return .tempfail(SMTPReply(451, EnhancedStatusCode(4, 7, 1), "Service unavailable - try again later"))
            case .discard: return .discard
            case .replyCode(let r): return r.code >= 500 ? .reject(r) : .tempfail(r)
            case .quarantine(let reason): return .quarantine(reason)
            case .connectionFailure: throw Failure(description: "the milter asked to fail the connection")
            }
        }
    }
}

/// The deadline for the milter's next reply: it starts when Tern sends a packet or a reply
/// packet arrives, and bytes that do not complete a packet do not move it, so a milter that
/// dribbles cannot hold a session past `timeout`. Sits after the packet codec, so it sees
/// whole packets both ways. `SetTimeout` changes the length (the content timeout, for scans).
final class MilterDeadlineHandler: ChannelDuplexHandler {
    typealias InboundIn = Milter.Packet
    typealias InboundOut = Milter.Packet
    typealias OutboundIn = Milter.Packet
    typealias OutboundOut = Milter.Packet

    struct Timeout: Error, CustomStringConvertible {
        var description: String { "no reply from the milter in time" }
    }
    struct SetTimeout: Sendable { var timeout: TimeAmount }

    private var timeout: TimeAmount
    private var timer: Scheduled<Void>?

    init(timeout: TimeAmount) { self.timeout = timeout }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        arm(context)
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        arm(context)
        context.write(data, promise: promise)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard let set = event as? SetTimeout else {
            context.triggerUserOutboundEvent(event, promise: promise)
            return
        }
        timeout = set.timeout
        arm(context)
        promise?.succeed()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
    }

    private func arm(_ context: ChannelHandlerContext) {
        timer?.cancel()
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: timeout) {
            bound.value.fireErrorCaught(Timeout())
            bound.value.close(promise: nil)
        }
    }
}

struct MilterPacketDecoder: ByteToMessageDecoder {
    typealias InboundOut = Milter.Packet
    /// Body replacements come in pieces of at most 64 KB; anything much larger is not a milter.
    static let maxPacket = 1 << 20

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard length >= 1, length <= Self.maxPacket else { throw Milter.ProtocolError(description: "milter packet of \(length) bytes") }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        guard let command: UInt8 = buffer.readInteger(), let data = buffer.readBytes(length: Int(length) - 1) else {
            throw Milter.ProtocolError(description: "short milter packet")
        }
        context.fireChannelRead(wrapInboundOut(Milter.Packet(command: command, data: data)))
        return .continue
    }
}

struct MilterPacketEncoder: MessageToByteEncoder {
    typealias OutboundIn = Milter.Packet
    func encode(data: Milter.Packet, out: inout ByteBuffer) throws {
        out.writeBytes(data.encoded)
    }
}

/// `type: milter` in `filters:`.
public enum MilterPlugin: FilterPlugin {
    public static let type = "milter"

    struct Settings: Sendable {
        var endpoint: MilterFilter.Endpoint
        var connectTimeout: Duration
        var timeout: Duration
        var contentTimeout: Duration
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case socket
        case connectTimeout = "connect_timeout"
        case timeout
        case contentTimeout = "content_timeout"
    }

    public static func settings(from decoder: (any Decoder)?) throws -> any Sendable {
        guard let decoder else {
            throw DecodingError.keyNotFound(CodingKeys.socket, .init(codingPath: [], debugDescription: "a milter needs settings.socket"))
        }
        try decoder.rejectUnknownKeys(CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let text = try c.decode(String.self, forKey: .socket)
        guard let endpoint = MilterFilter.Endpoint(text) else {
            throw DecodingError.dataCorruptedError(
                forKey: .socket, in: c, debugDescription: "'\(text)' is not inet:host:port, inet:port@host or unix:/path")
        }
        return Settings(
            endpoint: endpoint,
            connectTimeout: try c.decodeIfPresent(ConfigDuration.self, forKey: .connectTimeout)?.duration ?? .seconds(30),
            timeout: try c.decodeIfPresent(ConfigDuration.self, forKey: .timeout)?.duration ?? .seconds(30),
            contentTimeout: try c.decodeIfPresent(ConfigDuration.self, forKey: .contentTimeout)?.duration ?? .seconds(300))
    }

    public static func make(name: String, settings: any Sendable) throws -> any MessageFilter {
        let s = settings as! Settings
        return MilterFilter(
            name: name, endpoint: s.endpoint, connectTimeout: s.connectTimeout, timeout: s.timeout, contentTimeout: s.contentTimeout)
    }
}

/// One SMTP session's connection to a milter, opened at the connect stage and kept until the
/// session ends: each stage is sent as its command arrives, so the milter's answer is the
/// reply to that command, and each message of the session goes on the same connection.
/// Used by one session, one call after another.
final class MilterConnection: FilterConnection, @unchecked Sendable {
    private let filter: MilterFilter
    private var channel: NIOAsyncChannel<Milter.Packet, Milter.Packet>?
    private var conversation: MilterFilter.Conversation?
    /// MAIL went out and the message has not ended: an abort must tell the milter.
    private var messageOpen = false
    private var closed = false

    init(filter: MilterFilter) { self.filter = filter }

    /// The conversation, negotiated, on first use.
    private func ready() async throws -> MilterFilter.Conversation {
        if let conversation { return conversation }
        guard !closed else { throw MilterFilter.Failure(description: "the milter connection is closed") }
        let channel = try await filter.connectChannel()
        self.channel = channel
        let raw = channel.channel
        let contentTimeout = filter.contentTimeout
        let (inbound, outbound) = (MilterUnscopedStreams.self as any MilterUnscopedStreamsProvider.Type).make(channel)
        var conversation = MilterFilter.Conversation(inbound: inbound.makeAsyncIterator(), outbound: outbound) {
            // From the headers on, replies may take as long as a scan of the content.
            try await raw.triggerUserOutboundEvent(MilterDeadlineHandler.SetTimeout(timeout: TimeAmount(contentTimeout))).get()
        }
        do {
            try await conversation.negotiate()
        } catch {
            await shut()
            throw error
        }
        self.conversation = conversation
        return conversation
    }

    /// Runs one stage; a failure closes the connection (the milter is out for the session).
    private func run(_ body: (inout MilterFilter.Conversation) async throws -> FilterVerdict) async throws -> FilterVerdict {
        var conversation = try await ready()
        do {
            let verdict = try await body(&conversation)
            self.conversation = conversation
            return verdict
        } catch {
            await shut()
            throw error
        }
    }

    func connect(_ session: FilterSession) async throws -> FilterVerdict {
        try await run { try await $0.connectStage(session) }
    }

    func helo(_ session: FilterSession, name: String) async throws -> FilterVerdict {
        try await run { try await $0.heloStage(session, name: name) }
    }

    func mail(_ session: FilterSession, sender: String, parameters: [String]) async throws -> FilterVerdict {
        messageOpen = true
        return try await run { try await $0.mailStage(session, sender: sender, parameters: parameters) }
    }

    func rcpt(_ session: FilterSession, recipient: String, parameters: [String]) async throws -> FilterVerdict {
        let verdict = try await run { try await $0.rcptStage(recipient, parameters: parameters) }
        if case .reject = verdict { filter.logger.info("milter \(filter.name) refused recipient <\(recipient)>") }
        if case .tempfail = verdict { filter.logger.info("milter \(filter.name) refused recipient <\(recipient)> for now") }
        return verdict
    }

    func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict {
        var copy = message
        let name = filter.name
        let verdict = try await run { try await $0.content(&copy, milter: name) }
        messageOpen = false
        message = copy
        return verdict
    }

    func abort() async {
        guard messageOpen, let conversation else { return }
        messageOpen = false
        do {
            try await conversation.send(Milter.Packet(command: TERN_SMFIC_ABORT, data: []))
        } catch {
            await shut()
        }
    }

    func close() async {
        if let conversation { try? await conversation.send(Milter.Packet(command: TERN_SMFIC_QUIT, data: [])) }
        await shut()
    }

    private func shut() async {
        closed = true
        conversation?.outbound.finish()
        conversation = nil
        if let channel { try? await channel.channel.close().get() }
        channel = nil
    }
}

/// The unscoped stream accessors are deprecated in favour of `executeThenClose`; a milter
/// connection outlives one call (it follows the whole SMTP session), which the scoped form
/// cannot express. Reaching them through a protocol witness keeps that one use from warning.
private protocol MilterUnscopedStreamsProvider {
    static func make(
        _ channel: NIOAsyncChannel<Milter.Packet, Milter.Packet>
    ) -> (NIOAsyncChannelInboundStream<Milter.Packet>, NIOAsyncChannelOutboundWriter<Milter.Packet>)
}

private enum MilterUnscopedStreams: MilterUnscopedStreamsProvider {
    @available(*, deprecated)
    static func make(
        _ channel: NIOAsyncChannel<Milter.Packet, Milter.Packet>
    ) -> (NIOAsyncChannelInboundStream<Milter.Packet>, NIOAsyncChannelOutboundWriter<Milter.Packet>) {
        (channel.inbound, channel.outbound)
    }
}
