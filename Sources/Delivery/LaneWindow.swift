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
    /// Whether the rest was asked for (an operator, a reply rule) rather than caused by
    /// failed connections.
    public private(set) var suspended = false
    /// A temporary slowdown (a reply rule's `reduce`): the share of connections and rate
    /// left, and until when.
    public private(set) var cap: (factor: Double, until: Int64)?
    /// New connections per second, minute or hour, when `connection_rate` is set.
    private var connectionBucket: TokenBucket?
    /// Automatic backoff: each level halves the lane's connections and rate.
    public private(set) var backoffLevel = 0
    private var recent: [Bool] = []
    private var successesSinceChange = 0
    public static let backoffWindow = 20
    public static let maxBackoffLevel = 4

    public init(limits: LaneLimits, now: Int64 = 0) {
        self.limits = limits
        self.window = max(1, min(limits.initialConnections, limits.maxConnections))
        self.connectionBucket = limits.connectionRate.map {
            TokenBucket(rate: $0.count, perMillis: $0.perMillis, burst: limits.connectionBurst, now: now)
        }
    }

    /// What the lane is doing, for `tern lanes` and the logs.
    public enum State: Sendable, Equatable {
        case active
        /// Automatic backoff after many soft failures, at this level (each halves).
        case backingOff(level: Int)
        /// Slowed by a reply rule until then.
        case reduced(until: Int64)
        /// Suspended by the operator or a reply rule until then.
        case suspended(until: Int64)
        /// Resting after a window's worth of failed connections, until then.
        case dead(until: Int64)
    }

    public func state(now: Int64) -> State {
        if let until = deadUntil, now < until { return suspended ? .suspended(until: until) : .dead(until: until) }
        if let cap, now < cap.until { return .reduced(until: cap.until) }
        if backoffLevel > 0 { return .backingOff(level: backoffLevel) }
        return .active
    }

    /// Nothing open, nothing slowed or stopped: a lane in this state can be forgotten and
    /// made again from its limits with no change in behaviour.
    public func isQuiet(now: Int64) -> Bool { active == 0 && state(now: now) == .active }

    /// The connections the lane may hold now: its maximum, lowered by a backoff or a
    /// reply rule's reduction.
    public func connectionCeiling(now: Int64) -> Int { lowered(limits.maxConnections, now: now) }

    /// The message rate the lane keeps now: the configured one, lowered the same way.
    public func effectiveRate(now: Int64) -> RateLimit? {
        guard var rate = limits.rate else { return nil }
        rate.count = lowered(rate.count, now: now)
        return rate
    }

    /// A limit halved per backoff level and cut to a reduction's factor, at least 1.
    private func lowered(_ value: Int, now: Int64) -> Int {
        var v = value
        if backoffLevel > 0 { v = max(1, v >> backoffLevel) }
        if let cap, now < cap.until { v = min(v, max(1, Int(Double(value) * cap.factor))) }
        return v
    }

    /// Milliseconds until the connection rate lets one more connection open (0: now).
    public mutating func connectionWait(now: Int64) -> Int64 {
        guard var bucket = connectionBucket else { return 0 }
        defer { connectionBucket = bucket }
        return bucket.wait(now: now)
    }

    /// Takes the connection rate's token for a connection about to open; returns how long
    /// to wait first when none is there (the wait is reserved: connections queue up).
    public mutating func takeConnection(now: Int64) -> Int64 {
        guard var bucket = connectionBucket else { return 0 }
        defer { connectionBucket = bucket }
        return bucket.take(now: now)
    }

    public func isDead(now: Int64) -> Bool {
        guard let until = deadUntil else { return false }
        return now < until
    }

    /// Whether one more connection may be opened now.
    /// Whether one more connection may be opened now (the connection rate aside).
    public func mayOpen(now: Int64) -> Bool {
        !isDead(now: now) && active < min(window, connectionCeiling(now: now))
    }

    /// Lowers the connections and rate to `factor` of their maximum (at least one) until `until`.
    public mutating func reduce(factor: Double, until: Int64) {
        cap = (factor, until)
    }

    public mutating func opened() { active += 1 }

    public mutating func closed() {
        precondition(active > 0, "closing a connection the lane never opened")
        active -= 1
    }

    /// A server greeted us: the destination is alive; widen the window.
    public mutating func succeeded() {
        consecutiveFailures = 0
        if !suspended { deadUntil = nil }
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
    public mutating func update(limits new: LaneLimits, now: Int64) {
        if new.connectionRate != limits.connectionRate || new.connectionBurst != limits.connectionBurst {
            connectionBucket = new.connectionRate.map { rate in
                connectionBucket?.retuned(rate: rate.count, perMillis: rate.perMillis, burst: new.connectionBurst, now: now)
                    ?? TokenBucket(rate: rate.count, perMillis: rate.perMillis, burst: new.connectionBurst, now: now)
            }
        }
        limits = new
        window = max(1, min(max(window, new.initialConnections), new.maxConnections))
    }

    /// The operator or a reply rule suspends the destination until `until` (ms since 1970).
    public mutating func suspend(until: Int64) {
        deadUntil = until
        suspended = true
    }

    /// Ends a rest early (an operator's flush or resume).
    public mutating func revive() {
        deadUntil = nil
        suspended = false
        consecutiveFailures = 0
    }

    /// Forgets a suspension or reduction whose time is over; says which ended.
    public mutating func expire(now: Int64) -> (suspension: Bool, reduction: Bool) {
        var ended = (suspension: false, reduction: false)
        if let until = deadUntil, now >= until, suspended {
            suspended = false
            ended.suspension = true
        }
        if let c = cap, now >= c.until {
            cap = nil
            ended.reduction = true
        }
        return ended
    }

    /// A connection or greeting failed. Returns true when this makes the destination dead.
    @discardableResult
    public mutating func failed(now: Int64) -> Bool {
        if isDead(now: now) { return false }
        consecutiveFailures += 1
        window = max(1, window - 1)
        guard consecutiveFailures >= window else { return false }
        let ms = limits.deadTime.duration.components
        deadUntil = now + ms.seconds * 1000 + ms.attoseconds / 1_000_000_000_000_000
        // One probe after the rest, as Postfix does: the window reopens from one.
        window = 1
        consecutiveFailures = 0
        suspended = false
        return true
    }
}
