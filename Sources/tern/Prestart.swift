import ArgumentParser
import Dispatch
import Ingress
import Spool
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The root part of `tern serve`, on the main thread before the async runtime starts.
///
/// With `user:` set and started as root, Tern reads its keys, users file, smarthost
/// passwords and filter keys, binds its listeners (port 25 needs root), gives the spool to
/// the user, and drops to it: here, because Swift's async main parks the main thread inside
/// `pthread_exit` (libdispatch's `dispatch_main`), where glibc's `setuid` no longer reaches
/// it. A drop made later would leave that thread root, and a process with one root thread
/// can become root again. Made here, before any other thread exists, it covers them all.
/// `Serve` then takes what was prepared instead of doing it again.
enum Prestart {
    struct State: @unchecked Sendable {
        var configPath: String
        var config: TernConfig
        var resources: LoadedResources
        var filters: FilterChain
        var sockets: [String: [CInt]]
        var localSocket: CInt
        var privileges: PrivilegeDrop
    }

    nonisolated(unsafe) static var state: State?

    /// Does the root part when the command line is `serve` and the config asks for a user.
    static func run(_ arguments: [String]) {
        guard arguments.count >= 2, arguments[1] == "serve", geteuid() == 0 else { return }
        if arguments.contains(where: { $0 == "-h" || $0 == "--help" }) { return }
        var path = ConfigOption.defaultPath()
        var i = 2
        while i < arguments.count {
            if arguments[i] == "--config", i + 1 < arguments.count {
                path = arguments[i + 1]
                i += 1
            } else if arguments[i].hasPrefix("--config=") {
                path = String(arguments[i].dropFirst("--config=".count))
            }
            i += 1
        }
        guard let config = try? ConfigLoader.load(path: path, plugins: filterPlugins), config.user != nil else {
            return  // no user, or a bad config: `Serve` reports it as usual
        }
        do {
            guard let privileges = try PrivilegeDrop.plan(user: config.user, group: config.group) else { return }
            let resources = try LoadedResources(config, file: path)
            let filters: FilterChain
            do {
                filters = try filterPlugins.chain(config.filters)
            } catch {
                printError("tern: \(path): filters: \(error)")
                exit(78)
            }
            var sockets: [String: [CInt]] = [:]
            for listener in config.listeners {
                do {
                    sockets[listener.name] = try SMTPServer.listeningSockets(listener)
                } catch {
                    printError("tern: \(error)")
                    exit(71)
                }
            }
            do {
                try LogSink.shared.open(config.log.output)
                LogSink.shared.configure(style: config.log.style, hostname: config.hostname)  // a log file root may own
            } catch {
                printError("tern: \(path): \(error)")
                exit(73)
            }
            let localSocket: CInt
            do {
                try SpoolLock.createRoot(config.spool)
                try privileges.own(config.spool)
                localSocket = try LocalSubmissionSetup.open(config, owner: (privileges.uid, privileges.gid))
                try privileges.drop()
            } catch {
                printError("tern: \(error)")
                exit(71)
            }
            state = State(
                configPath: path, config: config, resources: resources, filters: filters, sockets: sockets, localSocket: localSocket,
                privileges: privileges)
        } catch let code as ExitCode {
            exit(code.rawValue)
        } catch {
            printError("tern: \(path): \(error)")
            exit(78)
        }
    }
}

@main
enum Main {
    static func main() {
        let arguments = CommandLine.arguments
        let name = arguments.first.map { String($0.split(separator: "/").last ?? "") } ?? "tern"
        Prestart.run(arguments)
        Task {
            // Called as sendmail, mailq or newaliases (symlinks), or as `tern sendmail`: the
            // sendmail command line, whose syntax the argument parser does not speak.
            if ["sendmail", "mailq", "newaliases"].contains(name) {
                exit(await SendmailCommand.run(Array(arguments.dropFirst()), as: name))
            }
            if arguments.count >= 2, arguments[1] == "sendmail" {
                exit(await SendmailCommand.run(Array(arguments.dropFirst(2)), as: "sendmail"))
            }
            await Tern.main()
            exit(0)
        }
        dispatchMain()
    }
}
