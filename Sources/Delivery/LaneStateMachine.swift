#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import TernCore

/// One destination lane's decisions, as a value: its queued jobs, its idle workers, its
/// concurrency window (`LaneWindow`), its message rate (`TokenBucket`), why it rests, and the
/// reason behind its state. Events go in with the time; actions come out, and the lane actor
/// (`QueueManager/Lane.swift`) only carries them out: start workers, hand a job to an idle
/// worker or let it close, defer jobs, arm a timer, log. Nothing here sleeps or reads a clock,
/// so every path is tested with a manual clock (`LaneStateMachineTests`).
///
/// One writer for the lane's health: the lane learns of connections (`connectionSucceeded`,
/// `connectionFailed`) from its workers, and of each job's outcome (`record`) from the
/// settlement; only this type turns them into back-off, rest and revival.
/// - SeeAlso: async-http-client `HTTPConnectionPool+StateMachine.swift` (events in, actions
///   out; timers are actions), Postfix `qmgr_queue.c` (window, dead destinations)
public struct LaneStateMachine<Job: Sendable>: Sendable {
    public enum LogLevel: Sendable, Equatable { case notice, warning }

    public enum Action: Sendable {
        /// Start this many workers, each of which asks `next(finished: false)` for its first
        /// job. `messageTokenTaken`: their first message's rate token is already taken.
        case startWorkers(Int, messageTokenTaken: Bool)
        /// Answer an idle worker: a job, or nil to close its connection.
        case resume(waiter: Int, job: Job?)
        /// Defer these jobs without trying them: the destination rests.
        case deferJobs([Job], reason: AttemptOutcome, note: String)
        /// Call `timerFired` after this many milliseconds.
        case wake(afterMillis: Int64)
        case log(LogLevel, String)
    }

    /// The answer to a worker asking for its next job.
    public enum Next: Sendable {
        case job(Job)
        /// Close the connection.
        case close
        /// Wait as `waiter`: a `resume` action answers; `idleExpired(waiter)` after the idle time.
        case wait(waiter: Int)
    }

    public let key: LaneKey
    public private(set) var window: LaneWindow
    private var jobs: [Job] = []
    private var head = 0
    private var idle: [Int] = []
    private var nextWaiter = 0
    /// Jobs that workers have taken and not finished.
    public private(set) var inFlight = 0
    /// Workers started that have not asked for their first job yet: each will take one of
    /// the queued jobs, so no more workers start than there are jobs for them.
    public private(set) var starting = 0
    /// Why the destination is resting, for the deferrals while it does.
    private var deadReason: AttemptOutcome?
    /// The reply or error behind the lane's present state, for `tern lanes`.
    public private(set) var stateReason: String?
    /// The lane's message rate, when it has one, at the rate the lane keeps now.
    private var bucket: TokenBucket?
    /// A wake-up is set for when the rate allows more.
    private var wakePending = false
    /// How long a worker's connection may idle waiting for a job.
    public var idleMillis: Int64

    public init(key: LaneKey, limits: LaneLimits, idleMillis: Int64, now: Int64) {
        self.key = key
        self.window = LaneWindow(limits: limits, now: now)
        self.idleMillis = idleMillis
        if let rate = limits.rate {
            self.bucket = TokenBucket(rate: rate.count, perMillis: rate.perMillis, burst: limits.burst, now: now)
        }
    }

    public var queued: Int { jobs.count - head }

    // MARK: - Jobs

    /// A job for the lane.
    public mutating func submit(_ job: Job, now: Int64) -> [Action] {
        // A resting lane hands nothing to its idle connections: pump defers the job.
        if !window.isDead(now: now), !idle.isEmpty, rateWait(now: now) <= idleMillis, let waiter = idle.popLast() {
            inFlight += 1
            return [.resume(waiter: waiter, job: job)]
        }
        jobs.append(job)
        return pump(now: now)
    }

    /// A worker asks for its next job (`finished`: it is done with the one it had).
    public mutating func next(finished: Bool, now: Int64) -> (Next, [Action]) {
        if finished {
            inFlight -= 1
        } else {
            starting -= 1
        }
        if window.isDead(now: now) { return (.close, []) }
        if finished, queued > 0 {
            // The rate makes the next message wait longer than a connection idles: close
            // this one rather than hold it open; the lane opens one when the time comes.
            // (A new worker's first message has its token already: it goes.)
            let wait = rateWait(now: now)
            if wait > idleMillis { return (.close, wakeLater(wait)) }
        }
        if let job = take() { return (.job(job), []) }
        let id = nextWaiter
        nextWaiter += 1
        idle.append(id)
        return (.wait(waiter: id), [])
    }

    /// A waiting worker's idle time is over: it closes, if it is still waiting.
    public mutating func idleExpired(_ waiter: Int) -> [Action] {
        guard let i = idle.firstIndex(of: waiter) else { return [] }
        idle.remove(at: i)
        return [.resume(waiter: waiter, job: nil)]
    }

    /// A worker closed its connection and ended.
    public mutating func workerDone(now: Int64) -> [Action] {
        window.closed()
        return pump(now: now)
    }

    /// Takes back the queued jobs `chosen` picks (deleted, held, or the relay stopping); a
    /// job under way is not touched.
    public mutating func withdraw(_ chosen: (Job) -> Bool) -> [Job] {
        var kept: [Job] = []
        var taken: [Job] = []
        for job in jobs[head...] {
            if chosen(job) { taken.append(job) } else { kept.append(job) }
        }
        guard !taken.isEmpty else { return [] }
        jobs = kept
        head = 0
        return taken
    }

    private mutating func take() -> Job? {
        guard head < jobs.count else { return nil }
        let job = jobs[head]
        head += 1
        inFlight += 1
        if head > 1024, head * 2 > jobs.count {
            jobs.removeFirst(head)
            head = 0
        }
        return job
    }

    /// Starts workers while the window and the connection rate allow, or defers everything
    /// while the lane rests.
    private mutating func pump(now: Int64) -> [Action] {
        if window.isDead(now: now) {
            // A suspension holds the lane's jobs (they go when it ends, and nothing is
            // written meanwhile); a rest after failures defers them.
            if window.suspended || queued == 0 { return [] }
            let waiting = Array(jobs[head...])
            jobs.removeAll()
            head = 0
            return [
                .deferJobs(
                    waiting, reason: deadReason ?? .connection("destination not reachable"),
                    note: "delivery to \(key) suspended after repeated failures")
            ]
        }
        // A message rate also bounds the connections worth opening now: no more than the
        // tokens there, so that no connection sits idle waiting for its turn.
        var allowance = Int.max
        if var b = bucket {
            allowance = b.available(now: now)
            bucket = b
        }
        var started = 0
        var actions: [Action] = []
        while queued > starting, window.mayOpen(now: now) {
            // The connection rate, or the message rate: come back when the next may go.
            let wait = max(window.connectionWait(now: now), allowance > 0 ? 0 : rateWait(now: now))
            if wait > 0 {
                actions += wakeLater(wait)
                break
            }
            _ = window.takeConnection(now: now)
            window.opened()
            allowance -= 1
            // The new connection's first message has its token now, so the next pump does
            // not count it again.
            if var b = bucket {
                b.takeAvailable(now: now)
                bucket = b
            }
            starting += 1
            started += 1
        }
        if started > 0 { actions.insert(.startWorkers(started, messageTokenTaken: bucket != nil), at: 0) }
        return actions
    }

    private mutating func wakeLater(_ wait: Int64) -> [Action] {
        guard !wakePending else { return [] }
        wakePending = true
        return [.wake(afterMillis: wait)]
    }

    /// Milliseconds until the message rate lets the next message go (0: now).
    private mutating func rateWait(now: Int64) -> Int64 {
        guard var b = bucket else { return 0 }
        defer { bucket = b }
        return b.wait(now: now)
    }

    // MARK: - Time

    /// A timer went off: a suspension, reduction or rate wait may be over.
    public mutating func timerFired(now: Int64) -> [Action] {
        wakePending = false
        var actions: [Action] = []
        let ended = window.expire(now: now)
        if ended.suspension { actions.append(.log(.notice, "lane \(key): suspension over, delivering again")) }
        if ended.reduction { actions.append(.log(.notice, "lane \(key): reduction over, back to \(describeLimits(now: now))")) }
        if ended.suspension || ended.reduction {
            stateReason = nil
            retune(now: now)
        }
        return actions + pump(now: now)
    }

    /// Milliseconds to wait, when the lane has a connection rate, before one more connection opens.
    public mutating func permitConnection(now: Int64) -> Int64 { window.takeConnection(now: now) }

    /// Milliseconds to wait, when the lane has a message rate, before the next message goes.
    public mutating func permitMessage(now: Int64) -> Int64 {
        guard var b = bucket else { return 0 }
        defer { bucket = b }
        return b.take(now: now)
    }

    // MARK: - Health

    public mutating func connectionSucceeded(now: Int64) -> [Action] {
        window.succeeded()
        var actions: [Action] = []
        if !window.suspended {
            if deadReason != nil, stateReason != nil {
                actions.append(.log(.notice, "lane \(key): destination reachable again"))
                stateReason = nil
            }
            deadReason = nil
        }
        return actions + pump(now: now)
    }

    public mutating func connectionFailed(_ outcome: AttemptOutcome, now: Int64) -> [Action] {
        guard window.failed(now: now) else { return [] }
        deadReason = outcome
        stateReason = "\(outcome)"
        return [.log(.warning, "lane \(key): destination dead for \(window.limits.deadTime) after repeated failures (\(outcome))")]
    }

    /// How a job went, for the automatic back-off; each change of level is logged with the reason.
    public mutating func record(softFailure: Bool, reason: String, now: Int64) -> [Action] {
        let change = window.record(softFailure: softFailure)
        guard change != 0 else { return [] }
        retune(now: now)
        var actions: [Action] = []
        if change > 0 {
            stateReason = reason
            actions.append(
                .log(.warning, "lane \(key): backing off to level \(window.backoffLevel) (\(describeLimits(now: now))): many soft failures, last: \(reason)"))
        } else {
            if window.backoffLevel == 0 { stateReason = nil }
            actions.append(.log(.notice, "lane \(key): recovering to level \(window.backoffLevel) (\(describeLimits(now: now))) after successes"))
        }
        return actions + pump(now: now)
    }

    // MARK: - The operator and reply rules

    /// Mail for the lane waits, untried, until `until`.
    public mutating func suspend(until: Int64, reason: String, now: Int64) -> [Action] {
        window.suspend(until: until)
        deadReason = .connection(reason)
        stateReason = reason
        return [.log(.notice, "lane \(key): suspended until \(MailDate.utc(time_t(until / 1000))): \(reason)")] + pump(now: now)
            + [.wake(afterMillis: max(0, until - now) + 10)]
    }

    /// Fewer connections and a slower rate until `until`.
    public mutating func reduce(factor: Double, until: Int64, reason: String, now: Int64) -> [Action] {
        window.reduce(factor: factor, until: until)
        stateReason = reason
        retune(now: now)
        return [
            .log(.notice, "lane \(key): reduced to \(describeLimits(now: now)) until \(MailDate.utc(time_t(until / 1000))): \(reason)"),
            .wake(afterMillis: max(0, until - now) + 10),
        ]
    }

    /// An attempt now (`tern queue flush`, `tern lanes resume`): ends a rest. A flush ends
    /// only a rest after failures; a suspension ends by `resume` or by its time.
    public mutating func revive(reason: String?, endingSuspension: Bool, now: Int64) -> [Action] {
        if window.suspended, !endingSuspension { return [] }
        var actions: [Action] = []
        if let reason, window.isDead(now: now) { actions.append(.log(.notice, "lane \(key): \(reason)")) }
        window.revive()
        deadReason = nil
        stateReason = nil
        return actions + pump(now: now)
    }

    /// New limits after a reload; connections and queued mail stay (new connections take them).
    public mutating func update(limits: LaneLimits, idleMillis: Int64, now: Int64) -> [Action] {
        self.idleMillis = idleMillis
        window.update(limits: limits, now: now)
        retune(now: now)
        return pump(now: now)
    }

    /// Sets the message bucket to the rate the lane keeps now, keeping what it has saved up.
    private mutating func retune(now: Int64) {
        guard let rate = window.effectiveRate(now: now) else {
            bucket = nil
            return
        }
        let burst = window.limits.burst
        bucket = bucket?.retuned(rate: rate.count, perMillis: rate.perMillis, burst: burst, now: now)
            ?? TokenBucket(rate: rate.count, perMillis: rate.perMillis, burst: burst, now: now)
    }

    public func describeLimits(now: Int64) -> String {
        let connections = "\(window.connectionCeiling(now: now)) connections"
        return window.effectiveRate(now: now).map { "\(connections), \($0)" } ?? connections
    }

    /// Nothing queued, under way, open, slowed or stopped (the lane may be forgotten).
    public func isQuiet(now: Int64) -> Bool {
        queued == 0 && inFlight == 0 && idle.isEmpty && window.isQuiet(now: now)
    }
}
