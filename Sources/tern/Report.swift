import ArgumentParser
import Foundation
import Spool
import TernCore

/// `tern report`: the daily summary, from Tern's own log.
struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Summarize the log: received, delivered, deferred, bounced, rejected, by domain and lane, top senders, reasons.",
        discussion: """
            Reads Tern's log in any of its forms (log.style tern or postfix, or a syslog file such as \
            /var/log/mail.log). Without LOGFILE it reads log.file when log.output is file, else \
            /var/log/mail.log; `-` reads standard input. The text starts with a Subject line, so that \
            `tern report | tern sendmail admin@example.com` mails it (from cron, as pflogsumm's reports).
            """)

    @OptionGroup var options: ConfigOption
    @Option(help: "How far back from now, e.g. 24h, 7d (default 24h).") var since: String?
    @Option(help: "One day, local time: YYYY-MM-DD (instead of --since).") var date: String?
    @Flag(help: "Print JSON.") var json = false
    @Argument(help: "Log files (default: from the config).") var logFiles: [String] = []

    func run() throws {
        let config = try options.load()
        let (from, to) = try period()
        let files = logFiles.isEmpty ? defaultFiles(config) : logFiles
        guard !files.isEmpty else {
            printError("tern report: log.output is stderr: name the log file (tern report FILE)")
            throw ExitCode(64)
        }
        var lines: [Substring] = []
        for file in files {
            let data: Data?
            if file == "-" {
                data = FileHandle.standardInput.readDataToEndOfFile()
            } else {
                data = FileManager.default.contents(atPath: file)
            }
            guard let data else {
                printError("tern report: cannot read \(file)")
                throw ExitCode(66)
            }
            lines += String(decoding: data, as: UTF8.self).split(separator: "\n")
        }
        var report = LogReport(lines: lines, from: from, to: to)
        if let messages = try? Spool.load(root: config.spool) {
            report.queued = messages.count
            let now = Int64(Date().timeIntervalSince1970)
            report.oldestQueuedSeconds = messages.map(\.envelope.arrivalMillis).min().map { max(0, now - $0 / 1000) }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.text(hostname: config.hostname), terminator: "")
        }
    }

    func period() throws -> (Int64, Int64) {
        let now = Int64(Date().timeIntervalSince1970)
        if let date {
            let parts = date.split(separator: "-").compactMap { Int32($0) }
            guard parts.count == 3, since == nil else {
                printError("tern report: --date takes YYYY-MM-DD, and not with --since")
                throw ExitCode(64)
            }
            var t = tm()
            t.tm_year = parts[0] - 1900
            t.tm_mon = parts[1] - 1
            t.tm_mday = parts[2]
            t.tm_isdst = -1
            let start = Int64(mktime(&t))
            t.tm_mday += 1
            t.tm_hour = 0
            t.tm_isdst = -1
            return (start, Int64(mktime(&t)))
        }
        guard let span = ConfigDuration(parsing: since ?? "24h") else {
            printError("tern report: --since takes a duration such as 24h or 7d")
            throw ExitCode(64)
        }
        return (now - span.duration.components.seconds, now + 1)
    }

    func defaultFiles(_ config: TernConfig) -> [String] {
        switch config.log.output {
        case .file(let path): return [path]
        case .syslog: return ["/var/log/mail.log"]
        case .stderr: return []
        }
    }
}
