#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Delivery
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import SMTPProtocol
import Spool
import TernCore
import Transports

/// What a lane needs from the rest of the relay to carry a job out.
struct LaneEnvironment: Sendable {
    var spool: Spool
    var resolver: MXResolver?
    var heloName: String
    var mxPort: Int
    var connectTimeout: Duration
    var commandTimeout: Duration
    var dataTimeout: Duration
    /// Smarthost credentials by route name.
    var credentials: [String: ClientCredentials]
    var now: @Sendable () -> Int64
    var logger: Logger
    /// How long an idle connection waits for the next message before it is closed.
    var idleTime: Duration = .seconds(2)
    /// This relay's own listener addresses (`ip:port`): a next hop there is a mail loop.
    var ownAddresses: Set<String> = []
    /// Where workers, timers and deferrals run: the scheduler's task group.
    var tasks: ChildTasks
}

/// One destination (a smarthost, or a recipient domain's MX hosts): its jobs, its
/// connections and its concurrency window. Jobs wait here in arrival order; up to
/// `window` workers each hold one connection and take jobs until none is left, so a
/// connection carries up to `messages_per_connection` messages. A slow or dead lane holds
/// only its own jobs: other lanes never wait for it.
actor Lane: AttemptLane {
    let key: LaneKey
    private var machine: LaneStateMachine<DeliveryJob>
    /// Idle workers waiting for a job, by the machine's waiter number.
    private var waiters: [Int: CheckedContinuation<DeliveryJob?, Never>] = [:]
    /// Each waiting worker's idle timer, by waiter number.
    private var idleTimers: [Int: Scheduled<Void>] = [:]
    private var environment: LaneEnvironment
    private let report: @Sendable (JobOutcome) async -> Void
    private let connectionGauge: Gauge
    private let queuedGauge: Gauge
    private let inFlightGauge: Gauge
    /// 1 while the lane is slowed or stopped (backing off, reduced, suspended, dead).
    private let throttledGauge: Gauge
    /// The lane has a message rate (`rate:`), so a message must take a token before it goes.
    /// Read without a trip onto the lane: most lanes have no rate, and a worker asks before
    /// every message.
    private nonisolated let hasMessageRate: NIOLockedValueBox<Bool>

    init(key: LaneKey, limits: LaneLimits, environment: LaneEnvironment, report: @escaping @Sendable (JobOutcome) async -> Void) {
        self.key = key
        self.machine = LaneStateMachine(key: key, limits: limits, idleMillis: Scheduler.millis(environment.idleTime), now: environment.now())
        self.environment = environment
        self.report = report
        self.connectionGauge = Gauge(label: "tern_lane_connections", dimensions: [("lane", key.rawValue)])
        self.queuedGauge = Gauge(label: "tern_lane_queued", dimensions: [("lane", key.rawValue)])
        self.inFlightGauge = Gauge(label: "tern_lane_in_flight", dimensions: [("lane", key.rawValue)])
        self.throttledGauge = Gauge(label: "tern_lane_throttled", dimensions: [("lane", key.rawValue)])
        self.hasMessageRate = NIOLockedValueBox(limits.rate != nil)
    }

    var queued: Int { machine.queued }

    /// The relay of a deferral made because the lane rests (nothing was tried).
    static let resting = "none (lane resting)"

    // MARK: - Carrying out the machine's actions

    private func perform(_ actions: [LaneStateMachine<DeliveryJob>.Action]) {
        for action in actions {
            switch action {
            case .startWorkers(let count, let tokenTaken):
                for _ in 0..<count {
                    // A worker and its connections share one event loop (EventLoopExecutor).
                    let loop = MultiThreadedEventLoopGroup.singleton.next()
                    let worker = LaneWorker(lane: self, environment: environment, limits: machine.window.limits, report: report, loop: loop)
                    environment.tasks.start(on: EventLoopExecutor(loop)) { await worker.run(messageTokenTaken: tokenTaken) }
                }
            case .resume(let waiter, let job):
                idleTimers.removeValue(forKey: waiter)?.cancel()
                waiters.removeValue(forKey: waiter)?.resume(returning: job)
            case .deferJobs(let jobs, let reason, let note):
                let report = self.report
                for job in jobs {
                    let results = job.recipients.map {
                        RecipientResult(
                            index: $0, verdict: DeliveryPolicy.exhausted(reason, note: note), reply: RecipientResult.reply(of: reason),
                            relay: Lane.resting, laneResting: true)
                    }
                    environment.tasks.start { await report(JobOutcome(job: job, results: results, times: AttemptTimes())) }
                }
            case .wake(let millis):
                environment.tasks.start {
                    // Cancelled at shutdown: the timer then goes off at once, and what it
                    // starts is dropped.
                    try? await Task.sleep(for: .milliseconds(max(0, millis)))
                    await self.timerFired()
                }
            case .log(.notice, let text): environment.logger.notice("\(text)")
            case .log(.warning, let text): environment.logger.warning("\(text)")
            }
        }
        recordGauges()
    }

    private func recordGauges() {
        let now = environment.now()
        connectionGauge.record(machine.window.active)
        queuedGauge.record(machine.queued)
        inFlightGauge.record(machine.inFlight)
        throttledGauge.record(machine.window.state(now: now) == .active ? 0 : 1)
    }

    private func timerFired() { perform(machine.timerFired(now: environment.now())) }

    // MARK: - Events

    func submit(_ job: DeliveryJob) { perform(machine.submit(job, now: environment.now())) }

    /// The next job for a worker (`finished`: it is done with the one it had); waits a
    /// little for one before telling it to close (nil).
    func next(finished: Bool) async -> DeliveryJob? {
        let (next, actions) = machine.next(finished: finished, now: environment.now())
        perform(actions)
        switch next {
        case .job(let job): return job
        case .close: return nil
        case .wait(let waiter):
            // The idle timer is an event loop's: a job that comes cancels it (`resume`),
            // so a busy lane keeps no timers, and no task exists until one goes off. A
            // worker waits often: a task per wait that slept out the whole idle time kept
            // thousands of timers at 2,000 msg/s, and waiting for the timer to end (a join)
            // cost a tenth of the throughput with many lanes.
            let tasks = environment.tasks
            idleTimers[waiter] = MultiThreadedEventLoopGroup.singleton.any().scheduleTask(in: TimeAmount(environment.idleTime)) {
                tasks.start { await self.idleExpired(waiter) }
            }
            return await withTaskCancellationHandler {
                await withCheckedContinuation { continuation in waiters[waiter] = continuation }
            } onCancel: {
                // Shutdown: the worker closes now. Its idle timer may never run (work
                // started after the group ended is dropped), so the expiry is sent from
                // here, and the worker, awaited by the group, awaits it.
                Task { await self.idleExpired(waiter) }
            }
        }
    }

    private func idleExpired(_ waiter: Int) { perform(machine.idleExpired(waiter)) }

    func workerDone() { perform(machine.workerDone(now: environment.now())) }
    func connectionSucceeded() { perform(machine.connectionSucceeded(now: environment.now())) }
    /// A connection failed at `stage`: counted, and held against the lane when the failure
    /// is the destination's (no connection, no greeting), as `DeliveryPolicy` says.
    func connectionFailed(_ outcome: AttemptOutcome, stage: DeliveryStage) {
        var tlsFailed = stage == .startTLS
        if case .tls = outcome { tlsFailed = true }
        if tlsFailed {
            Counter(label: "tern_outbound_tls_failures_total", dimensions: [("lane", key.rawValue)]).increment()
            OperationalCounters.shared.add { $0.tlsFailures += 1 }
        }
        if stage == .auth {
            Counter(label: "tern_upstream_auth_failures_total", dimensions: [("lane", key.rawValue)]).increment()
            OperationalCounters.shared.add { $0.upstreamAuthFailures += 1 }
        }
        guard DeliveryPolicy.throttlesLane(stage: stage, outcome: outcome) else { return }
        perform(machine.connectionFailed(outcome, now: environment.now()))
    }

    /// How a job went, for the automatic back-off.
    func record(softFailure: Bool, reason: String) {
        perform(machine.record(softFailure: softFailure, reason: reason, now: environment.now()))
    }

    /// A suspension (by the operator or a reply rule): mail for the lane waits until `until`.
    func suspend(until: Int64, reason: String) { perform(machine.suspend(until: until, reason: reason, now: environment.now())) }

    /// A reply rule's `reduce`: fewer connections and a slower rate until `until`.
    func reduce(factor: Double, until: Int64, reason: String) {
        perform(machine.reduce(factor: factor, until: until, reason: reason, now: environment.now()))
    }

    /// The operator asked for an attempt now (`tern queue flush`, `tern lanes resume`): end
    /// the rest. A flush ends only a rest after failures; a suspension (the operator's, a
    /// reply rule's) ends by `resume` or by its time.
    func revive(by reason: String? = nil, endingSuspension: Bool = true) {
        perform(machine.revive(reason: reason, endingSuspension: endingSuspension, now: environment.now()))
    }

    /// New limits, timeouts and smarthost logins after a reload; connections and queued
    /// mail stay as they are (new connections take the new settings).
    func update(limits: LaneLimits, environment: LaneEnvironment) {
        self.environment = environment
        hasMessageRate.withLockedValue { $0 = limits.rate != nil }
        perform(machine.update(limits: limits, idleMillis: Scheduler.millis(environment.idleTime), now: environment.now()))
    }

    /// Takes back the jobs of the chosen messages that have not started (an operator
    /// deleted or held them, or the relay is stopping); a job under way is not touched.
    func withdraw(_ chosen: @Sendable (QueueID) -> Bool) -> [DeliveryJob] {
        let taken = machine.withdraw { chosen($0.id) }
        if !taken.isEmpty { recordGauges() }
        return taken
    }

    /// Waits, when the lane has a connection rate, until one more connection may open.
    func permitConnection() async {
        let wait = machine.permitConnection(now: environment.now())
        if wait > 0 { try? await Task.sleep(for: .milliseconds(wait)) }
    }

    /// Waits, if the lane has a rate, until the next message may go.
    nonisolated func permit() async {
        guard hasMessageRate.withLockedValue({ $0 }) else { return }
        let wait = await takeMessageToken()
        if wait > 0 { try? await Task.sleep(for: .milliseconds(wait)) }
    }

    private func takeMessageToken() -> Int64 { machine.permitMessage(now: environment.now()) }

    // MARK: - Reading

    /// What `tern lanes` shows of this lane.
    func status() -> LaneStatus {
        let now = environment.now()
        let window = machine.window
        let state: String
        var until: Int64?
        switch window.state(now: now) {
        case .active: state = "active"
        case .backingOff(let level): state = "backing off (level \(level))"
        case .reduced(let u): (state, until) = ("reduced", u)
        case .suspended(let u): (state, until) = ("suspended", u)
        case .dead(let u): (state, until) = ("dead", u)
        }
        return LaneStatus(
            lane: key.rawValue, queued: machine.queued, inFlight: machine.inFlight, connections: window.active, window: window.window,
            maxConnections: window.connectionCeiling(now: now), rate: window.effectiveRate(now: now).map { "\($0)" },
            configuredRate: window.limits.rate.map { "\($0)" },
            connectionRate: window.limits.connectionRate.map { "\($0)" }, state: state, untilMillis: until,
            restingUntilMillis: window.isDead(now: now) ? window.deadUntil : nil, reason: machine.stateReason, domains: 0, lastReply: nil)
    }

    /// Nothing queued, under way, open, slowed or stopped (the scheduler may forget it).
    func isQuiet() -> Bool { machine.isQuiet(now: environment.now()) }

    /// The smarthost login of a route, as the last reload left it.
    func credentials(route: String) -> ClientCredentials? { environment.credentials[route] }

    /// Removes the lane's gauges from the metrics (a forgotten lane). Called by the
    /// scheduler right after it forgets the lane, before a new lane of that key can exist.
    nonisolated func dropMetrics() {
        for gauge in [connectionGauge, queuedGauge, inFlightGauge, throttledGauge] { gauge.destroy() }
    }

    static func time(_ millis: Int64) -> String {
        MailDate.utc(time_t(millis / 1000))
    }
}

/// One connection's worth of work in a lane: take a job, deliver it (reusing the open
/// connection when it goes to the same host), report, repeat.
struct LaneWorker: Sendable {
    let lane: Lane
    let environment: LaneEnvironment
    let limits: LaneLimits
    let report: @Sendable (JobOutcome) async -> Void
    /// The event loop the worker runs on, and opens its connections on.
    let loop: any EventLoop

    func run(messageTokenTaken: Bool = false) async {
        let permits = AttemptPermits(messageTaken: messageTokenTaken)
        let settings = NextHopSettings(
            resolver: environment.resolver, heloName: environment.heloName, mxPort: environment.mxPort,
            connectTimeout: environment.connectTimeout, commandTimeout: environment.commandTimeout, dataTimeout: environment.dataTimeout,
            ownAddresses: environment.ownAddresses, messagesPerConnection: limits.messagesPerConnection,
            sourceAddress: limits.sourceAddress, logger: environment.logger, now: environment.now, eventLoop: loop)
        var held: HeldConnection?
        var finished = false
        while !Task.isCancelled, let job = await lane.next(finished: finished) {
            let start = environment.now()
            let attempt = NextHopAttempt(
                id: job.id.rawValue, route: job.route, envelope: job.envelope, recipients: job.recipients, contentSize: job.contentSize)
            // Getting the message there is the transport's business; the lane only lends it
            // its permits and hears how the connections went.
            let (done, kept) = await NextHopDelivery.deliver(
                attempt, content: SpoolContent(spool: environment.spool, id: job.id, slot: job.slot, size: job.contentSize), held: held, permits: permits,
                lane: lane, settings: settings)
            held = kept
            // Stopping: what this attempt did is not recorded; the message stays queued and
            // goes again after the restart (a duplicate at worst, never a loss).
            if Task.isCancelled { break }
            let times = AttemptTimes(
                queued: job.dispatchedMillis - job.envelope.arrivalMillis, waited: start - job.dispatchedMillis,
                setup: done.setupMillis, transmission: done.transmissionMillis)
            await report(JobOutcome(job: job, results: done.results, times: times))
            finished = true
        }
        if let held { await held.connection.quit() }
        await lane.workerDone()
    }
}


/// A queued message's content, streamed from its spool file.
struct SpoolContent: MessageContent {
    let spool: Spool
    let id: QueueID
    let slot: UInt32
    let size: Int

    func forEachChunk(_ body: ([UInt8]) async throws -> Void) async throws {
        try await spool.readContent(id, slot: slot, size: size, body)
    }
}
