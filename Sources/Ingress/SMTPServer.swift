#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import SMTPProtocol
import ServiceLifecycle
import Spool
import TernCore

/// All listeners of one Tern instance: binds them, runs one session per connection, and on
/// graceful shutdown stops accepting, lets open transactions finish, then answers 421.
public final class SMTPServer: Service, Sendable {
    let config: TernConfig
    let environment: SessionEnvironment
    let group: any EventLoopGroup
    let limiter: ConnectionLimiter
    let connections = Counter(label: "tern_connections_total")
    private let openSessions = NIOLockedValueBox(OpenSessions())
    private let boundAddresses = NIOLockedValueBox([String: SocketAddress]())

    private struct OpenSessions {
        var channels: [ObjectIdentifier: any Channel] = [:]
        var shuttingDown = false
    }

    public init(
        config: TernConfig, spool: Spool, users: UserDatabase?, tlsContext: NIOSSLContext?,
        group: any EventLoopGroup, threadPool: NIOThreadPool, logger: Logger,
        filters: FilterChain = FilterChain([]),
        onQueued: @escaping @Sendable (QueueID, _ slot: UInt32, Envelope, Int, _ held: Bool) -> Void = { _, _, _, _, _ in }
    ) {
        self.config = config
        self.group = group
        self.limiter = ConnectionLimiter(
            maxTotal: config.limits.maxConnections, maxPerClient: config.limits.maxConnectionsPerClient)
        self.environment = SessionEnvironment(
            spool: spool, users: users, tlsContext: tlsContext, threadPool: threadPool,
            authThrottle: AuthThrottle(limit: config.limits.maxAuthFailures, window: config.limits.authFailureWindow.duration),
            logger: logger, onQueued: onQueued, filters: filters,
            memoryBudget: MessageMemoryBudget(limit: config.limits.filterMemory.bytes))
    }

    /// The address each listener is bound to, by name, once `run` has bound them.
    public var bound: [String: SocketAddress] { boundAddresses.withLockedValue { $0 } }

    private typealias BoundListener = (ListenerConfig, NIOAsyncChannel<ChannelInbox<SMTPFrame>, Never>)
    private let preBound = NIOLockedValueBox<[BoundListener]?>(nil)
    /// The listeners accepting now, by name, and how `run` learns of ones a reload opens.
    private let active = NIOLockedValueBox(ActiveListeners())

    private struct ActiveListeners {
        var byName: [String: BoundListener] = [:]
        var added: AsyncStream<BoundListener>.Continuation?
        var stopped = false
    }

    /// Binds every listener now; `run` then serves them. `sockets` are listening sockets
    /// bound earlier by name (by root, before a privilege drop), adopted as they are. An
    /// address that cannot be bound is named in the error.
    public func bindListeners(sockets: [String: CInt] = [:], localSocket: CInt? = nil) async throws {
        var bound: [BoundListener] = []
        if let localSocket {
            let local = ListenerConfig(
                name: ListenerConfig.localName, kind: .smtp, address: ListenAddress(host: "127.0.0.1", port: 0))
            bound.append((local, try await bind(local, socket: localSocket, unix: true)))
        }
        for listener in config.listeners {
            let server: NIOAsyncChannel<ChannelInbox<SMTPFrame>, Never>
            do {
                server = try await bind(listener, socket: sockets[listener.name])
            } catch {
                for (_, s) in bound { try? await s.channel.close() }
                throw ListenError(address: "\(listener.address)", name: listener.name, cause: error)
            }
            let address = server.channel.localAddress
            if let address { boundAddresses.withLockedValue { $0[listener.name] = address } }
            environment.logger.info(
                "listening on \(address.map(Self.describe) ?? "\(listener.address)") (\(listener.kind.rawValue), name=\(listener.name))")
            bound.append((listener, server))
        }
        preBound.withLockedValue { $0 = bound }
    }

    public struct ListenError: Error, CustomStringConvertible {
        public var address: String
        public var name: String
        public var cause: any Error
        public var description: String {
            var reason = "\(cause)"
            if let io = cause as? IOError { reason = String(cString: strerror(io.errnoCode)).lowercased() }
            return "cannot listen on \(address) (listeners: \(name)): \(reason)"
        }
    }

    public func run() async throws {
        if preBound.withLockedValue({ $0 == nil }) { try await bindListeners() }
        let servers = preBound.withLockedValue { $0 ?? [] }
        let (added, continuation) = AsyncStream<BoundListener>.makeStream()
        active.withLockedValue { active in
            for bound in servers { active.byName[bound.0.name] = bound }
            active.added = continuation
        }
        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                // Each accept loop runs on its listener's event loop, where the connections
                // arrive: taking one does not wake a thread of Swift's pool.
                for (listener, server) in servers {
                    group.addTask(executorPreference: EventLoopExecutor(server.channel.eventLoop)) {
                        try await self.accept(on: server, listener: listener)
                    }
                }
                // Listeners a reload opens join here; the stream ends at shutdown.
                for await (listener, server) in added {
                    group.addTask(executorPreference: EventLoopExecutor(server.channel.eventLoop)) {
                        try await self.accept(on: server, listener: listener)
                    }
                }
            }
        } onGracefulShutdown: {
            self.environment.logger.info("shutting down: no new connections; open transactions may finish")
            let current = self.active.withLockedValue { active in
                active.stopped = true
                active.added?.finish()
                return Array(active.byName.values)
            }
            for (_, server) in current { server.channel.close(promise: nil) }
            let channels = self.openSessions.withLockedValue { sessions in
                sessions.shuttingDown = true
                return Array(sessions.channels.values)
            }
            for channel in channels { channel.triggerUserOutboundEvent(SMTPFramingControl.shutdown, promise: nil) }
        }
        environment.logger.info("all sessions closed")
    }

    /// `tern reload`: opens the listeners that are new or changed and closes the ones that are
    /// gone or changed; a closed listener's sessions run to their end. Returns what could not
    /// be done, one sentence each (a port below 1024 after the privilege drop, a kind whose
    /// TLS or AUTH was not loaded at start); the listeners concerned keep their old state.
    public func apply(_ listeners: [ListenerConfig]) async -> [String] {
        var problems: [String] = []
        let current = active.withLockedValue { $0.stopped ? nil : $0.byName }
        guard let current else { return [] }
        func same(_ a: ListenerConfig, _ b: ListenerConfig) -> Bool { a.kind == b.kind && a.address == b.address }
        let wanted = Dictionary(listeners.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        // Gone or changed: stop accepting (sessions under way finish).
        for (name, (old, server)) in current where name != ListenerConfig.localName {
            if let new = wanted[name], same(old, new) { continue }
            active.withLockedValue { _ = $0.byName.removeValue(forKey: name) }
            boundAddresses.withLockedValue { _ = $0.removeValue(forKey: name) }
            try? await server.channel.close()
            environment.logger.info("reload: no longer listening on \(old.address) (name=\(name))")
        }
        for listener in listeners {
            if let (old, _) = current[listener.name], same(old, listener) { continue }
            if listener.kind.requiresTLSConfig, environment.tlsContext == nil {
                problems.append("listener \(listener.name): a \(listener.kind.rawValue) listener needs the TLS certificate, which was not loaded at start: restart")
                continue
            }
            if listener.kind.requiresAuth, environment.users == nil {
                problems.append("listener \(listener.name): a \(listener.kind.rawValue) listener needs access.users_file, which was not loaded at start: restart")
                continue
            }
            do {
                let server = try await bind(listener, socket: nil)
                let address = server.channel.localAddress
                if let address { boundAddresses.withLockedValue { $0[listener.name] = address } }
                let accepted = active.withLockedValue { active -> Bool in
                    guard !active.stopped, let added = active.added else { return false }
                    active.byName[listener.name] = (listener, server)
                    added.yield((listener, server))
                    return true
                }
                guard accepted else {
                    try? await server.channel.close()
                    continue
                }
                environment.logger.info(
                    "listening on \(address.map(Self.describe) ?? "\(listener.address)") (\(listener.kind.rawValue), name=\(listener.name))")
            } catch {
                let failure = ListenError(address: "\(listener.address)", name: listener.name, cause: error)
                var text = "\(failure)"
                if listener.address.port < 1024, geteuid() != 0 { text += " (a port below 1024 takes a restart once root is dropped)" }
                problems.append(text)
                environment.logger.error("reload: \(text)")
            }
        }
        return problems
    }

    private func bind(
        _ listener: ListenerConfig, socket: CInt?, unix: Bool = false
    ) async throws -> NIOAsyncChannel<ChannelInbox<SMTPFrame>, Never> {
        let implicitTLS = listener.kind == .smtps ? environment.tlsContext : nil
        let limiter = self.limiter
        let timeouts = FramingTimeouts(
            command: TimeAmount(config.limits.commandTimeout.duration), data: TimeAmount(config.limits.dataTimeout.duration),
            stressCommand: TimeAmount(config.limits.stressCommandTimeout.duration),
            stressData: TimeAmount(config.limits.stressDataTimeout.duration),
            underStress: { limiter.underPressure })
        let initializer: @Sendable (any Channel) -> EventLoopFuture<ChannelInbox<SMTPFrame>> = { channel in
            channel.eventLoop.makeCompletedFuture {
                let sync = channel.pipeline.syncOperations
                if let implicitTLS { try sync.addHandler(NIOSSLServerHandler(context: implicitTLS)) }
                let remote = channel.remoteAddress
                try sync.addHandler(
                    SMTPFramingHandler(timeouts: timeouts) { [weak self] error in self?.tlsFailed(listener, remote: remote, error) })
                // A client that reads none of its replies holds the session in a write; the
                // command timeout bounds that wait as it bounds the client's own lines.
                let inbox = ChannelInbox<SMTPFrame>(channel: channel, drainTimeout: timeouts.command)
                try sync.addHandler(inbox)
                return inbox
            }
        }
        if unix, let socket {
            return try await ServerBootstrap(group: group).bind(socket, childChannelInitializer: initializer)
        }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 512)
            // TCP_NODELAY is a TCP-level option: at the socket level its number is SO_DEBUG,
            // which needs CAP_NET_ADMIN and leaves Nagle's algorithm on.
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        if let socket { return try await bootstrap.bind(socket, childChannelInitializer: initializer) }
        return try await bootstrap.bind(host: listener.address.host, port: listener.address.port, childChannelInitializer: initializer)
    }

    /// A listening socket for `listener`, bound now with plain system calls: for the part of
    /// `tern serve` that runs as root before the async runtime starts.
    public static func listeningSocket(_ listener: ListenerConfig) throws -> CInt {
        let address = try SocketAddress.makeAddressResolvingHost(listener.address.host, port: listener.address.port)
        let fd = Glibc.socket(Int32(address.protocol.rawValue), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        var one: CInt = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<CInt>.size))
        let bound = address.withSockAddr { Glibc.bind(fd, $0, socklen_t($1)) }
        guard bound == 0, listen(fd, 512) == 0 else {
            let code = errno
            close(fd)
            throw ListenError(address: "\(listener.address)", name: listener.name, cause: IOError(errnoCode: code, reason: "bind"))
        }
        return fd
    }

    private func accept(
        on server: NIOAsyncChannel<ChannelInbox<SMTPFrame>, Never>, listener: ListenerConfig
    ) async throws {
        try await withThrowingDiscardingTaskGroup { group in
            try await server.executeThenClose { connections in
                for try await connection in connections {
                    // The session runs on its channel's event loop (EventLoopExecutor).
                    group.addTask(executorPreference: EventLoopExecutor(connection.channel.eventLoop)) {
                        await self.handle(connection, listener: listener)
                    }
                }
            }
        }
    }

    private func handle(_ connection: ChannelInbox<SMTPFrame>, listener: ListenerConfig) async {
        // Whatever ends the session, its connection closes with it.
        defer { connection.channel.close(promise: nil) }
        var logger = environment.logger
        logger[metadataKey: LogSink.serviceKey] = "smtpd"
        let local = listener.name == ListenerConfig.localName && listener.address.port == 0
        let remote = connection.channel.remoteAddress
        // Local submission has no client address; its user id is what identifies it.
        let localUID = local ? await Self.peerUID(connection.channel) : nil
        let address = local ? "127.0.0.1" : remote?.ipAddress ?? "unknown"
        let port = remote?.port ?? 0
        let client = localUID.map { "local (uid \($0))" } ?? "[\(address)]:\(port)"
        let id = ObjectIdentifier(connection.channel)
        let refused: SMTPReply?
        let shuttingDown = openSessions.withLockedValue { sessions -> Bool in
            if !sessions.shuttingDown { sessions.channels[id] = connection.channel }
            return sessions.shuttingDown
        }
        defer { openSessions.withLockedValue { _ = $0.channels.removeValue(forKey: id) } }
        if shuttingDown {
            refused = SessionStateMachine.shuttingDown(config.hostname)
        } else {
            switch limiter.admit(local ? "local" : address) {
            case .admitted: refused = nil
            case .tooManyTotal: refused = SMTPReply(421, .tooManyBadCommands, "\(config.hostname) Error: too many connections")
            case .tooManyFromClient:
                refused = SMTPReply(421, .tooManyBadCommands, "\(config.hostname) Error: too many connections from \(address)")
            }
        }
        var reply = refused
        if reply == nil, !local, environment.authThrottle.isBlocked(address) {
            reply = SMTPReply(421, .temporaryAuthFailure, "\(config.hostname) Error: too many failed authentications")
            limiter.release(address)
        }
        if let reply {
            logger.info("reject: connect from \(client) to \(listener.name): \(reply)")
            try? await connection.channel.writeAndFlush(ByteBuffer(bytes: reply.encodedBytes))
            return
        }
        defer { limiter.release(local ? "local" : address) }
        connections.increment()
        logger.info("connect from \(client) to \(listener.name)")
        let trusted = local || IPAddress(parsing: address).map { ip in config.access.mynetworks.contains { $0.contains(ip) } } ?? false
        let policy = SessionPolicy(
            kind: listener.kind, hostname: config.hostname, tlsAvailable: environment.tlsContext != nil && !local,
            authAvailable: environment.users != nil, maxMessageSize: config.limits.maxMessageSize.bytes,
            maxRecipients: config.limits.maxRecipients, maxErrors: config.limits.maxErrors, maxHops: config.limits.maxHops,
            minFreeSpace: config.limits.effectiveMinFreeSpace, freeSpace: { [spool = environment.spool] in spool.freeBytes() },
            commandFilters: environment.filters.entries.contains {
                ($0.listeners?.contains(listener.name) ?? true) && $0.filter.usesCommandStages
            }, rejectSenders: config.access.rejectSenders,
            allowedSenders: config.access.allowedSenders, bareLineEndings: config.access.bareLineEndings)
        do {
            var session = SMTPSession(
                channel: connection.channel, inbox: connection,
                machine: SessionStateMachine(policy: policy, trusted: trusted, tlsActive: listener.kind == .smtps),
                environment: environment, listener: listener, clientAddress: address, clientPort: port, logger: logger,
                localUID: localUID, completeHeaders: local || (trusted && config.access.addMissingHeaders))
            try await session.run()
        } catch is CancellationError {
        } catch is WriteDrainTimeout {
            logger.info("timeout from \(client): it reads no replies; connection closed")
        } catch is NIOSSLError {
            // Logged and counted where the TLS handler reported it (`tlsFailed`).
        } catch is BoringSSLError {
        } catch let error as ChannelError where error == .ioOnClosedChannel || error == .alreadyClosed {
        } catch {
            logger.info("lost connection from \(client): \(error)")
        }
        logger.info("disconnect from \(client)")
    }

    private func tlsFailed(_ listener: ListenerConfig, remote: SocketAddress?, _ error: any Error) {
        Counter(label: "tern_inbound_tls_failures_total", dimensions: [("listener", listener.name)]).increment()
        let client = remote.map { "[\($0.ipAddress ?? "unknown")]:\($0.port ?? 0)" } ?? "unknown"
        var logger = environment.logger
        logger[metadataKey: LogSink.serviceKey] = "smtpd"
        logger.info("TLS error from \(client): \(error)")
    }

    /// The user id of the process at the other end of a Unix socket (SO_PEERCRED).
    static func peerUID(_ channel: any Channel) async -> uid_t? {
        guard let provider = channel as? any SocketOptionProvider else { return nil }
        let credentials: PeerCredentials? = try? await provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED)
        ).get()
        return credentials?.uid
    }

    /// Linux's `struct ucred`, which Glibc's module does not export (it needs _GNU_SOURCE).
    struct PeerCredentials: Sendable {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
    }

    static func describe(_ address: SocketAddress) -> String {
        guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }
}

/// Loads the certificate chain and key named in the config into a server TLS context.
public enum TLSSetup {
    public static func serverContext(_ files: TLSFiles) throws -> NIOSSLContext {
        let chain = try NIOSSLCertificate.fromPEMFile(files.certificate).map { NIOSSLCertificateSource.certificate($0) }
        let key = try NIOSSLPrivateKey(file: files.key, format: .pem)
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        return try NIOSSLContext(configuration: configuration)
    }
}
