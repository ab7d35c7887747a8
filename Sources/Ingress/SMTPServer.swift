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

    private typealias ServerChannel = NIOAsyncChannel<ChannelInbox<SMTPFrame>, Never>
    /// A listener and its acceptors: one per event loop, all on the same listening socket.
    private typealias BoundListener = (ListenerConfig, [ServerChannel])
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
    public func bindListeners(sockets: [String: [CInt]] = [:], localSocket: CInt? = nil) async throws {
        var bound: [BoundListener] = []
        if let localSocket {
            let local = ListenerConfig(
                name: ListenerConfig.localName, kind: .smtp, address: ListenAddress(host: "127.0.0.1", port: 0))
            bound.append((local, try await bind(local, sockets: [localSocket], unix: true)))
        }
        for listener in config.listeners {
            let servers: [ServerChannel]
            do {
                servers = try await bind(listener, sockets: sockets[listener.name])
            } catch {
                for (_, channels) in bound { for s in channels { try? await s.channel.close() } }
                if let error = error as? ListenError { throw error }
                throw ListenError(address: "\(listener.address)", name: listener.name, cause: error)
            }
            let address = servers.first?.channel.localAddress
            if let address { boundAddresses.withLockedValue { $0[listener.name] = address } }
            environment.logger.info(
                "listening on \(address.map(Self.describe) ?? "\(listener.address)") (\(listener.kind.rawValue), name=\(listener.name))")
            bound.append((listener, servers))
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
                // Each accept loop runs on its acceptor's event loop, where its connections
                // arrive and stay: taking one does not wake another thread.
                for (listener, acceptors) in servers {
                    for server in acceptors {
                        group.addTask(executorPreference: EventLoopExecutor(server.channel.eventLoop)) {
                            try await self.accept(on: server, listener: listener)
                        }
                    }
                }
                // Listeners a reload opens join here; the stream ends at shutdown.
                for await (listener, acceptors) in added {
                    for server in acceptors {
                        group.addTask(executorPreference: EventLoopExecutor(server.channel.eventLoop)) {
                            try await self.accept(on: server, listener: listener)
                        }
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
            for (_, acceptors) in current { for server in acceptors { server.channel.close(promise: nil) } }
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
        for (name, (old, acceptors)) in current where name != ListenerConfig.localName {
            if let new = wanted[name], same(old, new) { continue }
            active.withLockedValue { _ = $0.byName.removeValue(forKey: name) }
            boundAddresses.withLockedValue { _ = $0.removeValue(forKey: name) }
            for server in acceptors { try? await server.channel.close() }
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
                let acceptors = try await bind(listener, sockets: nil)
                let address = acceptors.first?.channel.localAddress
                if let address { boundAddresses.withLockedValue { $0[listener.name] = address } }
                let accepted = active.withLockedValue { active -> Bool in
                    guard !active.stopped, let added = active.added else { return false }
                    active.byName[listener.name] = (listener, acceptors)
                    added.yield((listener, acceptors))
                    return true
                }
                guard accepted else {
                    for server in acceptors { try? await server.channel.close() }
                    continue
                }
                environment.logger.info(
                    "listening on \(address.map(Self.describe) ?? "\(listener.address)") (\(listener.kind.rawValue), name=\(listener.name))")
            } catch {
                let failure = error as? ListenError ?? ListenError(address: "\(listener.address)", name: listener.name, cause: error)
                var text = "\(failure)"
                if listener.address.port < 1024, geteuid() != 0 { text += " (a port below 1024 takes a restart once root is dropped)" }
                problems.append(text)
                environment.logger.error("reload: \(text)")
            }
        }
        return problems
    }

    /// The acceptors of `listener`, one per listening socket (`sockets`, bound earlier, or
    /// one per event loop bound now), each on its own event loop, and each connection stays
    /// on the loop that accepted it. With a single acceptor, NIO hands each new connection
    /// between the acceptor's loop and the child's loop four times before the session starts
    /// (initialiser, registration, and back each time), every hop a wake-up of the other
    /// thread; a loop that accepts for itself makes none.
    private func bind(_ listener: ListenerConfig, sockets: [CInt]?, unix: Bool = false) async throws -> [ServerChannel] {
        let initializer = childInitializer(listener)
        let loops = Array(group.makeIterator())
        let handles = try sockets ?? Self.listeningSockets(listener, count: loops.count)
        var acceptors: [ServerChannel] = []
        for (index, handle) in handles.enumerated() {
            do {
                let loop = loops[index % loops.count]
                var bootstrap = ServerBootstrap(group: loop, childGroup: loop).serverChannelOption(.backlog, value: 512)
                // TCP_NODELAY is a TCP-level option: at the socket level its number is
                // SO_DEBUG, which needs CAP_NET_ADMIN and leaves Nagle's algorithm on.
                if !unix { bootstrap = bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1) }
                acceptors.append(try await bootstrap.bind(handle, childChannelInitializer: initializer))
            } catch {
                // The acceptors made so far own their sockets and close them with their
                // channels; the sockets not yet handed to a channel are still ours.
                for acceptor in acceptors { try? await acceptor.channel.close() }
                for rest in handles.dropFirst(index + 1) { close(rest) }
                throw error
            }
        }
        return acceptors
    }

    private func childInitializer(_ listener: ListenerConfig) -> @Sendable (any Channel) -> EventLoopFuture<ChannelInbox<SMTPFrame>> {
        let implicitTLS = listener.kind == .smtps ? environment.tlsContext : nil
        let limiter = self.limiter
        let timeouts = FramingTimeouts(
            command: TimeAmount(config.limits.commandTimeout.duration), data: TimeAmount(config.limits.dataTimeout.duration),
            stressCommand: TimeAmount(config.limits.stressCommandTimeout.duration),
            stressData: TimeAmount(config.limits.stressDataTimeout.duration),
            underStress: { limiter.underPressure })
        return { channel in
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
    }

    /// Listening sockets for `listener`, one per acceptor (`count`, one per event loop),
    /// bound now with plain system calls: also for the part of `tern serve` that runs as root
    /// before the async runtime starts. They form one `SO_REUSEPORT` group, so the kernel
    /// spreads new connections over them. The first is bound before it joins the group: a
    /// port that anything else holds, another Tern included, fails with "address already in
    /// use" as a plain socket would, and nothing bound later without that option can join.
    public static func listeningSockets(_ listener: ListenerConfig, count: Int = System.coreCount) throws -> [CInt] {
        let address = try SocketAddress.makeAddressResolvingHost(listener.address.host, port: listener.address.port)
        func fail(_ fd: CInt, _ call: String) -> ListenError {
            let code = errno
            close(fd)
            return ListenError(address: "\(listener.address)", name: listener.name, cause: IOError(errnoCode: code, reason: call))
        }
        var one: CInt = 1
        let size = socklen_t(MemoryLayout<CInt>.size)
        func open(joinFirst: Bool, bind: (CInt) -> CInt) throws -> CInt {
            let fd = Glibc.socket(Int32(address.protocol.rawValue), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, size)
            if joinFirst { _ = setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, size) }
            guard bind(fd) == 0 else { throw fail(fd, "bind") }
            if !joinFirst { _ = setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, size) }
            guard listen(fd, 512) == 0 else { throw fail(fd, "listen") }
            return fd
        }
        let first = try open(joinFirst: false) { fd in address.withSockAddr { Glibc.bind(fd, $0, socklen_t($1)) } }
        var sockets = [first]
        // The others bind to the address the first got (the kernel's port for port 0). One
        // that cannot is left out: fewer acceptors, the same service.
        var bound = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(first, $0, &length) }
        }
        guard named == 0 else { return sockets }
        while sockets.count < count {
            let member = try? open(joinFirst: true) { fd in
                withUnsafePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, length) } }
            }
            guard let member else { break }
            sockets.append(member)
        }
        return sockets
    }

    private func accept(
        on server: ServerChannel, listener: ListenerConfig
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
