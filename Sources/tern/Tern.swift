import ArgumentParser
import Ingress
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Spool
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct Tern: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tern",
        abstract: "Tern, an outbound SMTP relay.",
        subcommands: [Serve.self, Check.self, Queue.self]
    )
}

struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "The configuration file.")
    var config: String = "config/tern.yaml"

    /// Loads and validates the configuration; on error prints it and exits with EX_CONFIG.
    func load() throws -> TernConfig {
        do {
            return try ConfigLoader.load(path: config)
        } catch {
            printError("tern: \(error)")
            throw ExitCode(78)
        }
    }
}

func printError(_ text: String) {
    (text + "\n").withCString { _ = write(2, $0, strlen($0)) }
}

/// Everything `serve` and `check` load besides the YAML: the users file and the TLS context.
struct LoadedResources {
    var users: UserDatabase?
    var tls: NIOSSLContext?

    init(_ config: TernConfig, file: String) throws {
        if let path = config.access.usersFile {
            do {
                users = try UserDatabase.load(path: path)
            } catch {
                printError("tern: \(file): access.users_file: \(error)")
                throw ExitCode(78)
            }
        }
        if let files = config.tls {
            do {
                tls = try TLSSetup.serverContext(files)
            } catch {
                printError("tern: \(file): tls: cannot load \(files.certificate) / \(files.key): \(error)")
                throw ExitCode(78)
            }
        }
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the relay: listen, accept mail from trusted clients, queue it durably.",
        discussion: """
            Stops gracefully on SIGTERM or SIGINT: listeners close first, open transactions \
            finish, idle sessions get 421. Logs go to standard error, one line per event.
            """
    )

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let config = try options.load()
        let resources = try LoadedResources(config, file: options.config)
        let level = Logger.Level(rawValue: config.log.level) ?? .info
        LoggingSystem.bootstrap { TernLogHandler(label: $0, level: level) }
        let logger = Logger(label: "tern")

        // File I/O blocks; it runs here, never on an event loop. Many threads let the
        // kernel merge concurrent fsyncs into one journal commit.
        let threadPool = NIOThreadPool(numberOfThreads: 16)
        threadPool.start()
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
        let server = SMTPServer(
            config: config, spool: spool, users: resources.users, tlsContext: resources.tls,
            group: MultiThreadedEventLoopGroup.singleton, threadPool: threadPool, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: server)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: Logger(label: "tern.lifecycle", factory: { _ in SwiftLogNoOpLogHandler() })
            ))
        logger.info("tern starting, hostname \(config.hostname)")
        try await group.run()
        try await threadPool.shutdownGracefully()
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
    }
}

struct Queue: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect the queue.",
        subcommands: [List.self]
    )

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List queued messages: id, size, arrival, sender, recipients.")

        @OptionGroup var options: ConfigOption
        @Flag(help: "Print JSON, one array of messages.") var json = false

        func run() async throws {
            let config = try options.load()
            let messages: [QueuedMessage]
            do {
                messages = try Spool.list(root: config.spool)
            } catch {
                printError("tern: cannot read the spool: \(error)")
                throw ExitCode(75)
            }
            if json {
                print(try QueueListing.json(messages))
            } else {
                print(QueueListing.table(messages), terminator: "")
            }
        }
    }
}
