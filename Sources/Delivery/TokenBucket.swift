/// A rate limit as a token bucket: `rate` tokens per `per`, at most `burst` saved up. Each
/// message takes one token; when none is left the caller waits until the next one.
/// Pure: the caller passes the time (milliseconds) and sleeps for what `take` returns.
public struct TokenBucket: Sendable, Equatable {
    public let capacity: Double
    /// Tokens added per millisecond.
    public let refill: Double
    private var tokens: Double
    private var last: Int64

    public init(rate: Int, perMillis: Int64, burst: Int, now: Int64) {
        precondition(rate > 0 && perMillis > 0 && burst > 0, "bad rate")
        capacity = Double(burst)
        refill = Double(rate) / Double(perMillis)
        tokens = Double(burst)
        last = now
    }

    /// Takes a token if one is there (returns 0); otherwise reserves the next one and
    /// returns how many milliseconds to wait for it.
    public mutating func take(now: Int64) -> Int64 {
        if now > last {
            tokens = min(capacity, tokens + Double(now - last) * refill)
            last = now
        }
        tokens -= 1
        if tokens >= 0 { return 0 }
        // A negative balance is a queue of reservations; each waits its turn.
        return Int64((-tokens / refill).rounded(.up))
    }
}
