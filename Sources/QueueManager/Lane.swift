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
    private var window: LaneWindow
    private var jobs: [DeliveryJob] = []
    private var head = 0
    private var idle: [(Int, CheckedContinuation<DeliveryJob?, Never>)] = []
    private var nextWaiter = 0
    /// Jobs that workers have taken and not finished.
    private var inFlight = 0
    /// Workers started that have not asked for their first job yet: each will take one of
    /// the queued jobs, so pump starts no more workers than there are jobs for them.
    private var starting = 0
    /// Why the destination is resting, for the deferrals while it does.
    private var deadReason: AttemptOutcome?
    /// The reply or error behind the lane's present state, for `tern lanes`.
    private var stateReason: String?
    private var environment: LaneEnvironment
    private let report: @Sendable (JobOutcome) async -> Void
    /// The lane's message rate, when it has one, at the rate the lane keeps now.
    private var bucket: TokenBucket?
    /// Whether a wake-up is already set for when the connection rate allows one more.
    private var pumpPending = false
    private let connectionGauge: Gauge
    private let queuedGauge: Gauge
    private let inFlightGauge: Gauge
    /// 1 while the lane is slowed or stopped (backing off, reduced, suspended, dead).
    private let throttledGauge: Gauge

    init(key: String, limits: LaneLimits, environment: LaneEnvironment, report: @escaping @Sendable (JobOutcome) async -> Void) {
        self.key = key
        let now = environment.now()
        self.window = LaneWindow(limits: limits, now: now)
        self.environment = environment
        self.report = report
        if let rate = limits.rate {
            self.bucket = TokenBucket(rate: rate.count, perMillis: rate.perMillis, burst: limits.burst, now: now)
        }
        self.connectionGauge = Gauge(label: "tern_lane_connections", dimensions: [("lane", key)])
        self.queuedGauge = Gauge(label: "tern_lane_queued", dimensions: [("lane", key)])
        self.inFlightGauge = Gauge(label: "tern_lane_in_flight", dimensions: [("lane", key)])
        self.throttledGauge = Gauge(label: "tern_lane_throttled", dimensions: [("lane", key)])
    }

    var queued: Int { jobs.count - head }

    /// The relay of a deferral made because the lane rests (nothing was tried).
    static let resting = "none (lane resting)"

    func submit(_ job: DeliveryJob) {
        // A resting lane hands nothing to its idle connections: pump defers the job.
        let now = environment.now()
        if !window.isDead(now: now), !idle.isEmpty, rateWait(now: now) <= idleMillis, let (_, waiter) = idle.popLast() {
            inFlight += 1
            waiter.resume(returning: job)
            return
        }
        jobs.append(job)
        pump()
    }

    /// Starts workers while the window and the connection rate allow, or defers everything
    /// while the lane rests.
    private func pump() {
        let now = environment.now()
        defer { recordGauges(now: now) }
        if window.isDead(now: now) {
            // A suspension holds the lane's jobs (they go when it ends, and nothing is
            // written meanwhile); a rest after failures defers them.
            if window.suspended { return }
            let waiting = Array(jobs[head...])
            jobs.removeAll()
            head = 0
            let reason = deadReason ?? .connection("destination not reachable")
            let note = "delivery to \(key) suspended after repeated failures"
            for job in waiting {
                let results = job.recipients.map {
                    RecipientResult(index: $0, verdict: DeliveryPolicy.exhausted(reason, note: note), relay: Lane.resting, remoteMTA: nil)
                }
                Task { await report(JobOutcome(job: job, results: results, times: AttemptTimes())) }
            }
            return
        }
        // A message rate also bounds the connections worth opening now: no more than the
        // tokens there, so that no connection sits idle waiting for its turn.
        var allowance = Int.max
        if var b = bucket {
            allowance = b.available(now: now)
            bucket = b
        }
        while queued > starting, window.mayOpen(now: now) {
            // The connection rate, or the message rate: come back when the next may go.
            let wait = max(window.connectionWait(now: now), allowance > 0 ? 0 : rateWait(now: now))
            if wait > 0 {
                pumpLater(wait)
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
            let worker = LaneWorker(lane: self, environment: environment, limits: window.limits, report: report)
            Task { await worker.run(messageTokenTaken: bucket != nil) }
        }
    }

    private func pumpLater(_ wait: Int64) {
        guard !pumpPending else { return }
        pumpPending = true
        Task {
            try? await Task.sleep(for: .milliseconds(wait))
            self.wake()
        }
    }

    /// Milliseconds until the message rate lets the next message go (0: now).
    private func rateWait(now: Int64) -> Int64 {
        guard var b = bucket else { return 0 }
        defer { bucket = b }
        return b.wait(now: now)
    }

    private var idleMillis: Int64 { Scheduler.millis(environment.idleTime) }

    private func recordGauges(now: Int64) {
        connectionGauge.record(window.active)
        queuedGauge.record(queued)
        inFlightGauge.record(inFlight)
        throttledGauge.record(window.state(now: now) == .active ? 0 : 1)
    }

    /// A timer went off: a suspension, reduction or connection-rate wait may be over.
    private func wake() {
        pumpPending = false
        let now = environment.now()
        let ended = window.expire(now: now)
        if ended.suspension { environment.logger.notice("lane \(key): suspension over, delivering again") }
        if ended.reduction { environment.logger.notice("lane \(key): reduction over, back to \(describeLimits(now: now))") }
        if ended.suspension || ended.reduction {
            stateReason = nil
            retune(now: now)
        }
        pump()
    }

    /// The next job for a worker (`finished`: it is done with the one it had); waits a
    /// little for one before telling it to close. A resting lane gives none: its waiting
    /// jobs are deferred when the worker is done.
    func next(finished: Bool) async -> DeliveryJob? {
        if finished {
            inFlight -= 1
            if inFlight == 0 { recordGauges(now: environment.now()) }
        } else {
            starting -= 1  // a worker's first call
        }
        let now = environment.now()
        if window.isDead(now: now) { return nil }
        if queued > 0 {
            // The rate makes the next message wait longer than a connection idles: close
            // this one rather than hold it open; the lane opens one when the time comes.
            let wait = rateWait(now: now)
            if wait > idleMillis {
                pumpLater(wait)
                return nil
            }
        }
        if let job = take() {
            recordGauges(now: now)
            return job
        }
        let id = nextWaiter
        nextWaiter += 1
        let idleTime = environment.idleTime
        return await withCheckedContinuation { continuation in
            idle.append((id, continuation))
            Task {
                try? await Task.sleep(for: idleTime)
                self.expire(id)
            }
        }
    }

    private func take() -> DeliveryJob? {
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

    private func expire(_ id: Int) {
        guard let i = idle.firstIndex(where: { $0.0 == id }) else { return }
        idle.remove(at: i).1.resume(returning: nil)
    }

    func workerDone() {
        window.closed()
        pump()
    }

    func connectionSucceeded() {
        window.succeeded()
        if !window.suspended {
            if deadReason != nil, stateReason != nil {
                environment.logger.notice("lane \(key): destination reachable again")
                stateReason = nil
            }
            deadReason = nil
        }
        pump()
    }

    func connectionFailed(_ outcome: AttemptOutcome) {
        if window.failed(now: environment.now()) {
            deadReason = outcome
            stateReason = "\(outcome)"
            environment.logger.warning("lane \(key): destination dead for \(window.limits.deadTime) after repeated failures (\(outcome))")
        }
    }

    /// Waits, when the lane has a connection rate, until one more connection may open.
    func permitConnection() async {
        let wait = window.takeConnection(now: environment.now())
        if wait > 0 { try? await Task.sleep(for: .milliseconds(wait)) }
    }

    /// What `tern lanes` shows of this lane.
    func status() -> LaneStatus {
        let now = environment.now()
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
            lane: key, queued: queued, inFlight: inFlight, connections: window.active, window: window.window,
            maxConnections: window.connectionCeiling(now: now), rate: window.effectiveRate(now: now).map { "\($0)" },
            configuredRate: window.limits.rate.map { "\($0)" },
            connectionRate: window.limits.connectionRate.map { "\($0)" }, state: state, untilMillis: until,
            restingUntilMillis: window.isDead(now: now) ? window.deadUntil : nil, reason: stateReason, domains: 0, lastReply: nil)
    }

    /// Nothing queued, under way, open, slowed or stopped (the scheduler may forget it).
    func isQuiet() -> Bool {
        queued == 0 && inFlight == 0 && idle.isEmpty && window.isQuiet(now: environment.now())
    }

    /// The smarthost login of a route, as the last reload left it.
    func credentials(route: String) -> ClientCredentials? { environment.credentials[route] }

    /// Removes the lane's gauges from the metrics (a forgotten lane). Called by the
    /// scheduler right after it forgets the lane, before a new lane of that key can exist.
    nonisolated func dropMetrics() {
        for gauge in [connectionGauge, queuedGauge, inFlightGauge, throttledGauge] { gauge.destroy() }
    }

    /// A suspension (by the operator or a reply rule): mail for the lane waits, deferred,
    /// until `until`.
    func suspend(until: Int64, reason: String) {
        window.suspend(until: until)
        deadReason = .connection(reason)
        stateReason = reason
        environment.logger.notice("lane \(key): suspended until \(Self.time(until)): \(reason)")
        pump()
        wake(at: until)
    }

    /// How a job went, for the automatic backoff; logs each change of level with the reason.
    func record(softFailure: Bool, reason: String) {
        let change = window.record(softFailure: softFailure)
        guard change != 0 else { return }
        let now = environment.now()
        retune(now: now)
        if change > 0 {
            stateReason = reason
            environment.logger.warning(
                "lane \(key): backing off to level \(window.backoffLevel) (\(describeLimits(now: now))): many soft failures, last: \(reason)")
        } else {
            if window.backoffLevel == 0 { stateReason = nil }
            environment.logger.notice("lane \(key): recovering to level \(window.backoffLevel) (\(describeLimits(now: now))) after successes")
        }
        pump()
    }

    /// New limits, timeouts and smarthost logins after a reload; connections and queued
    /// mail stay as they are (new connections take the new settings).
    func update(limits: LaneLimits, environment: LaneEnvironment) {
        self.environment = environment
        let now = environment.now()
        window.update(limits: limits, now: now)
        retune(now: now)
        pump()
    }

    /// A reply rule's `reduce`: fewer connections and a slower rate until `until`.
    func reduce(factor: Double, until: Int64, reason: String) {
        let now = environment.now()
        window.reduce(factor: factor, until: until)
        stateReason = reason
        retune(now: now)
        environment.logger.notice("lane \(key): reduced to \(describeLimits(now: now)) until \(Self.time(until)): \(reason)")
        recordGauges(now: now)
        wake(at: until)
    }

    /// Sets the message bucket to the rate the lane keeps now, keeping what it has saved up.
    private func retune(now: Int64) {
        guard let rate = window.effectiveRate(now: now) else {
            bucket = nil
            return
        }
        let burst = window.limits.burst
        bucket = bucket?.retuned(rate: rate.count, perMillis: rate.perMillis, burst: burst, now: now)
            ?? TokenBucket(rate: rate.count, perMillis: rate.perMillis, burst: burst, now: now)
    }

    private func describeLimits(now: Int64) -> String {
        let connections = "\(window.connectionCeiling(now: now)) connections"
        return window.effectiveRate(now: now).map { "\(connections), \($0)" } ?? connections
    }

    private func wake(at until: Int64) {
        let wait = until - environment.now()
        Task {
            try? await Task.sleep(for: .milliseconds(max(0, wait) + 10))
            self.wake()
        }
    }

    static func time(_ millis: Int64) -> String {
        MailDate.utc(time_t(millis / 1000))
    }

    /// Waits, if the lane has a rate, until the next message may go.
    func permit() async {
        guard var b = bucket else { return }
        let wait = b.take(now: environment.now())
        bucket = b
        if wait > 0 { try? await Task.sleep(for: .milliseconds(wait)) }
    }

    /// The operator asked for an attempt now (`tern queue flush`, `tern lanes resume`):
    /// end the rest.
    /// A flush ends only a rest after failures; a suspension (the operator's, a reply
    /// rule's) ends by `resume` or by its time.
    func revive(by reason: String? = nil, endingSuspension: Bool = true) {
        if window.suspended, !endingSuspension { return }
        if let reason, window.isDead(now: environment.now()) {
            environment.logger.notice("lane \(key): \(reason)")
        }
        window.revive()
        deadReason = nil
        stateReason = nil
        pump()
    }

    /// Takes back the jobs of the chosen messages that have not started (an operator
    /// deleted or held them, or the relay is stopping); a job under way is not touched.
    func withdraw(_ chosen: @Sendable (QueueID) -> Bool) -> [DeliveryJob] {
        var kept: [DeliveryJob] = []
        var taken: [DeliveryJob] = []
        for job in jobs[head...] {
            if chosen(job.id) { taken.append(job) } else { kept.append(job) }
        }
        guard !taken.isEmpty else { return [] }
        jobs = kept
        head = 0
        recordGauges(now: environment.now())
        return taken
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
        func finish(_ remaining: [Int], _ verdict: RecipientVerdict, relay: String = "none") {
            results += remaining.map { RecipientResult(index: $0, verdict: verdict, relay: relay, remoteMTA: nil) }
        }

        let hosts: [MXHost]
        let serverPort: Int
        let tls = TLSPolicy(rawValue: job.route.tls.rawValue) ?? .may
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
                h.messages += 1
                times.transmission += environment.now() - sendStart
                var next: [Int] = []
                for (index, verdict) in zip(remaining, verdicts) {
                    if case .tryNextHost(let outcome) = verdict {
                        next.append(index)
                        lastOutcome = outcome
                    } else {
                        results.append(
                            RecipientResult(
                                index: index, verdict: verdict, relay: h.connection.peer, remoteMTA: "dns; \(host.name)",
                                relayedWithoutDSN: !h.connection.extensions.dsn))
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
            finish(remaining, DeliveryPolicy.exhausted(lastOutcome, note: nil), relay: held?.connection.peer ?? "none")
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
