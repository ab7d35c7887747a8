import NIOConcurrencyHelpers

/// Running totals the built-in alerts look at, kept whether or not Prometheus is configured.
public final class OperationalCounters: Sendable {
    public static let shared = OperationalCounters()

    public struct Totals: Equatable, Sendable {
        public var sent = 0
        public var bounced = 0
        public var upstreamAuthFailures = 0
        public var tlsFailures = 0
        public init() {}
    }

    private let box = NIOLockedValueBox(Totals())

    public func add(_ change: (inout Totals) -> Void) { box.withLockedValue { change(&$0) } }
    public var totals: Totals { box.withLockedValue { $0 } }
}

/// When the built-in alerts mail the operator: a pure state machine fed one sample per check.
/// An alert fires when its threshold is crossed, repeats at most once per `repeat` while it
/// stays crossed, and sends one "cleared" notice when it no longer is.
public struct AlertPolicy: Sendable {
    public enum Kind: String, Sendable, CaseIterable {
        case queueDepth = "queue depth"
        case oldestMessage = "oldest message"
        case upstreamAuth = "upstream AUTH failures"
        case tls = "TLS failures"
        case bounceRate = "bounce rate"
    }

    public struct Sample: Sendable {
        public var now: Int64  // ms
        public var queued: Int
        public var oldestAgeSeconds: Int64
        public var totals: OperationalCounters.Totals

        public init(now: Int64, queued: Int, oldestAgeSeconds: Int64, totals: OperationalCounters.Totals) {
            self.now = now
            self.queued = queued
            self.oldestAgeSeconds = oldestAgeSeconds
            self.totals = totals
        }
    }

    /// One mail to send.
    public struct Notice: Equatable, Sendable {
        public var kind: Kind
        public var cleared: Bool
        /// What is wrong, with the figure and the threshold: the subject line.
        public var summary: String
    }

    let config: AlertsConfig
    private var history: [(Int64, OperationalCounters.Totals)] = []
    private var lastSent: [Kind: Int64] = [:]
    private var active: Set<Kind> = []

    public init(config: AlertsConfig) { self.config = config }

    public mutating func check(_ sample: Sample) -> [Notice] {
        let windowMillis = Int64(config.window.duration.components.seconds) * 1000
        history.append((sample.now, sample.totals))
        // The oldest sample within the window is the baseline for "within the window".
        while history.count > 1, history[1].0 <= sample.now - windowMillis { history.removeFirst() }
        let base = history.first?.1 ?? sample.totals
        let t = sample.totals
        var crossed: [Kind: String] = [:]
        if let limit = config.queueDepth, sample.queued > limit {
            crossed[.queueDepth] = "\(sample.queued) messages queued (alerts.queue_depth: \(limit))"
        }
        if let limit = config.oldestMessage, sample.oldestAgeSeconds > limit.duration.components.seconds {
            crossed[.oldestMessage] = "the oldest message has waited \(sample.oldestAgeSeconds / 60) minutes (alerts.oldest_message: \(limit))"
        }
        if let limit = config.upstreamAuthFailures, t.upstreamAuthFailures - base.upstreamAuthFailures >= limit {
            crossed[.upstreamAuth] = "\(t.upstreamAuthFailures - base.upstreamAuthFailures) logins refused by next hops within \(config.window) (alerts.upstream_auth_failures: \(limit))"
        }
        if let limit = config.tlsFailures, t.tlsFailures - base.tlsFailures >= limit {
            crossed[.tls] = "\(t.tlsFailures - base.tlsFailures) failed TLS sessions with next hops within \(config.window) (alerts.tls_failures: \(limit))"
        }
        let delivered = (t.sent - base.sent) + (t.bounced - base.bounced)
        if let limit = config.bounceRate, delivered >= config.minDeliveries, delivered > 0 {
            let rate = Double(t.bounced - base.bounced) * 100 / Double(delivered)
            if rate > limit {
                crossed[.bounceRate] = "\(Int(rate.rounded()))% of \(delivered) deliveries bounced within \(config.window) (alerts.bounce_rate: \(limit)%)"
            }
        }
        var notices: [Notice] = []
        let repeatMillis = Int64(config.repeat.duration.components.seconds) * 1000
        for kind in Kind.allCases {
            if let summary = crossed[kind] {
                active.insert(kind)
                if let last = lastSent[kind], sample.now - last < repeatMillis { continue }
                lastSent[kind] = sample.now
                notices.append(Notice(kind: kind, cleared: false, summary: summary))
            } else if active.remove(kind) != nil {
                lastSent[kind] = nil
                notices.append(Notice(kind: kind, cleared: true, summary: "\(kind.rawValue) back under the threshold"))
            }
        }
        return notices
    }
}
