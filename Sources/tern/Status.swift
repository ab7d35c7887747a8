import ArgumentParser
import QueueManager
import SMTPProtocol
import Spool
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `tern status`: is the daemon running on this config's spool, and how is it doing.
struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Whether the daemon runs: PID, uptime, listeners, queue depth, lanes held back.",
        discussion: """
            Exit status as `systemctl is-active`: 0 when the daemon holds this config's spool, \
            3 when none does.
            """
    )

    @OptionGroup var options: ConfigOption

    func run() throws {
        let config = try options.load()
        let queued = (try? Spool.list(root: config.spool).count) ?? 0
        guard let pid = Self.runningDaemon(spool: config.spool) else {
            print("tern: not running (spool \(config.spool), \(queued) message\(queued == 1 ? "" : "s") queued)")
            throw ExitCode(3)
        }
        print("tern: running, pid \(pid)\(Self.uptime(pid).map { ", up \($0)" } ?? "")")
        for listener in config.listeners {
            print("  listener \(listener.name): \(listener.address) (\(listener.kind.rawValue))")
        }
        print("  queue: \(queued) message\(queued == 1 ? "" : "s") (\(config.spool))")
        let lanes = (try? daemonRequest(config, ControlRequest(operation: .lanes, selection: .init())).lanes) ?? nil
        let held = (lanes ?? []).filter { $0.state != "active" }
        if let lanes {
            print("  lanes: \(lanes.count), \(held.count) held back")
            for lane in held { print("    \(lane.lane): \(lane.state)\(lane.reason.map { " (\(LogEscape.escape($0)))" } ?? "")") }
        }
    }

    /// The PID of the daemon that holds the spool's lock, if one does. Probes without
    /// creating anything: no spool, no daemon.
    static func runningDaemon(spool: String) -> Int32? {
        let path = SpoolLock.path(root: spool)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        // A shared lock is refused while the daemon holds its exclusive one.
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return nil
        }
        return SpoolLock.holder(root: spool)
    }

    /// How long the process has run, from /proc (Linux).
    static func uptime(_ pid: Int32) -> String? {
        guard let stat = readText("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")"),
            let boot = readText("/proc/uptime")?.split(separator: " ").first.flatMap({ Double($0) })
        else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // Field 22 of the whole line (starttime) is the 20th after the command name.
        guard fields.count > 19, let ticks = Double(fields[19]) else { return nil }
        let seconds = Int(boot - ticks / Double(sysconf(Int32(_SC_CLK_TCK))))
        let (d, h, m, s) = (seconds / 86400, seconds / 3600 % 24, seconds / 60 % 60, seconds % 60)
        return d > 0 ? "\(d)d \(h)h \(m)m" : h > 0 ? "\(h)h \(m)m" : "\(m)m \(s)s"
    }

    static func readText(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&buffer, 1, buffer.count, f)
            if n <= 0 { break }
            out += buffer[..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}
