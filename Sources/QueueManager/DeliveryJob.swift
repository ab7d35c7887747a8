import Delivery
import Spool
import TernCore

/// Some recipients of one message, all for the same next hop: one SMTP transaction.
struct DeliveryJob: Sendable {
    var id: QueueID
    /// The spool slot that holds it.
    var slot: UInt32
    var envelope: Envelope
    var contentSize: Int
    /// Indexes into `envelope.recipients`.
    var recipients: [Int]
    var route: Route
    /// When the scheduler handed it to the lane (ms since 1970), for `delays=`.
    var dispatchedMillis: Int64
}

/// How long each part of an attempt took, in milliseconds, for `delays=a/b/c/d` (as
/// Postfix: before the queue manager, in it, connection setup, transmission).
struct AttemptTimes: Sendable {
    var queued: Int64 = 0
    var waited: Int64 = 0
    var setup: Int64 = 0
    var transmission: Int64 = 0
}

struct JobOutcome: Sendable {
    var job: DeliveryJob
    var results: [RecipientResult]
    var times: AttemptTimes
}

/// One lane as `tern lanes` shows it.
public struct LaneStatus: Sendable, Codable {
    public var lane: String
    public var queued: Int
    /// Messages with mail due for the lane that wait for room (`max_queued`).
    public var backlog: Int = 0
    /// Jobs (transactions) being delivered now.
    public var inFlight: Int
    public var connections: Int
    /// The concurrency window now.
    public var window: Int
    /// The connection ceiling now: `max_connections`, lowered while backing off or reduced.
    public var maxConnections: Int
    /// The message rate the lane keeps now (lowered while backing off or reduced).
    public var rate: String?
    /// The message rate the config gives the lane (differs from `rate` while slowed).
    public var configuredRate: String?
    public var connectionRate: String?
    /// `active`, `backing off (level N)`, `reduced`, `suspended` or `dead`.
    public var state: String
    /// When a reduction, suspension or rest ends.
    public var untilMillis: Int64?
    /// Set while the destination rests (after failures, or suspended by the operator).
    public var restingUntilMillis: Int64?
    /// The reply or error behind the state.
    public var reason: String?
    /// Recipient domains seen on this lane.
    public var domains: Int
    public var lastReply: String?

    enum CodingKeys: String, CodingKey {
        case lane, queued, backlog, connections, window, domains, rate, state, reason
        case inFlight = "in_flight"
        case maxConnections = "max_connections"
        case connectionRate = "connection_rate"
        case configuredRate = "configured_rate"
        case untilMillis = "until_ms"
        case restingUntilMillis = "resting_until_ms"
        case lastReply = "last_reply"
    }
}
