/// When a deferred recipient is tried again, and when it is given up.
///
/// The delay doubles from `first` up to `maximum`, each spread by ±`jitter` so that mail
/// deferred together does not return together:
///
/// | attempt that failed | 1 | 2 | 3 | 4 | 5 | 6 | 7 and later |
/// |---|---|---|---|---|---|---|---|
/// | next try after (defaults) | 5 min | 10 min | 20 min | 40 min | 80 min | 160 min | 4 h |
///
/// A recipient still deferred `lifetime` after arrival (default 5 days, Postfix's
/// `maximal_queue_lifetime`) is bounced.
public struct RetrySchedule: Sendable, Equatable {
    public var first: Duration
    public var maximum: Duration
    /// Fraction of the delay added or taken away at random, 0 to 1.
    public var jitter: Double
    public var lifetime: Duration

    public init(first: Duration = .seconds(300), maximum: Duration = .seconds(14_400), jitter: Double = 0.2, lifetime: Duration = .seconds(432_000)) {
        precondition(first > .zero && maximum >= first && (0...1).contains(jitter), "bad retry schedule")
        self.first = first
        self.maximum = maximum
        self.jitter = jitter
        self.lifetime = lifetime
    }

    /// The delay before the next attempt, after `attempts` failed ones (1 or more).
    public func delay(afterAttempts attempts: Int, using random: inout some RandomNumberGenerator) -> Duration {
        precondition(attempts >= 1, "no attempt failed yet")
        var base = first
        for _ in 1..<min(attempts, 64) where base < maximum { base = base * 2 }
        base = min(base, maximum)
        guard jitter > 0 else { return base }
        let spread = Double.random(in: -jitter...jitter, using: &random)
        return base * (1 + spread)
    }

    /// Whether a message that arrived at `arrival` has outlived the queue lifetime at `now`.
    public func hasExpired(arrivalMillis: Int64, nowMillis: Int64) -> Bool {
        let lifetimeMillis = lifetime.components.seconds * 1000 + lifetime.components.attoseconds / 1_000_000_000_000_000
        return nowMillis - arrivalMillis >= lifetimeMillis
    }
}
