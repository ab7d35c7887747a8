#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Delivery
import NIOCore
import NIOPosix
import NIOSSL
import SMTPProtocol
import TernCore

/// How to reach and talk to one next hop.
public struct SMTPClientConfiguration: Sendable {
    public var heloName: String
    public var tlsPolicy: TLSPolicy
    public var credentials: ClientCredentials?
    /// The name the certificate must carry (`verify`) and the SNI sent: the MX or smarthost name.
    public var serverName: String
    /// PEM CA bundle for `verify`; the system's trust store when nil.
    public var caFile: String?
    public var connectTimeout: Duration
    public var commandTimeout: Duration
    /// For the content and the reply to the final dot.
    public var dataTimeout: Duration
    /// The local address to connect from (a lane's egress IP); the system's choice when nil.
    public var sourceAddress: String?
    /// This relay's own hostname: a server that greets with it is this relay (a mail loop).
    public var ownHostname: String?

    public init(
        heloName: String, tlsPolicy: TLSPolicy, credentials: ClientCredentials? = nil, serverName: String,
        caFile: String? = nil, connectTimeout: Duration = .seconds(30), commandTimeout: Duration = .seconds(300),
        dataTimeout: Duration = .seconds(600), sourceAddress: String? = nil,
        ownHostname: String? = nil
    ) {
        self.sourceAddress = sourceAddress
        self.ownHostname = ownHostname
        self.heloName = heloName
        self.tlsPolicy = tlsPolicy
        self.credentials = credentials
        self.serverName = serverName
        self.caFile = caFile
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout
    }
}

/// Where a message's content comes from, in pieces (the spool reads it from disk).
public protocol MessageContent: Sendable {
    /// Calls `body` with each piece in order. A small message is one piece, read with one
    /// trip to the disk's thread, not a stream with a task of its own.
    func forEachChunk(_ body: ([UInt8]) async throws -> Void) async throws
}

/// Content already in memory.
public struct InMemoryContent: MessageContent {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public func forEachChunk(_ body: ([UInt8]) async throws -> Void) async throws {
        var offset = 0
        while offset < bytes.count {
            let end = min(bytes.count, offset + 65536)
            try await body(Array(bytes[offset..<end]))
            offset = end
        }
    }
}

/// Why a connection could not be made ready for mail.
public struct ConnectionFailure: Error, Sendable, Equatable {
    public var stage: DeliveryStage
    public var outcome: AttemptOutcome
}

/// One outbound SMTP connection, driven by `SMTPClientStateMachine`: the machine decides,
/// this type only moves bytes. Connections are reused: `send` can be called again while
/// `isReady`.
public final class SMTPClientConnection: @unchecked Sendable {
    private let channel: any Channel
    /// The end of the channel's pipeline: reply lines in, commands and content out.
    private let replies: ChannelInbox<ReplyLine>
    private var machine: SMTPClientStateMachine
    private let configuration: SMTPClientConfiguration
    private var parser = SMTPReplyParser()
    /// Lines of an older generation arrived before the STARTTLS handshake: never replies.
    private var generation = 0
    private var stage = DeliveryStage.connect
    /// Who answered: `host[ip]:port`, for logs and Remote-MTA.
    public let peer: String

    private init(inbox: ChannelInbox<ReplyLine>, configuration: SMTPClientConfiguration, peer: String) {
        self.channel = inbox.channel
        self.replies = inbox
        self.configuration = configuration
        self.machine = SMTPClientStateMachine(
            heloName: configuration.heloName, tlsPolicy: configuration.tlsPolicy, credentials: configuration.credentials,
            ownHostname: configuration.ownHostname)
        self.peer = peer
    }

    public var isReady: Bool { machine.isReady && channel.isActive }
    public var tlsActive: Bool { machine.tlsActive }
    public var extensions: ServerExtensions { machine.extensions }
    /// The server's replies behind the verdicts `send` returned last, by recipient.
    public var lastReplies: [SMTPReply?] { machine.lastReplies }

    /// Connects and runs greeting, EHLO, STARTTLS and AUTH. Under `may`, a failed TLS
    /// handshake is followed by a plaintext connection, as Postfix does for MX delivery.
    public static func connect(
        host: String, port: Int, configuration: SMTPClientConfiguration, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws(ConnectionFailure) -> SMTPClientConnection {
        do {
            return try await connectOnce(host: host, port: port, configuration: configuration, group: group)
        } catch let failure where configuration.tlsPolicy == .may && failure.stage == .startTLS {
            var plaintext = configuration
            plaintext.tlsPolicy = .none
            return try await connectOnce(host: host, port: port, configuration: plaintext, group: group)
        }
    }

    private static func connectOnce(
        host: String, port: Int, configuration: SMTPClientConfiguration, group: any EventLoopGroup
    ) async throws(ConnectionFailure) -> SMTPClientConnection {
        let inbox: ChannelInbox<ReplyLine>
        do {
            var bootstrap = ClientBootstrap(group: group)
            if let source = configuration.sourceAddress {
                bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: source, port: 0))
            }
            inbox = try await bootstrap
                .connectTimeout(TimeAmount(configuration.connectTimeout))
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .connect(host: host, port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let sync = channel.pipeline.syncOperations
                        try sync.addHandler(ReplyFramer(timeout: TimeAmount(configuration.commandTimeout)))
                        let inbox = ChannelInbox<ReplyLine>(channel: channel)
                        try sync.addHandler(inbox)
                        return inbox
                    }
                }
        } catch {
            throw ConnectionFailure(stage: .connect, outcome: Self.connectOutcome(error, target: "\(host):\(port)"))
        }
        let peer = "\(configuration.serverName)[\(host)]:\(port)"
        let connection = SMTPClientConnection(inbox: inbox, configuration: configuration, peer: peer)
        connection.stage = .greeting
        var action = SMTPClientStateMachine.Action.wait
        do {
            action = connection.machine.reply(try await connection.readReply())
            while true {
                switch action {
                case .wait where connection.machine.isReady:
                    return connection
                case .wait:
                    action = connection.machine.reply(try await connection.readReply())
                case .send(let commands):
                    // The first EHLO after STARTTLS is where a failed handshake shows: it
                    // still belongs to the STARTTLS stage (and so to `may`'s fallback).
                    if connection.stage != .startTLS || !connection.machine.tlsActive {
                        connection.stage = Self.stage(of: commands[0])
                    }
                    try await connection.write(commands.map(\.encoded).joined())
                    action = connection.machine.reply(try await connection.readReply())
                    if connection.stage == .startTLS, connection.machine.tlsActive { connection.stage = .hello }
                case .sendSASL(let line):
                    try await connection.write(line + "\r\n")
                    action = connection.machine.reply(try await connection.readReply())
                case .startTLS:
                    connection.stage = .startTLS
                    try await connection.startTLS()
                    action = connection.machine.tlsEstablished()
                case .close(let quit, _):
                    let outcome = connection.machine.closingOutcome ?? connection.lastFailure ?? .protocolError("connection closed")
                    await connection.close(quit: quit)
                    throw ConnectionFailure(stage: connection.machine.closingStage ?? connection.stage, outcome: outcome)
                case .messageDone, .sendContent, .sendEmptyContent:
                    preconditionFailure("a message step while connecting")
                }
            }
        } catch let failure as ConnectionFailure {
            // A bad reply (unparseable, too long, too many lines): the channel still has to
            // be closed.
            await connection.close(quit: false)
            throw failure
        } catch {
            var cause: any Error = error
            if connection.stage == .startTLS {
                // A failed handshake closes the channel; a write may notice first. The
                // reason itself waits in the inbound stream.
                do { _ = try await connection.replies.next() } catch let underlying { cause = underlying }
            }
            let outcome = connection.outcome(of: cause)
            await connection.close(quit: false)
            throw ConnectionFailure(stage: connection.stage, outcome: outcome)
        }
    }

    /// Sends one message; returns each recipient's verdict in order. On a connection
    /// failure the recipients get the failure's verdict and the connection is closed.
    public func send(_ message: OutboundMessage, content: some MessageContent) async -> [RecipientVerdict] {
        var action = machine.send(message)
        do {
            while true {
                switch action {
                case .send(let commands):
                    stage = machine.currentStage
                    try await write(commands.map(\.encoded).joined())
                    action = machine.reply(try await readReply())
                case .wait:
                    stage = machine.currentStage
                    action = machine.reply(try await readReply())
                case .sendEmptyContent:
                    stage = .endOfData
                    try await write(".\r\n")
                    action = machine.reply(try await readReply())
                case .sendContent:
                    stage = .endOfData
                    try await sendContent(content)
                    setReadTimeout(configuration.dataTimeout)
                    let reply = try await readReply()
                    setReadTimeout(configuration.commandTimeout)
                    action = machine.reply(reply)
                case .messageDone(let verdicts, let reset):
                    if reset {
                        try await write(SMTPCommand.rset.encoded)
                        _ = machine.reply(try await readReply())
                    }
                    return verdicts
                case .close(let quit, let verdicts):
                    await close(quit: quit)
                    return verdicts
                case .sendSASL, .startTLS:
                    preconditionFailure("a connection step inside a message")
                }
            }
        } catch {
            let outcome = outcome(of: error)
            guard case .close(_, let verdicts) = machine.connectionFailed(stage: stage, outcome) else { preconditionFailure() }
            await close(quit: false)
            return verdicts
        }
    }

    public func quit() async {
        _ = machine.quit()
        await close(quit: true)
    }

    // MARK: - I/O

    private var lastFailure: AttemptOutcome?

    private func readReply() async throws -> SMTPReply {
        while true {
            guard let line = try await replies.next() else {
                throw ConnectionFailure(stage: stage, outcome: .connection("connection closed by the server"))
            }
            guard line.generation == generation else { continue }  // plaintext sent before TLS
            do {
                if let reply = try parser.feed(bytes: line.bytes) {
                    if !reply.isPositive { lastFailure = .reply(reply) }
                    return reply
                }
            } catch {
                let text = String(decoding: line.bytes, as: UTF8.self)
                throw ConnectionFailure(stage: stage, outcome: .protocolError("bad reply: \(error.detail): \(text.prefix(100))"))
            }
        }
    }

    private func write(_ text: String) async throws {
        try await replies.write(ByteBuffer(string: text))
    }

    private func sendContent(_ content: some MessageContent) async throws {
        var stuffer = DotStuffer()
        var last: [UInt8]?
        try await content.forEachChunk { chunk in
            if let previous = last { try await replies.write(ByteBuffer(bytes: previous)) }
            var out: [UInt8] = []
            out.reserveCapacity(chunk.count + chunk.count / 64 + 5)
            chunk.withUnsafeBytes { stuffer.stuff($0, into: &out) }
            last = out
        }
        // The final dot goes out in the same write as the last piece.
        try await replies.write(ByteBuffer(bytes: (last ?? []) + stuffer.terminator))
    }

    private func startTLS() async throws {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        if configuration.tlsPolicy == .verify {
            tls.certificateVerification = .fullVerification
            if let caFile = configuration.caFile { tls.trustRoots = .file(caFile) }
        } else {
            // encrypt and may: encryption against passive eavesdropping, no authentication,
            // as in Postfix; `verify` is the policy that checks.
            tls.certificateVerification = .none
        }
        let context = try NIOSSLContext(configuration: tls)
        let hostname = configuration.serverName.isIPAddress ? nil : configuration.serverName
        let channel = self.channel
        try await channel.eventLoop.submit {
            let handler = try NIOSSLClientHandler(context: context, serverHostname: hostname)
            // Whatever the server sent after its 220 is plaintext the handshake never covered.
            try channel.pipeline.syncOperations.handler(type: ReplyFramer.self).discardPlaintext()
            try channel.pipeline.syncOperations.addHandler(handler, position: .first)
        }.get()
        generation += 1
        parser = SMTPReplyParser()
    }

    /// Not awaited: the event reaches the framer on the event loop before any write or read
    /// that follows it, as the channel runs its operations in order.
    private func setReadTimeout(_ timeout: Duration) {
        channel.triggerUserOutboundEvent(ReplyFramer.SetTimeout(timeout: TimeAmount(timeout)), promise: nil)
    }

    private var closed = false

    /// Closes once, whichever path gets here first.
    private func close(quit: Bool) async {
        guard !closed else { return }
        closed = true
        if quit, channel.isActive {
            // A server that does not answer QUIT promptly is not waited for.
            setReadTimeout(.seconds(min(10, configuration.commandTimeout.components.seconds)))
            try? await write(SMTPCommand.quit.encoded)
            _ = try? await readReply()
        }
        try? await channel.close().get()
    }

    /// A failed connect in the words an operator expects: `Connection refused`, not NIO's
    /// error structure.
    static func connectOutcome(_ error: any Error, target: String) -> AttemptOutcome {
        var cause = error
        if let e = error as? NIOConnectionError, let first = e.connectionErrors.first?.error { cause = first }
        if case ChannelError.connectTimeout = cause { return .timeout("connect to \(target)") }
        if let io = cause as? IOError { return .connection("\(target): \(String(cString: strerror(io.errnoCode)))") }
        return .connection("\(target): \(cause)")
    }

    /// What an error from the channel means for delivery.
    private func outcome(of error: any Error) -> AttemptOutcome {
        if let failure = error as? ConnectionFailure { return failure.outcome }
        if error is ReplyFramer.Timeout { return .timeout("no reply after \(stage.rawValue)") }
        if error is ReplyFramer.LineTooLong { return .protocolError("reply line longer than \(SMTPLimits.maxReplyLine) bytes") }
        if error is NIOSSLError || error is BoringSSLError || error is NIOSSLExtraError { return .tls(Self.operatorText(error)) }
        if stage == .startTLS { return .tls("handshake failed: \(Self.operatorText(error))") }
        return .connection("\(error)")
    }

    /// An error's text for an operator: without the source paths BoringSSL appends
    /// (`… at /…/.build/checkouts/swift-nio-ssl/…/handshake.cc:320`).
    static func operatorText(_ error: any Error) -> String {
        var text = Substring("\(error)")
        var out = ""
        while let range = text.range(of: " at /") {
            out += text[..<range.lowerBound]
            text = text[range.upperBound...].drop(while: { $0 != "]" && $0 != ")" && $0 != "," && $0 != " " })
        }
        return out + text
    }

    static func stage(of command: SMTPCommand) -> DeliveryStage {
        switch command {
        case .ehlo, .helo: return .hello
        case .startTLS: return .startTLS
        case .auth: return .auth
        case .mail: return .mail
        case .rcpt: return .rcpt
        case .data, .bdat: return .data
        default: return .mail
        }
    }
}

extension String {
    public var isIPAddress: Bool { contains(":") || allSatisfy { $0.isNumber || $0 == "." } }
}
