import Ingress
import Logging
import NIOPosix
import QueueManager
import ServiceLifecycle
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `alerts:` in the config: checks the thresholds every `check_every` and mails what
/// `AlertPolicy` says to the operator, through the daemon's own local socket and queue (so an
/// alert is filtered, signed and delivered like any mail, and survives a restart once queued).
final class AlertMonitor: Service, Sendable {
    let config: AlertsConfig
    let hostname: String
    let sender: String
    let spool: String
    let scheduler: Scheduler
    let threadPool: NIOThreadPool
    let logger: Logger

    init(config: AlertsConfig, tern: TernConfig, scheduler: Scheduler, threadPool: NIOThreadPool, logger: Logger) {
        self.config = config
        self.hostname = tern.hostname
        self.sender = config.from ?? "tern@\(tern.sendmail.origin ?? tern.hostname)"
        self.spool = tern.spool
        self.scheduler = scheduler
        self.threadPool = threadPool
        self.logger = logger
    }

    func run() async throws {
        try? await cancelWhenGracefulShutdown {
            var policy = AlertPolicy(config: self.config)
            while !Task.isCancelled {
                let (queued, oldest) = await self.scheduler.queueSummary()
                let sample = AlertPolicy.Sample(
                    now: Scheduler.wallClockMillis(), queued: queued, oldestAgeSeconds: oldest, totals: OperationalCounters.shared.totals)
                for notice in policy.check(sample) {
                    let message = self.message(notice, queued: queued, oldest: oldest)
                    let outcome = try? await self.threadPool.runIfActive { self.submit(message) }
                    self.logger.warning("alert: \(notice.cleared ? "cleared" : "raised"): \(notice.summary); \(outcome ?? "not sent: shutting down")")
                }
                try await Task.sleep(for: self.config.checkEvery.duration)
            }
        }
    }

    func message(_ notice: AlertPolicy.Notice, queued: Int, oldest: Int64) -> LocalSubmissionMessage {
        let subject = "[tern \(hostname)] \(notice.cleared ? "cleared" : "ALERT"): \(notice.kind.rawValue): \(notice.summary)"
        var body = "From: Tern on \(hostname) <\(sender)>\r\nTo: \(config.to.joined(separator: ", "))\r\nSubject: \(subject)\r\n"
        body += "Auto-Submitted: auto-generated\r\n\r\n"
        body += "\(notice.summary).\r\n\r\n"
        body += "Queue: \(queued) message\(queued == 1 ? "" : "s")\(queued > 0 ? ", the oldest waiting \(oldest / 60) minutes" : "").\r\n"
        if !notice.cleared {
            body += "`tern status`, `tern lanes` and `tern queue list` on \(hostname) say more; `tern report` sums up the log.\r\n"
            body += "While it lasts, this alert is mailed again at most every \(config.repeat).\r\n"
        }
        return LocalSubmissionMessage(sender: sender, recipients: config.to, content: Array(body.utf8))
    }

    /// Hands the alert to the daemon; what happened, for the log line.
    func submit(_ message: LocalSubmissionMessage) -> String {
        do {
            var client = try LocalSMTPClient.connect(path: LocalSubmission.socketPath(spool: spool), timeout: 60)
            defer { client.close() }
            switch try client.submit(message) {
            case .queued(let reply, _): return "mailed to \(config.to.joined(separator: ", ")): \(reply)"
            case .failed(let stage, let reply): return "not mailed: refused at \(stage): \(reply.line)"
            }
        } catch {
            return "not mailed: \(error)"
        }
    }
}
