#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServiceLifecycle
import TernCore
import Transports
import UnixSignals
import Spool

/// One operator command to the running daemon, one JSON line over the control socket.
public struct ControlRequest: Sendable, Codable {
    public enum Operation: String, Sendable, Codable { case flush, delete, hold, release, lanes, suspend, resume, reload }
    public var operation: Operation
    public var selection: Scheduler.Selection
    /// For suspend and resume: the lane; for suspend, until when (ms since 1970).
    public var lane: String?
    public var untilMillis: Int64?

    public init(operation: Operation, selection: Scheduler.Selection, lane: String? = nil, untilMillis: Int64? = nil) {
        self.operation = operation
        self.selection = selection
        self.lane = lane
        self.untilMillis = untilMillis
    }
}

public struct ControlReply: Sendable, Codable {
    public var count: Int
    public var error: String?
    /// For `lanes`.
    public var lanes: [LaneStatus]?
    /// For `reload`: changed keys that only a restart applies.
    public var needsRestart: [String]?
    /// For `reload`: what could not be applied (a listener that could not be opened).
    public var problems: [String]?

    public init(count: Int, error: String? = nil, lanes: [LaneStatus]? = nil, needsRestart: [String]? = nil, problems: [String]? = nil) {
        self.count = count
        self.error = error
        self.lanes = lanes
        self.needsRestart = needsRestart
        self.problems = problems
    }
}

/// Runs the scheduler and the control socket (`<spool>/control`, mode 0600: only the
/// spool's owner may flush or delete mail). Stops after the listeners, on graceful shutdown.
public final class QueueManagerService: Service, Sendable {
    public let scheduler: Scheduler
    let socketPath: String
    let logger: Logger
    /// Reads the config file again: the new config, or why it was refused.
    let reloadConfig: @Sendable () -> Result<(TernConfig, [String: ClientCredentials]), ConfigError>
    /// Opens and closes listeners as a reloaded config says; returns what it could not do.
    let applyListeners: @Sendable ([ListenerConfig]) async -> [String]
    /// Told when a reload starts and ends (systemd's RELOADING=1 and READY=1).
    let reloadState: @Sendable (_ reloading: Bool) -> Void

    public init(
        scheduler: Scheduler, spoolRoot: String, logger: Logger, running: TernConfig? = nil,
        reloadConfig: @escaping @Sendable () -> Result<(TernConfig, [String: ClientCredentials]), ConfigError> = { .failure(ConfigError(file: "", line: nil, keyPath: "", message: "reload is not available")) },
        applyListeners: @escaping @Sendable ([ListenerConfig]) async -> [String] = { _ in [] },
        reloadState: @escaping @Sendable (Bool) -> Void = { _ in }
    ) {
        self.applyListeners = applyListeners
        self.reloadState = reloadState
        self.running = NIOLockedValueBox(running)
        self.scheduler = scheduler
        self.socketPath = spoolRoot + "/control"
        self.logger = logger
        self.reloadConfig = reloadConfig
    }

    /// SIGHUP and `tern reload`: a valid new config replaces the shaping rules; an invalid
    /// one is refused and the running one stays.
    func reload() async -> String? {
        reloadState(true)
        defer { reloadState(false) }
        LogSink.shared.reopen()
        switch reloadConfig() {
        case .success(let (config, credentials)):
            await scheduler.reload(config, credentials: credentials)
            let problems = await applyListeners(config.listeners)
            pendingProblems.withLockedValue { $0 = problems }
            if problems.isEmpty {
                // Applied: the next reload compares with these.
                running.withLockedValue { $0?.listeners = config.listeners }
            }
            let changed = Self.restartOnly(running.withLockedValue { $0 }, config)
            if !changed.isEmpty {
                logger.warning("reload: changed \(changed.joined(separator: ", ")) take effect only at a restart; the running values stay")
            }
            pendingRestart.withLockedValue { $0 = changed }
            return nil
        case .failure(let error):
            logger.error("reload refused, the running configuration stays: \(error)")
            return "\(error)"
        }
    }

    public static func socketPath(spool: String) -> String { spool + "/control" }

    /// The config the process started with: what reload cannot change is compared to it.
    let running: NIOLockedValueBox<TernConfig?>
    private let pendingRestart = NIOLockedValueBox<[String]>([])
    private let pendingProblems = NIOLockedValueBox<[String]>([])

    /// The keys whose new values only a restart applies (listeners, access rules, filters,
    /// the spool, TLS files, limits, the user, the resolver, metrics).
    static func restartOnly(_ old: TernConfig?, _ new: TernConfig) -> [String] {
        guard let old else { return [] }
        var changed: [String] = []
        func check(_ key: String, _ a: Any, _ b: Any) { if String(describing: a) != String(describing: b) { changed.append(key) } }
        check("hostname", old.hostname, new.hostname)
        check("spool", old.spool, new.spool)
        check("listeners", old.listeners.map { "\($0.name) \($0.kind) \($0.address)" }, new.listeners.map { "\($0.name) \($0.kind) \($0.address)" })
        check("tls", old.tls as Any, new.tls as Any)
        check("access", old.access, new.access)
        check("limits", old.limits, new.limits)
        check("filters", old.filters.map { "\($0.name) \($0.type) \($0.listeners ?? []) \($0.settings)" },
              new.filters.map { "\($0.name) \($0.type) \($0.listeners ?? []) \($0.settings)" })
        check("metrics", old.metrics.map { "\($0.address)" } as Any, new.metrics.map { "\($0.address)" } as Any)
        check("sendmail", old.sendmail, new.sendmail)
        check("alerts", old.alerts as Any, new.alerts as Any)
        check("user", [old.user, old.group], [new.user, new.group])
        check("delivery.resolver", old.delivery.resolver.map { "\($0)" } as Any, new.delivery.resolver.map { "\($0)" } as Any)
        return changed
    }

    public func run() async throws {
        unlink(socketPath)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(unixDomainSocketPath: socketPath, cleanupExistingSocketFile: true) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        chmod(socketPath, 0o600)
        let scheduler = self.scheduler
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { await scheduler.run() }
            group.addTask {
                // logrotate's postrotate: the log file is opened again.
                for await _ in await UnixSignalsSequence(trapping: .sigusr1) {
                    LogSink.shared.reopen()
                    self.logger.notice("SIGUSR1: log reopened")
                }
            }
            group.addTask {
                for await _ in await UnixSignalsSequence(trapping: .sighup) {
                    self.logger.notice("SIGHUP: reloading the configuration")
                    _ = await self.reload()
                }
            }
            group.addTask {
                // Cancelled at shutdown: the socket closes, which is the normal end.
                try? await server.executeThenClose { connections in
                    try await withThrowingDiscardingTaskGroup { sessions in
                        for try await connection in connections {
                            sessions.addTask { await self.serve(connection) }
                        }
                    }
                }
            }
            // A graceful shutdown (SIGTERM) first stops dispatching and gives deliveries
            // under way up to 10 s to finish and be recorded; then every task of the queue
            // manager, workers included, is cancelled and waited for. A delivery cut
            // short is tried again after the restart: a message is removed only after
            // its outcome is recorded.
            if (try? await gracefulShutdown()) != nil {
                await scheduler.drain(timeout: .seconds(10))
            }
            group.cancelAll()
        }
    }

    private func serve(_ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>) async {
        do {
            try await connection.executeThenClose { inbound, outbound in
                var request: [UInt8] = []
                for try await var chunk in inbound {
                    request += chunk.readBytes(length: chunk.readableBytes) ?? []
                    if request.contains(0x0A) || request.count > 65536 { break }
                }
                let reply: ControlReply
                do {
                    let decoded = try JSONDecoder().decode(ControlRequest.self, from: Data(request.prefix { $0 != 0x0A }))
                    reply = await perform(decoded)
                } catch {
                    reply = ControlReply(count: 0, error: "bad request: \(error)")
                }
                var bytes = Array(try JSONEncoder().encode(reply))
                bytes.append(0x0A)
                try await outbound.write(ByteBuffer(bytes: bytes))
            }
        } catch {
            logger.debug("control connection: \(error)")
        }
    }

    private func perform(_ request: ControlRequest) async -> ControlReply {
        switch request.operation {
        case .flush: return ControlReply(count: await scheduler.flush(request.selection))
        case .delete: return ControlReply(count: await scheduler.delete(request.selection))
        case .hold: return ControlReply(count: await scheduler.hold(request.selection, true))
        case .release: return ControlReply(count: await scheduler.hold(request.selection, false))
        case .lanes:
            let lanes = await scheduler.laneStatus()
            return ControlReply(count: lanes.count, lanes: lanes)
        case .reload:
            if let error = await reload() { return ControlReply(count: 0, error: "reload refused: \(error)") }
            return ControlReply(
                count: 1, needsRestart: pendingRestart.withLockedValue { $0 }, problems: pendingProblems.withLockedValue { $0 })
        case .suspend, .resume:
            guard let lane = request.lane else { return ControlReply(count: 0, error: "no lane named") }
            let until = request.operation == .suspend ? request.untilMillis ?? Scheduler.wallClockMillis() + 3_600_000 : nil
            guard await scheduler.suspendLane(lane, until: until) else { return ControlReply(count: 0, error: "no lane \(lane) (see tern lanes)") }
            return ControlReply(count: 1)
        }
    }
}

/// The command-line side of the control socket: blocking, one request, one reply.
public enum ControlClient {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        /// Nothing listens on the socket: no daemon runs on this spool.
        public var noDaemon = false
    }

    public static func send(_ request: ControlRequest, socket path: String) throws -> ControlReply {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard let address = UnixSocketAddress(path: path) else { throw Failure(description: "\(path): path too long") }
        guard address.connect(fd) == 0 else {
            let code = errno
            throw Failure(
                description: "cannot reach the daemon at \(path): \(String(cString: strerror(code)))",
                noDaemon: code == ENOENT || code == ECONNREFUSED)
        }
        var out = Array(try JSONEncoder().encode(request))
        out.append(0x0A)
        var sent = 0
        while sent < out.count {
            let n = out.withUnsafeBytes { write(fd, $0.baseAddress! + sent, out.count - sent) }
            guard n > 0 else { throw Failure(description: "write to \(path): \(String(cString: strerror(errno)))") }
            sent += n
        }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !reply.contains(0x0A) {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            guard n > 0 else { break }
            reply += buffer[0..<n]
        }
        do {
            return try JSONDecoder().decode(ControlReply.self, from: Data(reply.prefix { $0 != 0x0A }))
        } catch {
            throw Failure(description: "bad reply from the daemon: \(error)")
        }
    }
}

/// The same operations on a spool that no daemon has open (as Postfix's postsuper works on
/// a stopped queue). Only when `ControlClient` found nobody listening.
public enum OfflineQueueControl {
    public static func perform(_ request: ControlRequest, spool root: String) throws -> Int {
        var count = 0
        for message in try Spool.load(root: root) {
            let chosen = request.selection.recipients(message.id, message.envelope, message.states, message.meta)
            guard !chosen.isEmpty else { continue }
            switch request.operation {
            case .delete:
                var states = message.states
                for i in chosen { states[i] = .deleted }
                if states.allSatisfy(\.isFinal) {
                    try Spool.removeOffline(root: root, message)
                } else {
                    try Spool.markOffline(root: root, message, Dictionary(uniqueKeysWithValues: chosen.map { ($0, .deleted) }))
                }
            case .hold, .release:
                let held = request.operation == .hold
                guard message.meta.held != held else { continue }
                var meta = message.meta
                meta.held = held
                if !held { for i in meta.recipients.keys { meta.recipients[i]!.nextAttemptMillis = 0 } }
                try Spool.writeMetaOffline(root: root, id: message.id, meta)
            case .flush, .lanes, .suspend, .resume, .reload:
                return 0
            }
            count += 1
        }
        return count
    }
}
