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
        fill(now: now)
        tokens -= 1
        if tokens >= -1e-9 { return 0 }
        // A negative balance is a queue of reservations; each waits its turn.
        return Int64((-tokens / refill - 1e-6).rounded(.up))
    }

    /// How many milliseconds until a token is there (0: now); takes nothing. For a gate
    /// that opens only when it may (a lane's connection rate), not a queue.
    public mutating func wait(now: Int64) -> Int64 {
        fill(now: now)
        // A hair of slack, so that float rounding never makes a full token wait a millisecond.
        return tokens >= 1 - 1e-9 ? 0 : Int64(((1 - tokens) / refill - 1e-6).rounded(.up))
    }

    /// Whole tokens there now (none while waits are reserved).
    public mutating func available(now: Int64) -> Int {
        fill(now: now)
        return max(0, Int((tokens + 1e-9).rounded(.down)))
    }

    /// Takes a token that `wait` said is there.
    public mutating func takeAvailable(now: Int64) {
        fill(now: now)
        tokens = max(0, tokens - 1)
    }

    /// The same bucket at another rate (a backoff, a reply rule, a reload): the tokens
    /// saved up so far stay, up to the new burst, so a slower rate never starts with a
    /// fresh burst, and waits already reserved stay reserved.
    public func retuned(rate: Int, perMillis: Int64, burst: Int, now: Int64) -> TokenBucket {
        var copy = self
        copy.fill(now: now)
        var b = TokenBucket(rate: rate, perMillis: perMillis, burst: burst, now: now)
        b.tokens = min(b.capacity, copy.tokens)
        return b
    }

    private mutating func fill(now: Int64) {
        if now > last {
            tokens = min(capacity, tokens + Double(now - last) * refill)
            last = now
        }
    }
}
