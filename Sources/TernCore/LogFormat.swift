import Logging
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
        var line = "\(Self.timestamp()) tern[\(getpid())]: \(event.level): \(LogEscape.escape(event.message.description))"
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if !merged.isEmpty {
            line += " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\(LogEscape.escape($0.value.description))" }.joined(separator: " ")
        }
        line += "\n"
        let bytes = Array(line.utf8)
        bytes.withUnsafeBytes { buffer in
            guard let base = buffer.baseAddress else { return }
            var offset = 0
            while offset < buffer.count {
                let n = write(2, base + offset, buffer.count - offset)
                if n <= 0 { break }
                offset += n
            }
        }
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
