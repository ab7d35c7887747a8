import TernCore

/// A destination lane's concurrency, after Postfix's queue manager (`qmgr_queue.c`,
/// SCHEDULER_README): the lane starts with `initialConnections`, gains one per connection
/// that reaches the server's greeting, up to `maxConnections`, and loses one per connection
/// or greeting failure. When a whole window's worth of attempts fail in a row the
/// destination is dead: it rests for `deadTime`, and mail for it is deferred meanwhile
/// instead of being retried in a tight loop.
///
/// Pure: the lane actor calls these with the time; nothing here sleeps.
public struct LaneWindow: Sendable {
    public private(set) var limits: LaneLimits
    public private(set) var window: Int
    public private(set) var active = 0
    public private(set) var consecutiveFailures = 0
    /// Milliseconds since 1970 until which the destination rests.
    public private(set) var deadUntil: Int64?
    /// A temporary lower ceiling on connections (a reply rule's `reduce`), and until when.
    public private(set) var cap: (max: Int, until: Int64)?
    /// Automatic backoff: each level halves the lane's connections and rate.
    public private(set) var backoffLevel = 0
    private var recent: [Bool] = []
    private var successesSinceChange = 0
    public static let backoffWindow = 20
    public static let maxBackoffLevel = 4

    public init(limits: LaneLimits) {
        self.limits = limits
        self.window = max(1, min(limits.initialConnections, limits.maxConnections))
    }

    public func isDead(now: Int64) -> Bool {
        guard let until = deadUntil else { return false }
        return now < until
    }

    /// Whether one more connection may be opened now.
    public func mayOpen(now: Int64) -> Bool {
        let ceiling = cap.map { now < $0.until ? $0.max : Int.max } ?? Int.max
        let backedOff = backoffLevel > 0 ? max(1, limits.maxConnections >> backoffLevel) : Int.max
        return !isDead(now: now) && active < min(window, ceiling, backedOff)
    }

    /// Lowers the connection ceiling to `factor` of the maximum (at least one) until `until`.
    public mutating func reduce(factor: Double, until: Int64) {
        cap = (max(1, Int(Double(limits.maxConnections) * factor)), until)
    }

    public mutating func opened() { active += 1 }

    public mutating func closed() {
        precondition(active > 0, "closing a connection the lane never opened")
        active -= 1
    }

    /// A server greeted us: the destination is alive; widen the window.
    public mutating func succeeded() {
        consecutiveFailures = 0
        deadUntil = nil
        window = min(limits.maxConnections, window + 1)
    }

    /// Records how an attempt on this lane went (4xx or a failed connection is a soft
    /// failure) and returns the change of backoff level it causes: +1 when the share of soft
    /// failures over the last `backoffWindow` attempts reaches `backoff_threshold`, -1 after
    /// `backoffWindow / 2` successes in a row while backed off (step by step, as Postfix's
    /// concurrency feedback recovers), 0 otherwise.
    public mutating func record(softFailure: Bool) -> Int {
        guard limits.backoffThreshold > 0 else { return 0 }
        recent.append(softFailure)
        if recent.count > Self.backoffWindow { recent.removeFirst(recent.count - Self.backoffWindow) }
        if softFailure {
            successesSinceChange = 0
            let share = Double(recent.filter { $0 }.count) / Double(recent.count)
            if recent.count >= Self.backoffWindow / 2, share >= limits.backoffThreshold, backoffLevel < Self.maxBackoffLevel {
                backoffLevel += 1
                recent.removeAll()
                return 1
            }
            return 0
        }
        successesSinceChange += 1
        if backoffLevel > 0, successesSinceChange >= Self.backoffWindow / 2 {
            backoffLevel -= 1
            successesSinceChange = 0
            return -1
        }
        return 0
    }

    /// New limits from a reload: open connections stay; the window fits the new maximum.
    public mutating func update(limits new: LaneLimits) {
        limits = new
        window = max(1, min(max(window, new.initialConnections), new.maxConnections))
    }

    /// The operator suspends the destination until `until` (ms since 1970).
    public mutating func suspend(until: Int64) {
        deadUntil = until
    }

    /// Ends a rest early (an operator's flush).
    public mutating func revive() {
        deadUntil = nil
        consecutiveFailures = 0
    }

    /// A connection or greeting failed. Returns true when this makes the destination dead.
    @discardableResult
    public mutating func failed(now: Int64) -> Bool {
        consecutiveFailures += 1
        window = max(1, window - 1)
        guard consecutiveFailures >= window else { return false }
        let ms = limits.deadTime.duration.components
        deadUntil = now + ms.seconds * 1000 + ms.attoseconds / 1_000_000_000_000_000
        // One probe after the rest, as Postfix does: the window reopens from one.
        window = 1
        consecutiveFailures = 0
        return true
    }
}
