import Logging
import NIOConcurrencyHelpers
import SMTPProtocol

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One line per event, as mail operators grep them:
/// `2026-11-22T16:41:16.123Z tern[4242]: info: 0KQ3…: from=<a@b>, size=812, nrcpt=1, client=[127.0.0.1]:5312`
public struct TernLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    private let label: String

    public init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        // One event is one line, whatever the values from the network in it hold: a line
        // feed, a NUL or an escape sequence in a user name, a command or a server's reply is
        // written as `\xNN`, so no value can forge a line, cut one, or colour a terminal.
        var message = LogEscape.escape(event.message.description)
        var merged = metadata.merging(event.metadata ?? [:]) { $1 }
        // The part of Tern that speaks, as Postfix names its daemons (smtpd, pickup, qmgr,
        // smtp, bounce): the program name in `tern/smtpd[pid]`, not a key=value.
        let service = merged.removeValue(forKey: LogSink.serviceKey).map { LogEscape.escape($0.description) }
        if !merged.isEmpty {
            message += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\(LogEscape.escape($0.value.description))" }.joined(separator: " ")
        }
        LogSink.shared.write(level: event.level, service: service, message: message)
    }

    /// `Nov 27 19:50:01`, local time, as syslog(3) writes it.
    static func syslogTimestamp() -> String {
        var now = time(nil)
        var parts = tm()
        localtime_r(&now, &parts)
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func pad(_ n: Int32, _ width: Int, _ fill: Character) -> String {
            let s = String(n)
            return String(repeating: fill, count: max(0, width - s.count)) + s
        }
        return "\(months[Int(parts.tm_mon) % 12]) \(pad(parts.tm_mday, 2, " ")) \(pad(parts.tm_hour, 2, "0")):\(pad(parts.tm_min, 2, "0")):\(pad(parts.tm_sec, 2, "0"))"
    }

    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var parts = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &parts)
        func pad(_ n: Int32, _ width: Int) -> String {
            let s = String(n)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(now.tv_nsec / 1_000_000), 3))Z"
    }
}

/// Where log lines go; shared by every logger of the process. A file is opened (and the
/// syslog socket connected) before a privilege drop and reopened on SIGUSR1 or reload, for
/// logrotate.
public final class LogSink: @unchecked Sendable {
    public enum Output: Equatable, Sendable {
        case stderr
        /// The local syslog socket; lines carry facility mail and the event's severity.
        case syslog(socket: String)
        case file(String)
    }

    /// How a line starts. `tern`: `2026-11-27T19:50:01.123Z tern[pid]: info: …`, UTC to the
    /// millisecond. `postfix`: `Nov 27 19:50:01 relay.example tern/smtpd[pid]: …`, local time,
    /// the host name and the service, `warning:`/`error:` before such lines and nothing
    /// before the others: what `grep "$(date '+%b %e %H')"` and pflogsumm read.
    public enum Style: String, Equatable, Sendable, CaseIterable {
        case tern
        case postfix
    }

    /// The metadata key naming the service a line is from (`smtpd`, `smtp`, `qmgr`, …).
    public static let serviceKey = "service"

    public static let shared = LogSink()

    private let lock = NIOLock()
    private var output = Output.stderr
    private var fd: CInt = 2
    private var style = Style.tern
    private var hostname = "localhost"

    /// Sets the line style; `hostname` is the name `postfix` lines carry.
    public func configure(style: Style, hostname: String) {
        lock.withLock {
            self.style = style
            self.hostname = hostname
        }
    }

    public struct OpenError: Error, CustomStringConvertible {
        public var description: String
    }

    public func open(_ output: Output) throws {
        try lock.withLock {
            let fd = try Self.open(output)
            if self.fd > 2 { close(self.fd) }
            self.fd = fd
            self.output = output
        }
    }

    /// Opens the file again (after logrotate moved it) or reconnects to syslog.
    public func reopen() {
        lock.withLock {
            guard output != .stderr, let fd = try? Self.open(output) else { return }
            if self.fd > 2 { close(self.fd) }
            self.fd = fd
        }
    }

    private static func open(_ output: Output) throws -> CInt {
        switch output {
        case .stderr:
            return 2
        case .file(let path):
            let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
            guard fd >= 0 else { throw OpenError(description: "log.file: cannot open \(path): \(String(cString: strerror(errno)))") }
            return fd
        case .syslog(let socketPath):
            let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw OpenError(description: "log.output: syslog: \(String(cString: strerror(errno)))") }
            guard let address = UnixSocketAddress(path: socketPath) else {
                close(fd)
                throw OpenError(description: "log.syslog_socket: path too long")
            }
            guard address.connect(fd) == 0 else {
                let reason = String(cString: strerror(errno))
                close(fd)
                throw OpenError(description: "log.output: syslog: cannot reach \(socketPath): \(reason)")
            }
            return fd
        }
    }

    func write(level: Logger.Level, service: String?, message: String) {
        lock.withLock {
            let line: String
            let program = service.map { "tern/\($0)" } ?? "tern"
            let prefix: String
            switch level {
            case .warning: prefix = "warning: "
            case .error: prefix = "error: "
            case .critical: prefix = "fatal: "
            default: prefix = ""
            }
            switch (output, style) {
            case (.syslog, _):
                // RFC 3164 as syslog(3) sends it; the daemon adds the host name.
                line = "<\(Self.mailFacility * 8 + Self.severity(level))>\(TernLogHandler.syslogTimestamp()) \(program)[\(getpid())]: \(prefix)\(message)"
            case (_, .postfix):
                line = "\(TernLogHandler.syslogTimestamp()) \(hostname) \(program)[\(getpid())]: \(prefix)\(message)\n"
            case (_, .tern):
                line = "\(TernLogHandler.timestamp()) tern[\(getpid())]: \(level): \(message)\n"
            }
            let bytes = Array(line.utf8)
            bytes.withUnsafeBytes { buffer in
                guard let base = buffer.baseAddress else { return }
                if case .syslog = output {
                    _ = send(fd, base, buffer.count, Int32(MSG_NOSIGNAL))
                    return
                }
                var offset = 0
                while offset < buffer.count {
                    let n = Glibc.write(fd, base + offset, buffer.count - offset)
                    if n <= 0 { break }
                    offset += n
                }
            }
        }
    }

    /// LOG_MAIL: rsyslog's default rules put it in /var/log/mail.log.
    static let mailFacility = 2

    static func severity(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }
}
