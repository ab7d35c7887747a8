#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Delivery
import Logging
import Metrics
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
}

/// One destination (a smarthost, or a recipient domain's MX hosts): its jobs, its
/// connections and its concurrency window. Jobs wait here in arrival order; up to
/// `window` workers each hold one connection and take jobs until none is left, so a
/// connection carries up to `messages_per_connection` messages. A slow or dead lane holds
/// only its own jobs: other lanes never wait for it.
actor Lane {
    let key: String
    private var machine: LaneStateMachine<DeliveryJob>
    /// Idle workers waiting for a job, by the machine's waiter number.
    private var waiters: [Int: CheckedContinuation<DeliveryJob?, Never>] = [:]
    private var environment: LaneEnvironment
    private let report: @Sendable (JobOutcome) async -> Void
    private let connectionGauge: Gauge
    private let queuedGauge: Gauge
    private let inFlightGauge: Gauge
    /// 1 while the lane is slowed or stopped (backing off, reduced, suspended, dead).
    private let throttledGauge: Gauge

    init(key: String, limits: LaneLimits, environment: LaneEnvironment, report: @escaping @Sendable (JobOutcome) async -> Void) {
        self.key = key
        self.machine = LaneStateMachine(key: key, limits: limits, idleMillis: Scheduler.millis(environment.idleTime), now: environment.now())
        self.environment = environment
        self.report = report
        self.connectionGauge = Gauge(label: "tern_lane_connections", dimensions: [("lane", key)])
        self.queuedGauge = Gauge(label: "tern_lane_queued", dimensions: [("lane", key)])
        self.inFlightGauge = Gauge(label: "tern_lane_in_flight", dimensions: [("lane", key)])
        self.throttledGauge = Gauge(label: "tern_lane_throttled", dimensions: [("lane", key)])
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
                    let worker = LaneWorker(lane: self, environment: environment, limits: machine.window.limits, report: report)
                    Task { await worker.run(messageTokenTaken: tokenTaken) }
                }
            case .resume(let waiter, let job):
                waiters.removeValue(forKey: waiter)?.resume(returning: job)
            case .deferJobs(let jobs, let reason, let note):
                let report = self.report
                for job in jobs {
                    let results = job.recipients.map {
                        RecipientResult(
                            index: $0, verdict: DeliveryPolicy.exhausted(reason, note: note), reply: RecipientResult.reply(of: reason),
                            relay: Lane.resting, laneResting: true)
                    }
                    Task { await report(JobOutcome(job: job, results: results, times: AttemptTimes())) }
                }
            case .wake(let millis):
                Task {
                    try? await Task.sleep(for: .milliseconds(max(0, millis)))
                    self.timerFired()
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
            let idleTime = environment.idleTime
            return await withCheckedContinuation { continuation in
                waiters[waiter] = continuation
                Task {
                    try? await Task.sleep(for: idleTime)
                    self.idleExpired(waiter)
                }
            }
        }
    }

    private func idleExpired(_ waiter: Int) { perform(machine.idleExpired(waiter)) }

    func workerDone() { perform(machine.workerDone(now: environment.now())) }
    func connectionSucceeded() { perform(machine.connectionSucceeded(now: environment.now())) }
    func connectionFailed(_ outcome: AttemptOutcome) { perform(machine.connectionFailed(outcome, now: environment.now())) }

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
    func permit() async {
        let wait = machine.permitMessage(now: environment.now())
        if wait > 0 { try? await Task.sleep(for: .milliseconds(wait)) }
    }

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
            lane: key, queued: machine.queued, inFlight: machine.inFlight, connections: window.active, window: window.window,
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

    /// The open connection and what it has carried.
    final class Held: @unchecked Sendable {
        var connection: SMTPClientConnection
        var address: String
        /// What the connection was set up with (route, TLS policy, CA): a job from another
        /// route that shares the lane never rides a connection set up with a weaker policy
        /// or another login.
        var setup: String
        var messages = 0
        init(_ connection: SMTPClientConnection, address: String, setup: String) {
            self.connection = connection
            self.address = address
            self.setup = setup
        }
    }

    /// The tokens the lane took for this worker when it started: the connection rate's for
    /// its first connection, the message rate's for its first message.
    final class Permits: @unchecked Sendable {
        var firstTaken = true
        var messageTaken = false
    }

    func run(messageTokenTaken: Bool = false) async {
        let permits = Permits()
        permits.messageTaken = messageTokenTaken
        var held: Held?
        var finished = false
        while let job = await lane.next(finished: finished) {
            held = await deliver(job, held: held, permits: permits)
            finished = true
        }
        if let held { await held.connection.quit() }
        await lane.workerDone()
    }

    /// Tries the job's hosts in order; recipients that get a soft failure at one host go on
    /// to the next. Returns the connection to keep for the next job, if any.
    private func deliver(_ job: DeliveryJob, held: Held?, permits: Permits) async -> Held? {
        let start = environment.now()
        var times = AttemptTimes(queued: job.dispatchedMillis - job.envelope.arrivalMillis, waited: start - job.dispatchedMillis)
        var held = held
        var results: [RecipientResult] = []
        func finish(_ remaining: [Int], _ verdict: RecipientVerdict, relay: String = "none", reply: SMTPReply? = nil) {
            results += remaining.map { RecipientResult(index: $0, verdict: verdict, reply: reply, relay: relay) }
        }

        let hosts: [MXHost]
        let serverPort: Int
        let tls = job.route.tls
        switch job.route.nextHop {
        case .smarthost(let host, let port):
            serverPort = port
            // A smarthost's name goes through the same DNS server as MX lookups (the
            // configured one), and the log shows the address used: relay=host[IP]:port.
            guard let resolver = environment.resolver, !host.isIPAddress else {
                hosts = [MXHost(name: host, preference: 0, addresses: [host])]
                break
            }
            switch await resolver.addresses(of: host) {
            case .success(let addresses):
                hosts = [MXHost(name: host, preference: 0, addresses: addresses)]
            case .failure(.notFound(let why)), .failure(.temporary(let why)):
                // A smarthost that does not resolve is our configuration's trouble, never
                // the recipient's: defer, do not bounce.
                finish(job.recipients, .deferred(status: EnhancedStatusCode(4, 4, 3), diagnostic: "X-Tern; smarthost \(host): DNS lookup failed: \(why)"))
                await report(JobOutcome(job: job, results: results, times: times))
                return held
            }
        case .mx(let domain):
            serverPort = environment.mxPort
            guard let resolver = environment.resolver else { preconditionFailure("MX route without a resolver") }
            switch await resolver.lookup(domain: domain) {
            case .hosts(let found): hosts = found
            case .nullMX:
                finish(job.recipients, .bounced(status: EnhancedStatusCode(5, 1, 10), diagnostic: "X-Tern; \(domain) accepts no mail (null MX)"))
                await report(JobOutcome(job: job, results: results, times: times))
                return held
            case .notFound(let why):
                finish(job.recipients, .bounced(status: EnhancedStatusCode(5, 1, 2), diagnostic: "X-Tern; Host or domain name not found: \(why)"))
                await report(JobOutcome(job: job, results: results, times: times))
                return held
            case .temporaryFailure(let why):
                finish(job.recipients, .deferred(status: EnhancedStatusCode(4, 4, 3), diagnostic: "X-Tern; DNS lookup failed: \(why)"))
                await report(JobOutcome(job: job, results: results, times: times))
                return held
            }
        }

        var remaining = job.recipients
        var lastOutcome = AttemptOutcome.connection("no host tried")
        hostLoop: for host in hosts {
            for address in host.addresses where !remaining.isEmpty {
                let target = "\(address):\(serverPort)"
                if environment.ownAddresses.contains(target) {
                    // Delivering to our own listener would only accept the mail again.
                    let domain = job.envelope.recipients[remaining[0]].address.split(separator: "@").last.map(String.init) ?? ""
                    let loop = AttemptOutcome.loop("mail for \(domain) loops back to myself (\(host.name)[\(address)]:\(serverPort) is this relay)")
                    finish(remaining, DeliveryPolicy.verdict(stage: .connect, outcome: loop, isLastHost: true))
                    remaining = []
                    break hostLoop
                }
                let setup = "\(job.route.name) \(tls) \(job.route.caFile ?? "")"
                if let h = held, h.address != target || h.setup != setup || !h.connection.isReady || h.messages >= limits.messagesPerConnection {
                    await h.connection.quit()
                    held = nil
                }
                if held == nil {
                    // Every connection after the worker's first waits for the lane's connection rate.
                    if permits.firstTaken { permits.firstTaken = false } else { await lane.permitConnection() }
                    let setupStart = environment.now()
                    // Read now, not when the worker started: a reload may have brought a new password.
                    let credentials = await lane.credentials(route: job.route.name)
                    let configuration = SMTPClientConfiguration(
                        heloName: environment.heloName, tlsPolicy: tls, credentials: credentials,
                        serverName: host.name, caFile: job.route.caFile, connectTimeout: environment.connectTimeout,
                        commandTimeout: environment.commandTimeout, dataTimeout: environment.dataTimeout, isLastHost: false,
                        sourceAddress: limits.sourceAddress, ownHostname: environment.heloName)
                    do {
                        let connection = try await SMTPClientConnection.connect(host: address, port: serverPort, configuration: configuration)
                        held = Held(connection, address: target, setup: setup)
                        await lane.connectionSucceeded()
                    } catch {
                        if case .loop = error.outcome {
                            environment.logger.info("\(job.id): \(host.name)[\(address)]:\(serverPort): \(error.outcome)")
                            finish(remaining, DeliveryPolicy.verdict(stage: error.stage, outcome: error.outcome, isLastHost: true),
                                   relay: "\(host.name)[\(address)]:\(serverPort)")
                            remaining = []
                            break hostLoop
                        }
                        // A server's own answer (a reply, a TLS failure) says more than a later
                        // address that refused the connection: keep it as the reason.
                        if case .connection = error.outcome, Self.informative(lastOutcome) {} else { lastOutcome = error.outcome }
                        if DeliveryPolicy.throttlesLane(stage: error.stage, outcome: error.outcome) {
                            await lane.connectionFailed(error.outcome)
                        }
                        var tlsFailed = error.stage == .startTLS
                        if case .tls = error.outcome { tlsFailed = true }
                        if tlsFailed {
                            Counter(label: "tern_outbound_tls_failures_total", dimensions: [("lane", lane.key)]).increment()
                            OperationalCounters.shared.add { $0.tlsFailures += 1 }
                        }
                        if error.stage == .auth {
                            Counter(label: "tern_upstream_auth_failures_total", dimensions: [("lane", lane.key)]).increment()
                            OperationalCounters.shared.add { $0.upstreamAuthFailures += 1 }
                        }
                        environment.logger.info(
                            "\(job.id): connect to \(host.name)[\(address)]:\(serverPort) failed at \(error.stage.rawValue): \(error.outcome)",
                            metadata: [LogSink.serviceKey: "smtp"])
                        times.setup += environment.now() - setupStart
                        continue
                    }
                    times.setup += environment.now() - setupStart
                }
                guard let h = held else { continue }
                let sendStart = environment.now()
                let message = OutboundMessage(
                    sender: job.envelope.sender, recipients: remaining.map { job.envelope.recipients[$0] }, size: job.contentSize,
                    eightBit: job.envelope.body?.uppercased() == "8BITMIME", needsSMTPUTF8: job.envelope.smtpUTF8,
                    ret: job.envelope.ret, envid: job.envelope.envid)
                if permits.messageTaken { permits.messageTaken = false } else { await lane.permit() }
                let verdicts = await h.connection.send(message, content: SpoolContent(spool: environment.spool, id: job.id, size: job.contentSize))
                let replies = h.connection.lastReplies
                h.messages += 1
                times.transmission += environment.now() - sendStart
                var next: [Int] = []
                for (n, (index, verdict)) in zip(remaining, verdicts).enumerated() {
                    if case .tryNextHost(let outcome) = verdict {
                        next.append(index)
                        lastOutcome = outcome
                    } else {
                        results.append(
                            RecipientResult(
                                index: index, verdict: verdict, reply: n < replies.count ? replies[n] : nil, relay: h.connection.peer,
                                remoteMTA: "dns; \(host.name)", relayedWithoutDSN: !h.connection.extensions.dsn))
                    }
                }
                remaining = next
                if remaining.isEmpty { break hostLoop }
                if !h.connection.isReady {
                    held = nil
                }
            }
        }
        if !remaining.isEmpty {
            finish(
                remaining, DeliveryPolicy.exhausted(lastOutcome, note: nil), relay: held?.connection.peer ?? "none",
                reply: RecipientResult.reply(of: lastOutcome))
        }
        await report(JobOutcome(job: job, results: results, times: times))
        return held
    }
}

extension LaneWorker {
    /// An outcome that came from a server that answered, not from one that could not be reached.
    static func informative(_ outcome: AttemptOutcome) -> Bool {
        switch outcome {
        case .reply, .tls, .protocolError, .loop: return true
        case .connection, .timeout: return false
        }
    }
}

/// A queued message's content, streamed from its spool file.
struct SpoolContent: MessageContent {
    let spool: Spool
    let id: QueueID
    let size: Int

    func forEachChunk(_ body: ([UInt8]) async throws -> Void) async throws {
        try await spool.readContent(id, size: size, body)
    }
}
