import ArgumentParser
import DKIMSigning
import Delivery
import HeaderRewrite
import MilterBridge
import Ingress
import Logging
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
import Prometheus
import QueueManager
import ServiceLifecycle
import Spool
import TernCore
import Transports

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct Tern: AsyncParsableCommand {
    static let version = "0.9.0"
    static let configuration = CommandConfiguration(
        commandName: "tern",
        abstract: "Tern, an outbound SMTP relay.",
        version: "tern \(version)",
        subcommands: [Serve.self, Status.self, Check.self, Reload.self, Queue.self, Lanes.self, Route.self, DKIM.self, Report.self, Sendmail.self]
    )
}

struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "The configuration file (default: $TERN_CONFIG, else /etc/tern/tern.yaml if it exists, else config/tern.yaml).")
    var config: String = ConfigOption.defaultPath()

    /// Where an installed Tern and one run from its source tree find their config without
    /// flags: every command (serve, queue, lanes, reload) looks in the same place.
    static func defaultPath() -> String {
        if let path = getenv("TERN_CONFIG").map({ String(cString: $0) }), !path.isEmpty { return path }
        if access("/etc/tern/tern.yaml", F_OK) == 0 { return "/etc/tern/tern.yaml" }
        return "config/tern.yaml"
    }

    /// Loads and validates the configuration; on error prints it and exits with EX_CONFIG.
    func load() throws -> TernConfig {
        do {
            return try ConfigLoader.load(path: config, plugins: filterPlugins)
        } catch {
            printError("tern: \(error)")
            throw ExitCode(78)
        }
    }
}

/// The filter plugins this executable offers (`filters[].type`). A new plugin is one line here.
let filterPlugins = FilterRegistry([
    FilterRegistry.plugin(HeaderRewritePlugin.self),
    FilterRegistry.plugin(DKIMSigningPlugin.self),
    FilterRegistry.plugin(MilterPlugin.self),
])

func printError(_ text: String) {
    (text + "\n").withCString { _ = write(2, $0, strlen($0)) }
}

/// Everything `serve` and `check` load besides the YAML: the users file and the TLS context.
struct LoadedResources {
    var users: UserDatabase?
    var tls: NIOSSLContext?
    /// Smarthost logins by route name (passwords read from their files).
    var smarthostCredentials: [String: ClientCredentials] = [:]

    init(_ config: TernConfig, file: String) throws {
        // Secrets that other users could read are refused, as the smarthost password file
        // and DKIM keys are: a users file's hashes can be cracked offline, a key impersonates.
        for (key, path) in [("access.users_file", config.access.usersFile), ("tls.key", config.tls?.key)] {
            guard let path, let mode = Self.groupOrOtherMode(path) else { continue }
            printError("tern: \(file): \(key): \(path) has mode \(mode), which lets other users read it; chmod 600 it")
            throw ExitCode(78)
        }
        if let path = config.access.usersFile {
            do {
                users = try UserDatabase.load(path: path)
            } catch {
                printError("tern: \(file): access.users_file: \(error)")
                throw ExitCode(78)
            }
        }
        switch Self.smarthostCredentials(config, file: file) {
        case .success(let found): smarthostCredentials = found
        case .failure(let error):
            printError("tern: \(error)")
            throw ExitCode(78)
        }
        if let files = config.tls {
            do {
                tls = try TLSSetup.serverContext(files)
            } catch {
                printError("tern: \(file): tls: cannot load \(files.certificate) / \(files.key): \(Self.tlsReason(error))")
                throw ExitCode(78)
            }
        }
    }
}

extension LoadedResources {
    /// NIOSSL's error names in an operator's words.
    static func tlsReason(_ error: any Error) -> String {
        let text = "\(error)"
        if text.contains("failedToLoadPrivateKey") {
            return "the private key does not match the certificate, or is not a PEM private key"
        }
        if text.contains("failedToLoadCertificate") { return "the certificate is not a PEM certificate" }
        return text
    }

    /// The file's permission bits in octal when group or others may read or write it.
    static func groupOrOtherMode(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0, st.st_mode & 0o077 != 0 else { return nil }
        return String(st.st_mode & 0o777, radix: 8)
    }

    /// Reads each smarthost route's password file (at start, and again on each reload).
    static func smarthostCredentials(_ config: TernConfig, file: String) -> Result<[String: ClientCredentials], ConfigError> {
        var found: [String: ClientCredentials] = [:]
        for (i, route) in config.routes.enumerated() {
            guard let auth = route.smarthost?.auth else { continue }
            do {
                found[route.name] = ClientCredentials(user: auth.user, password: try auth.readPassword(), allowPlaintext: auth.allowPlaintext)
            } catch {
                return .failure(ConfigError(file: file, line: nil, keyPath: "routes[\(i)].smarthost.auth.password_file", message: "\(error)"))
            }
        }
        return .success(found)
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the relay: accept mail from trusted clients, filter it, queue it durably, deliver it.",
        discussion: """
            Stops gracefully on SIGTERM or SIGINT: listeners close first, open transactions \
            finish, idle sessions get 421, deliveries under way get up to 10 seconds to finish. \
            SIGHUP re-reads the delivery settings (as `tern reload` does). \
            Logs go to standard error, the local syslog (facility mail) or a file, as log.output says, \
            one line per event; SIGUSR1 reopens a log file.
            """
    )

    @OptionGroup var options: ConfigOption

    func run() async throws {
        // With `user:` set and started as root, the root part ran before the async runtime
        // (see `Prestart`): this process is that user now, its listeners bound, keys read.
        let prestart = Prestart.state.flatMap { $0.configPath == options.config ? $0 : nil }
        let config = try prestart?.config ?? options.load()
        let resources = try prestart?.resources ?? LoadedResources(config, file: options.config)
        if prestart == nil {
            let planned: PrivilegeDrop?
            do {
                planned = try PrivilegeDrop.plan(user: config.user, group: config.group)
            } catch {
                printError("tern: \(options.config): \(error)")
                throw ExitCode(78)
            }
            if planned != nil {
                printError("tern: user: the privilege drop did not run; refusing to run as root")
                throw ExitCode(71)
            }
        }
        let level = Logger.Level(rawValue: config.log.level) ?? .info
        if prestart == nil {  // else opened before the privilege drop
            do {
                try LogSink.shared.open(config.log.output)
                LogSink.shared.configure(style: config.log.style, hostname: config.hostname)
            } catch {
                printError("tern: \(options.config): \(error)")
                throw ExitCode(73)
            }
        }
        LoggingSystem.bootstrap { TernLogHandler(label: $0, level: level) }
        let logger = Logger(label: "tern")
        var metricsEndpoint: MetricsEndpoint?
        if let metrics = config.metrics {
            let registry = PrometheusCollectorRegistry()
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
            metricsEndpoint = MetricsEndpoint(address: metrics.address, registry: registry, logger: logger)
            Gauge(label: "tern_up").record(1)
            Gauge(label: "tern_start_time_seconds").record(Int(time(nil)))
        }

        // File I/O blocks; it runs here, never on an event loop. Many threads let the
        // kernel merge concurrent fsyncs into one journal commit.
        let threadPool = NIOThreadPool(numberOfThreads: 16)
        threadPool.start()
        await HelperThreads.yieldWakeups(of: threadPool, threads: 16, name: "spool", logger: logger)
        // One daemon per spool, before anything in it is touched: recovery, the control
        // socket. The lock lives as long as this process.
        let spoolLock: SpoolLock
        do {
            spoolLock = try SpoolLock.acquire(root: config.spool)
        } catch let busy as SpoolLock.Busy {
            printError("tern: cannot serve: \(busy)")
            throw ExitCode(75)
        } catch {
            printError("tern: cannot lock the spool \(config.spool): \(error)")
            throw ExitCode(73)
        }
        defer { withExtendedLifetime(spoolLock) {} }
        let spool: Spool
        let report: Spool.RecoveryReport
        do {
            (spool, report) = try await Spool.open(root: config.spool, threadPool: threadPool, logger: logger)
        } catch {
            printError("tern: cannot open the spool \(config.spool): \(error)")
            throw ExitCode(73)
        }
        logger.info(
            "spool \(config.spool): \(report.queued) queued, \(report.removedIncomplete) half-written removed, \(report.corrupt) corrupt"
        )
        // Lookups block a thread for as long as the DNS takes (seconds when a server is
        // down); they get threads of their own so that they never hold up the spool.
        let dnsThreads = NIOThreadPool(numberOfThreads: 8)
        dnsThreads.start()
        await HelperThreads.yieldWakeups(of: dnsThreads, threads: 8, name: "resolver", logger: logger)
        let resolver: MXResolver
        do {
            resolver = try MXResolver(server: config.delivery.resolver.map { ($0.host, $0.port) }, threadPool: dnsThreads)
        } catch {
            printError("tern: \(options.config): delivery.resolver: \(error)")
            throw ExitCode(78)
        }
        let scheduler = Scheduler(
            config: config, spool: spool, resolver: resolver, credentials: resources.smarthostCredentials, logger: logger)
        do {
            try await scheduler.load()
        } catch {
            printError("tern: cannot read the spool \(config.spool): \(error)")
            throw ExitCode(73)
        }
        let filters: FilterChain
        do {
            filters = try prestart?.filters ?? filterPlugins.chain(config.filters)
        } catch {
            printError("tern: \(options.config): filters: \(error)")
            throw ExitCode(78)
        }
        let server = SMTPServer(
            config: config, spool: spool, users: resources.users, tlsContext: resources.tls,
            group: MultiThreadedEventLoopGroup.singleton, threadPool: threadPool, logger: logger,
            filters: filters,
            onQueued: { id, slot, envelope, size, held in scheduler.post(id, slot: slot, envelope: envelope, size: size, held: held) })
        let path = options.config
        let queueManager = QueueManagerService(
            scheduler: scheduler, spoolRoot: config.spool, logger: logger, running: config,
            reloadConfig: {
                Result { () throws(ConfigError) -> (TernConfig, [String: ClientCredentials]) in
                    let config = try ConfigLoader.load(path: path, plugins: filterPlugins)
                    return (config, try LoadedResources.smarthostCredentials(config, file: path).get())
                }
            },
            applyListeners: { await server.apply($0) },
            reloadState: { SystemdNotify.send($0 ? SystemdNotify.reloading() : "READY=1") })
        // Listeners are bound here, as the user that started Tern (root may bind port 25);
        // then, with `user:` set, the spool goes to that user and root goes for good.
        do {
            try await metricsEndpoint?.bind()
        } catch {
            printError("tern: metrics.address: cannot listen on \(config.metrics.map { "\($0.address)" } ?? ""): \(error)")
            throw ExitCode(71)
        }
        do {
            let localSocket = try prestart?.localSocket ?? LocalSubmissionSetup.open(config, owner: nil)
            try await server.bindListeners(sockets: prestart?.sockets ?? [:], localSocket: localSocket)
        } catch {
            printError("tern: \(error)")
            throw ExitCode(71)
        }
        if let privileges = prestart?.privileges {
            logger.info("running as \(privileges.user) (uid \(privileges.uid), gid \(privileges.gid))")
        }
        let pickup = MaildropPickup(
            spool: config.spool, maxSize: config.limits.maxMessageSize.bytes, threadPool: threadPool, logger: logger)
        let alertMonitor = config.alerts.map {
            AlertMonitor(config: $0, tern: config, scheduler: scheduler, threadPool: threadPool, logger: logger)
        }
        // Services stop in reverse order: the pickup and listeners first, the queue manager after them.
        let group = ServiceGroup(
            configuration: .init(
                services: [metricsEndpoint.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) }].compactMap { $0 }
                    + [.init(service: queueManager), .init(service: server), .init(service: pickup)]
                    + (alertMonitor.map { [ServiceGroupConfiguration.ServiceConfiguration(service: $0)] } ?? [])
                    + [.init(service: ReadinessService())],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: Logger(label: "tern.lifecycle", factory: { _ in SwiftLogNoOpLogHandler() })
            ))
        logger.info("tern starting, hostname \(config.hostname)")
        try await group.run()
        try await threadPool.shutdownGracefully()
        try? await dnsThreads.shutdownGracefully()
        logger.info("tern stopped")
    }
}

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate the configuration and print the effective listeners and policy.",
        discussion: "Exits 0 when the configuration is valid, 78 (EX_CONFIG) with the key and line of the first error otherwise."
    )

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let config = try options.load()
        let resources = try LoadedResources(config, file: options.config)
        print("\(options.config): ok")
        print("hostname: \(config.hostname)")
        print("spool: \(config.spool)")
        print("listeners:")
        for l in config.listeners {
            let tls: String
            switch l.kind {
            case .smtp: tls = config.tls == nil ? "no TLS" : "STARTTLS offered"
            case .submission: tls = "STARTTLS required, then AUTH"
            case .smtps: tls = "implicit TLS, then AUTH"
            }
            print("  \(l.name): \(l.kind.rawValue) on \(l.address) (\(tls))")
        }
        print("relay allowed from: \(config.access.mynetworks.map(\.description).joined(separator: ", "))")
        if let users = resources.users {
            print("  and for authenticated users (\(users.count) in \(config.access.usersFile!)), AUTH PLAIN LOGIN over TLS only")
        } else {
            print("  AUTH: not offered (no access.users_file)")
        }
        for (user, senders) in config.access.allowedSenders.sorted(by: { $0.key < $1.key }) {
            print("  \(user) may send as: \(senders.joined(separator: ", "))")
        }
        print("bare CR/LF in DATA: \(config.access.bareLineEndings.rawValue)")
        let l = config.limits
        print(
            "limits: max_message_size \(l.maxMessageSize), max_recipients \(l.maxRecipients), max_connections \(l.maxConnections), "
                + "max_connections_per_client \(l.maxConnectionsPerClient), command_timeout \(l.commandTimeout), data_timeout \(l.dataTimeout), "
                + "max_errors \(l.maxErrors), max_auth_failures \(l.maxAuthFailures) per \(l.authFailureWindow)")
        let d = config.delivery
        print("delivery:\(d.paused ? " PAUSED (mail is queued, not delivered)" : "")")
        print("  DNS: \(d.resolver.map { "\($0)" } ?? "servers in /etc/resolv.conf"); MX port \(d.mxPort), TLS \(d.mxTLS.rawValue)")
        print(
            "  retries from \(d.retryFirst) doubling to \(d.retryMaximum) (jitter \(d.retryJitter)), bounced after \(d.queueLifetime)"
                + (d.delayWarning.map { "; delay warning after \($0)" } ?? ""))
        print("  bounces of bounces: \(d.postmaster.map { "to \($0)" } ?? "logged and dropped")")
        print(
            "  lanes: max_connections \(d.lane.maxConnections), initial_connections \(d.lane.initialConnections), "
                + "messages_per_connection \(d.lane.messagesPerConnection), dead_time \(d.lane.deadTime), "
                + "rate \(d.lane.rate.map { "\($0), burst \(d.lane.burst)" } ?? "unlimited"), "
                + "connection_rate \(d.lane.connectionRate.map { "\($0), burst \(d.lane.connectionBurst)" } ?? "unlimited"), "
                + "max_recipients \(d.lane.maxRecipients), max_queued \(d.lane.maxQueued); idle lanes forgotten after \(d.laneIdleTime)")
        print("  active queue: \(d.activeLimit) transactions in all lanes at most")
        print("  reply rules (first match wins):\(d.replyRules.isEmpty ? " none" : "")")
        for rule in d.replyRules {
            let match = [
                rule.code.map { "code \($0)" }, rule.enhanced.map { "enhanced \($0)" }, rule.text.map { "text /\($0)/" },
            ].compactMap { $0 }.joined(separator: ", ")
            let action = rule.action == .bounce ? "bounce" : rule.action == .suspend ? "suspend for \(rule.duration)" : "reduce to \(rule.factor) for \(rule.duration)"
            print("    \(match)\(rule.lanes.map { " on \($0.joined(separator: ", "))" } ?? "") -> \(action)")
        }
        print("routes (first match wins):")
        for route in config.routes {
            let senders = route.senderDomains.map { " from \($0.joined(separator: ", "))" } ?? ""
            let target: String
            if let s = route.smarthost {
                target = "smarthost \(s.host):\(s.port), tls \(s.tls.rawValue)\(s.auth.map { ", AUTH as \($0.user)" } ?? "")"
            } else {
                target = "MX, tls \(d.mxTLS.rawValue)"
            }
            print("  \(route.name): \(route.domains.joined(separator: ", "))\(senders) -> \(target)")
        }
        print("  otherwise: MX, tls \(d.mxTLS.rawValue)")
        print("providers (their domains share one lane): \(config.providers.isEmpty ? "none" : config.providers.map(\.name).joined(separator: ", "))")
        print("filters (in order, before queueing):\(config.filters.isEmpty ? " none" : "")")
        for f in config.filters {
            print("  \(f.name): \(f.type) on \(f.listeners?.joined(separator: ", ") ?? "every listener"); on failure \(f.onFailure.rawValue)")
        }
    }
}

struct Queue: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect and control the queue.",
        discussion: """
            list and show read the spool directly. flush, delete, hold and release talk to the running \
            daemon over the control socket in the spool directory; when no daemon runs, delete, hold \
            and release change the spool's files themselves.
            """,
        subcommands: [List.self, Show.self, Flush.self, Delete.self, Hold.self, Release.self]
    )

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List queued messages: id, size, arrival, sender; each recipient's state, attempts, next attempt and last error.",
            discussion: "A `!` after the queue id marks a held message.")

        @OptionGroup var options: ConfigOption
        @Flag(help: "Print JSON, one array of messages.") var json = false

        func run() async throws {
            let config = try options.load()
            let messages = try loadQueue(config)
            if json {
                print(try QueueListing.json(messages.map(ListedMessage.init)))
            } else {
                print(QueueListing.table(messages), terminator: "")
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one message: envelope, recipient states and headers.")

        @OptionGroup var options: ConfigOption
        @Argument(help: "The queue id.") var id: String

        func run() async throws {
            let config = try options.load()
            guard let m = try loadQueue(config).first(where: { $0.id.rawValue == id }) else {
                printError("tern: \(id): not in the queue")
                throw ExitCode(1)
            }
            print(try QueueListing.json(ListedMessage(m)))
            print("")
            print(String(decoding: Spool.headers(root: config.spool, of: m), as: UTF8.self), terminator: "")
        }
    }

    struct Selector: ParsableArguments {
        @Argument(help: "Queue ids.") var ids: [String] = []
        @Option(help: "Recipients in this domain.") var domain: String?
        @Option(help: "Messages from this sender, or from every sender of @domain.") var sender: String?

        func selection(deferred: Bool = false, all: Bool = false) throws -> Scheduler.Selection {
            guard !ids.isEmpty || domain != nil || sender != nil || deferred || all else {
                throw ValidationError("say which messages: queue ids, --domain, --sender\(all ? "" : "") or --all")
            }
            return Scheduler.Selection(ids: ids.isEmpty ? nil : ids, domain: domain, sender: sender, deferredOnly: deferred, all: all)
        }
    }

    struct Flush: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Attempt delivery now (all deferred mail, or what is selected), waking resting destinations.")

        @OptionGroup var options: ConfigOption
        @OptionGroup var selector: Selector

        func run() async throws {
            let config = try options.load()
            let everything = selector.ids.isEmpty && selector.domain == nil && selector.sender == nil
            let count = try control(config, .flush, try selector.selection(all: everything))
            print("flushed: \(count) message\(count == 1 ? "" : "s")")
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete messages (with --domain, only those recipients) without notifying the senders.")

        @OptionGroup var options: ConfigOption
        @OptionGroup var selector: Selector
        @Flag(help: "Every message with a deferred recipient.") var deferred = false
        @Flag(help: "Every message.") var all = false

        func run() async throws {
            let config = try options.load()
            let count = try control(config, .delete, try selector.selection(deferred: deferred, all: all))
            print("deleted: \(count) message\(count == 1 ? "" : "s")")
        }
    }

    struct Hold: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Keep messages queued without delivering them, until released.")

        @OptionGroup var options: ConfigOption
        @OptionGroup var selector: Selector
        @Flag(help: "Every message.") var all = false

        func run() async throws {
            let count = try control(try options.load(), .hold, try selector.selection(all: all))
            print("held: \(count) message\(count == 1 ? "" : "s")")
        }
    }

    struct Release: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Release held messages; they are attempted at once.")

        @OptionGroup var options: ConfigOption
        @OptionGroup var selector: Selector
        @Flag(help: "Every message.") var all = false

        func run() async throws {
            let count = try control(try options.load(), .release, try selector.selection(all: all))
            print("released: \(count) message\(count == 1 ? "" : "s")")
        }
    }
}

func loadQueue(_ config: TernConfig) throws -> [SpooledMessage] {
    do {
        return try Spool.load(root: config.spool)
    } catch {
        printError("tern: cannot read the spool: \(error)")
        throw ExitCode(75)
    }
}

/// Sends one request to the running daemon. When none listens, `offline` (when given)
/// does the work on the spool's files instead, as postsuper does; otherwise, or when that
/// fails, exits 75 (EX_TEMPFAIL). A request the daemon refuses exits 1.
func daemonRequest(_ config: TernConfig, _ request: ControlRequest, offline: (() throws -> Int)? = nil) throws -> ControlReply {
    do {
        let reply = try ControlClient.send(request, socket: QueueManagerService.socketPath(spool: config.spool))
        if let error = reply.error {
            printError("tern: \(error)")
            throw ExitCode(1)
        }
        return reply
    } catch let error as ControlClient.Failure where error.noDaemon && offline != nil {
        do {
            // The spool's lock says whether a daemon owns it, whatever its socket does: the
            // files are edited only under the lock, never under a live daemon.
            let lock = try SpoolLock.acquire(root: config.spool)
            defer { withExtendedLifetime(lock) {} }
            return ControlReply(count: try offline!())
        } catch let busy as SpoolLock.Busy {
            printError("tern: \(busy); its control socket does not answer, so nothing was changed")
            throw ExitCode(75)
        } catch {
            printError("tern: \(config.spool): \(error)")
            throw ExitCode(75)
        }
    } catch let error as ControlClient.Failure {
        printError("tern: \(error.description) (is `tern serve` running with this config?)")
        throw ExitCode(75)
    }
}

/// A queue command (flush, delete, hold, release): the daemon's count of messages. With no
/// daemon, all but flush edit the spool's files.
func control(_ config: TernConfig, _ operation: ControlRequest.Operation, _ selection: Scheduler.Selection) throws -> Int {
    let request = ControlRequest(operation: operation, selection: selection)
    let offline = operation == .flush ? nil : { try OfflineQueueControl.perform(request, spool: config.spool) }
    return try daemonRequest(config, request, offline: offline).count
}

struct Route: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Explain routing.",
        subcommands: [Explain.self]
    )

    struct Explain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the route, next hop, lane and TLS policy that mail to an address would get.")

        @OptionGroup var options: ConfigOption
        @Argument(help: "The recipient address.") var recipient: String
        @Option(help: "The envelope sender (for routes by sender domain).") var sender: String = ""

        func run() async throws {
            let config = try options.load()
            let route = Router(routes: config.routes, delivery: config.delivery).route(recipient: recipient, sender: sender)
            print("recipient: \(recipient)")
            if !sender.isEmpty { print("sender: \(sender)") }
            print("route: \(route.name)\(route.name == "default" ? " (no route matched: direct MX delivery)" : "")")
            switch route.nextHop {
            case .mx(let domain):
                print("next hop: MX hosts of \(domain), port \(config.delivery.mxPort)")
            case .smarthost(let host, let port):
                print("next hop: smarthost \(host):\(port)")
            }
            print("lane: \(route.laneKey)")
            print("tls: \(route.tls.rawValue)\(route.caFile.map { " (CA file \($0))" } ?? "")")
            print("auth: \(route.authUser.map { "as \($0)" } ?? "none")")
            let l = route.limits
            print(
                "lane limits: max_connections \(l.maxConnections), initial_connections \(l.initialConnections), "
                    + "messages_per_connection \(l.messagesPerConnection), dead_time \(l.deadTime), "
                    + "rate \(l.rate.map { "\($0), burst \(l.burst)" } ?? "unlimited"), max_recipients \(l.maxRecipients)"
                    + (l.sourceAddress.map { ", source_address \($0)" } ?? ""))
        }
    }
}

struct DKIM: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dkim", abstract: "DKIM keys.", subcommands: [Keygen.self])

    struct Keygen: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a new DKIM private key (mode 600) and print the DNS TXT record to publish.",
            discussion: "Then add { domain, selector, key_file, algorithm } to a dkim_sign filter's keys.")

        @Option(help: "The signing domain (d=).") var domain: String
        @Option(help: "The selector (s=).") var selector: String
        @Option(help: "rsa-sha256 (RSA 2048) or ed25519-sha256 (also: rsa, ed25519).") var algorithm: String = "rsa-sha256"
        @Option(help: "Where to write the private key (default: SELECTOR.DOMAIN.key).") var out: String?

        func run() async throws {
            let name = algorithm.lowercased()
            let chosen: DKIMKey.Algorithm
            switch name {
            case "rsa", "rsa-sha256": chosen = .rsaSHA256
            case "ed25519", "ed25519-sha256": chosen = .ed25519SHA256
            default: throw ValidationError("--algorithm must be rsa-sha256 or ed25519-sha256")
            }
            let path = out ?? "\(selector).\(domain).key"
            let pair = try DKIMKeyGenerator.generate(chosen)
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
            guard fd >= 0 else {
                printError("tern: cannot create \(path): \(String(cString: strerror(errno)))")
                throw ExitCode(73)
            }
            _ = pair.privateKeyPEM.withCString { write(fd, $0, strlen($0)) }
            close(fd)
            print("private key: \(path) (\(chosen.rawValue), mode 600)")
            print("publish this TXT record:")
            // TXT strings are at most 255 bytes each (RFC 1035); long RSA keys are split.
            let chunks = stride(from: 0, to: pair.record.count, by: 250).map { i -> String in
                let start = pair.record.index(pair.record.startIndex, offsetBy: i)
                let end = pair.record.index(start, offsetBy: min(250, pair.record.count - i))
                return "\"\(pair.record[start..<end])\""
            }
            print("\(selector)._domainkey.\(domain). IN TXT ( \(chunks.joined(separator: " ")) )")
        }
    }
}

struct Lanes: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the running daemon's delivery lanes; suspend or resume one.",
        subcommands: [Show.self, Suspend.self, Resume.self], defaultSubcommand: Show.self)

    static func request(_ config: TernConfig, _ request: ControlRequest) throws -> ControlReply {
        do {
            let reply = try ControlClient.send(request, socket: QueueManagerService.socketPath(spool: config.spool))
            if let error = reply.error {
                printError("tern: \(error)")
                throw ExitCode(1)
            }
            return reply
        } catch let error as ControlClient.Failure {
            printError("tern: \(error.description) (is `tern serve` running with this config?)")
            throw ExitCode(75)
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "show",
            abstract: "A table: lane, domains, queued (+ messages waiting for room), in flight, connections (open/window/ceiling), rate, state, last reply.",
            discussion: """
                STATE is active, backing off (level N: connections and rate halved N times after many soft failures), \
                reduced until T (a reply rule), suspended until T (the operator or a reply rule) or dead until T \
                (every connection in a window failed). LAST REPLY shows the reply behind the state when there is one.
                """)

        @OptionGroup var options: ConfigOption
        @Flag(help: "Print JSON.") var json = false
        @Flag(help: "Refresh every second until interrupted.") var watch = false

        func run() async throws {
            let config = try options.load()
            repeat {
                let lanes = try daemonRequest(config, ControlRequest(operation: .lanes, selection: .init())).lanes ?? []
                if json {
                    print(try QueueListing.json(lanes))
                } else {
                    if watch { print("\u{1B}[H\u{1B}[2J", terminator: "") }
                    print(Self.table(lanes), terminator: "")
                }
                if watch {
                    fflush(nil)  // a pipe (`tern lanes --watch | tee`) sees each refresh
                    try await Task.sleep(for: .seconds(1))
                }
            } while watch
        }

        static func table(_ lanes: [LaneStatus]) -> String {
            var rows = [["LANE", "DOMAINS", "QUEUED", "INFLIGHT", "CONNS", "RATE", "STATE", "LAST REPLY"]]
            for l in lanes {
                let state = l.untilMillis.map { "\(l.state) until \(QueueListing.time($0))" } ?? l.state
                let slowed = l.rate != l.configuredRate ? l.configuredRate.map { " of \($0)" } ?? "" : ""
                let rate = [l.rate.map { $0 + slowed }, l.connectionRate.map { "\($0) conn" }].compactMap { $0 }.joined(separator: ", ")
                rows.append([
                    l.lane, String(l.domains), l.backlog > 0 ? "\(l.queued)+\(l.backlog)" : String(l.queued), String(l.inFlight), "\(l.connections)/\(l.window)/\(l.maxConnections)",
                    rate.isEmpty ? "-" : rate, state, String((l.reason ?? l.lastReply ?? "-").prefix(60)),
                ])
            }
            let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max()! }
            return rows.map { row in
                row.enumerated().map { c, cell in c == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[c] - cell.count) }
                    .joined(separator: "  ")
            }.joined(separator: "\n") + "\n"
        }
    }

    struct Suspend: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop delivering to a lane for a while; its mail waits in the lane, untried, and goes when the time is up.")
        @OptionGroup var options: ConfigOption
        @Argument(help: "The lane, as `tern lanes` names it, or a provider's name (`yahoo` for provider:yahoo, even before it has had mail).")
        var lane: String
        @Option(name: .customLong("for"), help: "How long: 30m, 2h, 1d.") var duration: String = "1h"

        func run() async throws {
            let config = try options.load()
            guard let d = ConfigDuration(parsing: duration) else { throw ValidationError("--for takes a duration such as 30m or 2h") }
            let until = Scheduler.wallClockMillis() + d.duration.components.seconds * 1000
            _ = try daemonRequest(config, ControlRequest(operation: .suspend, selection: .init(), lane: lane, untilMillis: until))
            print("\(lane): suspended until \(QueueListing.time(until))")
        }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Deliver to a suspended or resting lane again, now: its held and deferred mail goes at once.")
        @OptionGroup var options: ConfigOption
        @Argument(help: "The lane, or a provider's name.") var lane: String

        func run() async throws {
            _ = try daemonRequest(try options.load(), ControlRequest(operation: .resume, selection: .init(), lane: lane))
            print("\(lane): resumed")
        }
    }
}

struct Reload: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make the running daemon re-read its delivery settings: routes, smarthost passwords, providers, lane limits, reply rules, retries (as SIGHUP does).",
        discussion: """
            Queued mail and open connections stay; new connections take the new settings. An invalid configuration \
            is refused, and the running one stays. Listeners are opened and closed as the file says (a closed \
            listener's sessions finish first; a port below 1024 cannot be opened once root is dropped). Access \
            rules, filters, limits, TLS files, the spool, user and delivery.resolver take a restart: reload names \
            each such key that changed. A log file is reopened.
            """)

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let config = try options.load()
        let reply = try daemonRequest(config, ControlRequest(operation: .reload, selection: .init()))
        print("reloaded")
        for problem in reply.problems ?? [] { print("not applied: \(problem)") }
        if let keys = reply.needsRestart, !keys.isEmpty {
            print("changed, and applied only at a restart (the running values stay): \(keys.joined(separator: ", "))")
        }
    }
}
