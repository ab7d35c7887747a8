#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Delivery
import Logging
import Metrics
import NIOPosix
import SMTPProtocol
import Spool
import TernCore
import Transports

/// The queue manager: knows every queued message and the state of each recipient, hands
/// due recipients to lanes grouped by next hop (one transaction carries all of a message's
/// recipients for one next hop), records each outcome in the spool, and queues bounces.
///
/// A recipient's outcome is made durable before the message is retired: delivered and
/// bounced recipients are marked in the spool file, deferred ones get their next attempt in
/// `meta/`, a bounce is committed to the spool before its recipients are marked, and the
/// file is removed only when every recipient is final. A crash between any two of these
/// steps repeats a step (a duplicate), never skips one.
public actor Scheduler {
    struct Entry {
        /// The spool slot that holds it.
        var slot: UInt32
        var envelope: Envelope
        var contentSize: Int
        var states: [RecipientState]
        var meta: DeliveryMeta
        var inFlight: Set<Int> = []
        /// Completions of this message still writing to the spool.
        var busy = 0

        var allFinal: Bool { states.allSatisfy(\.isFinal) }
    }

    private var entries: [QueueID: Entry] = [:]
    /// Messages waiting for a retry, by due time.
    private var retryQueue = RetryQueue<QueueID>()
    /// The messages loaded at start wait for the first tick.
    private var dispatchLoaded = false
    /// Every lane the scheduler knows, one record each, by lane key.
    private var lanes: [LaneKey: LaneRecord] = [:]
    /// Lane suspensions in force (the operator's and reply rules'), kept in
    /// `<spool>/suspensions.json` so that a restart does not end them.
    private var suspensions: [LaneKey: LaneSuspension] = [:]
    /// Messages whose `meta/` file is being written, and those to write once more after.
    private var metaWriting: Set<QueueID> = []
    private var metaAgain: Set<QueueID> = []
    /// Transactions in the lanes (`active_limit`, each lane's `max_queued`) and the due
    /// recipients waiting for room, served in turn (Delivery/ActiveQueue).
    private var activeQueue: ActiveQueue<QueueID>
    private var nextSweep: Int64 = 0
    /// Recipient domain → the provider its MX hosts belong to (nil: none), until when (ms).
    private var providerOf: [String: (String?, Int64)] = [:]
    private let resolver: MXResolver?
    private let spool: Spool
    private var router: Router
    private var retry: RetrySchedule
    /// What a job's settlement needs of the config: reply rules, retries, delay warnings.
    private var settlementRules: Settlement.Rules {
        Settlement.Rules(replyRules: config.delivery.replyRules, retry: retry, delayWarning: config.delivery.delayWarning?.duration)
    }
    private var config: TernConfig
    private var environment: LaneEnvironment
    /// Every task the queue manager starts runs in `run()`'s group.
    private let tasks = ChildTasks()
    /// Messages the sessions have just queued, taken in by one task of `run()`'s group: a
    /// session hands one over without starting a task of its own, and under load one wakeup
    /// takes in many.
    private let arrivals = AsyncStream.makeStream(of: Arrival.self)

    struct Arrival: Sendable {
        var id: QueueID
        var slot: UInt32
        var envelope: Envelope
        var size: Int
        var held: Bool
    }
    private let logger: Logger
    private var random = SystemRandomNumberGenerator()
    private let tick: Duration
    private var stopping = false

    private let attempts = (
        sent: Counter(label: "tern_delivery_attempts_total", dimensions: [("status", "sent")]),
        deferred: Counter(label: "tern_delivery_attempts_total", dimensions: [("status", "deferred")]),
        bounced: Counter(label: "tern_delivery_attempts_total", dimensions: [("status", "bounced")])
    )
    private let depth = Gauge(label: "tern_queue_messages")
    /// Seconds since the oldest queued message arrived; 0 with an empty queue.
    private let oldestAge = Gauge(label: "tern_queue_oldest_message_age_seconds")
    private var nextAgeUpdate: Int64 = 0

    /// `tern_deliveries_total{lane, status}`: one per recipient per attempt.
    static func countDelivery(lane: LaneKey, status: String) {
        Counter(label: "tern_deliveries_total", dimensions: [("lane", lane.rawValue), ("status", status)]).increment()
        if status == "sent" { OperationalCounters.shared.add { $0.sent += 1 } }
        if status == "bounced" { OperationalCounters.shared.add { $0.bounced += 1 } }
    }

    /// Messages queued and the oldest one's age in seconds, for the built-in alerts.
    public func queueSummary() -> (count: Int, oldestAgeSeconds: Int64) {
        let now = environment.now()
        let oldest = entries.values.map(\.envelope.arrivalMillis).min()
        return (entries.count, oldest.map { max(0, now - $0) / 1000 } ?? 0)
    }
    private let active = Gauge(label: "tern_queue_active_transactions")

    public init(
        config: TernConfig, spool: Spool, resolver: MXResolver?, credentials: [String: ClientCredentials], logger: Logger,
        tick: Duration = .seconds(1), now: @escaping @Sendable () -> Int64 = Scheduler.wallClockMillis
    ) {
        self.config = config
        self.spool = spool
        self.router = Router(routes: config.routes, delivery: config.delivery)
        let d = config.delivery
        self.retry = Self.retrySchedule(d)
        self.environment = LaneEnvironment(
            spool: spool, resolver: resolver, heloName: config.hostname, mxPort: d.mxPort, connectTimeout: d.connectTimeout.duration,
            commandTimeout: d.commandTimeout.duration, dataTimeout: d.dataTimeout.duration, credentials: credentials, now: now,
            logger: logger, ownAddresses: Self.ownAddresses(config.listeners), tasks: tasks)
        self.logger = logger
        self.tick = tick
        self.resolver = resolver
        self.activeQueue = ActiveQueue(limit: config.delivery.activeLimit)
    }

    @Sendable public static func wallClockMillis() -> Int64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Int64(now.tv_sec) * 1000 + Int64(now.tv_nsec) / 1_000_000
    }

    // MARK: - Intake

    /// Loads what the spool holds (after a restart: deferred mail keeps its schedule).
    public func load() async throws {
        let loaded = try await spool.load { m in
            (m.id, Entry(slot: m.slotNumber, envelope: m.envelope, contentSize: m.contentSize, states: m.states, meta: m.meta))
        }
        loadSuspensions()
        entries.reserveCapacity(loaded.count)
        for (id, entry) in loaded { entries[id] = entry }
        // Each is dispatched by the first tick, oldest first; those with recipients not due
        // yet go into the retry queue then. Not scheduled here: 100,000 messages due at once
        // would only pass through the retry queue, and leave its memory behind.
        dispatchLoaded = !entries.isEmpty
        depth.record(entries.count)
    }

    /// A message the ingress just committed: try it now.
    /// `queued`, for a session: returns at once; the message is taken in by `run()`.
    public nonisolated func post(_ id: QueueID, slot: UInt32, envelope: Envelope, size: Int, held: Bool) {
        arrivals.continuation.yield(Arrival(id: id, slot: slot, envelope: envelope, size: size, held: held))
    }

    public func queued(_ id: QueueID, slot: UInt32, envelope: Envelope, size: Int, held: Bool = false) async {
        var meta = DeliveryMeta()
        meta.held = held
        entries[id] = Entry(
            slot: slot, envelope: envelope, contentSize: size, states: Array(repeating: .pending, count: envelope.recipients.count), meta: meta)
        depth.record(entries.count)
        await dispatch(id)
    }

    /// Runs the queue manager: the retry timer, and every task the lanes start (workers,
    /// timers), in one task group. Returns when the task is cancelled, once all of them have
    /// ended.
    public nonisolated func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.tasks.run() }
            group.addTask { await self.tick() }
            // The intake runs on an event loop, as the sessions that post and the workers it
            // wakes do: on Swift's cooperative pool, every message woke a pool thread first
            // (0.7 context switches per message at 20 sessions, `bench/cpu.sh`).
            group.addTask(executorPreference: EventLoopExecutor(MultiThreadedEventLoopGroup.singleton.next())) {
                for await a in self.arrivals.stream {
                    await self.queued(a.id, slot: a.slot, envelope: a.envelope, size: a.size, held: a.held)
                }
            }
        }
    }

    /// Wakes every `tick` and dispatches mail whose retry time has come, until cancelled.
    private func tick() async {
        while !Task.isCancelled {
            if dispatchLoaded {
                dispatchLoaded = false
                for id in entries.keys.sorted() { await dispatch(id) }
            }
            let now = environment.now()
            for id in retryQueue.popDue(now: now) { await dispatch(id) }
            if now >= nextAgeUpdate {
                oldestAge.record(entries.values.map(\.envelope.arrivalMillis).min().map { max(0, now - $0) / 1000 } ?? 0)
                nextAgeUpdate = now + 5000
            }
            if now >= nextSweep {
                await sweep(now: now)
                nextSweep = now + min(60_000, Self.millis(config.delivery.laneIdleTime.duration) / 2)
            }
            try? await Task.sleep(for: tick)
        }
    }

    // MARK: - Dispatch

    /// Hands a message's due recipients to their lanes, one transaction per next hop (or
    /// several, by `max_recipients`). A lane with `max_queued` transactions, or any lane while
    /// the active queue holds `active_limit`, takes nothing: the recipients wait in that
    /// lane's backlog, behind the mail that was there first.
    private func dispatch(_ id: QueueID) async {
        guard !config.delivery.paused, !stopping, let before = entries[id], !before.meta.held else { return }
        if !config.providers.isEmpty {
            // Which provider each MX domain belongs to decides its lane; look up what is not
            // known yet before the recipients are taken (the message may change meanwhile).
            let now = environment.now()
            var domains = Set<String>()
            for (i, state) in before.states.enumerated() where state == .pending {
                let route = router.route(recipient: before.envelope.recipients[i].address, sender: before.envelope.sender)
                if case .mx(let domain) = route.nextHop, (providerOf[domain]?.1 ?? 0) <= now { domains.insert(domain) }
            }
            await learnProviders(domains)
        }
        guard !config.delivery.paused, !stopping, var entry = entries[id], !entry.meta.held else { return }
        let now = environment.now()
        var groups: [LaneKey: (Route, [Int])] = [:]
        var order: [LaneKey] = []
        var later: Int64?
        for (i, state) in entry.states.enumerated() where state == .pending && !entry.inFlight.contains(i) {
            if let next = entry.meta.recipients[i]?.nextAttemptMillis, next > now {
                later = min(later ?? next, next)
                continue
            }
            let route = route(entry.envelope, i)
            let key = route.laneKey
            lanes[key, default: LaneRecord()].domains.insert(Router.domain(of: entry.envelope.recipients[i].address))
            if groups[key] == nil {
                groups[key] = (route, [])
                order.append(key)
            }
            groups[key]!.1.append(i)
        }
        if let later { retryQueue.schedule(id, at: later) }
        // Take what the lanes have room for; the rest waits for its lane. All counted before
        // the first await, so no other dispatch sees room that is taken.
        var taken: [(Route, [[Int]])] = []
        for key in order {
            let (route, indexes) = groups[key]!
            switch activeQueue.offer(id, recipients: indexes, lane: key, maxQueued: route.limits.maxQueued) {
            case .now: taken.append((route, take(&entry, key, route, indexes, now: now)))
            case .waiting(let refill): if refill { tasks.start { await self.refill(nil) } }
            }
        }
        entries[id] = entry
        for (route, parts) in taken { await submit(id, entry, route, parts, now: now) }
    }

    /// Counts a message's recipients for a lane as handed over; returns its transactions (a
    /// lane's max_recipients splits a large message into several).
    private func take(_ entry: inout Entry, _ key: LaneKey, _ route: Route, _ indexes: [Int], now: Int64) -> [[Int]] {
        let parts = stride(from: 0, to: indexes.count, by: route.limits.maxRecipients).map {
            Array(indexes[$0..<min(indexes.count, $0 + route.limits.maxRecipients)])
        }
        for i in indexes { entry.inFlight.insert(i) }
        activeQueue.handedOver(lane: key, transactions: parts.count)
        active.record(activeQueue.active)
        lanes[key, default: LaneRecord()].activity = now
        return parts
    }

    private func submit(_ id: QueueID, _ entry: Entry, _ route: Route, _ parts: [[Int]], now: Int64) async {
        let lane = lane(for: route)
        for part in parts {
            await lane.submit(
                DeliveryJob(id: id, slot: entry.slot, envelope: entry.envelope, contentSize: entry.contentSize, recipients: part, route: route, dispatchedMillis: now))
        }
    }

    /// Room came free (a transaction of lane `key` is done): that lane takes the next
    /// recipients waiting for it, then the lanes the active queue held back, in turn.
    private func refill(_ key: LaneKey?) async {
        if let key { await refillLane(key) }
        while !config.delivery.paused, !stopping, let next = activeQueue.nextStarved() {
            await refillLane(next)
        }
    }

    private func refillLane(_ key: LaneKey) async {
        let limit = lanes[key]?.route?.limits.maxQueued ?? config.delivery.lane.maxQueued
        while !config.delivery.paused, !stopping, let (id, indexes) = activeQueue.next(of: key, maxQueued: limit) {
            // What waited is handed over as it was grouped, unless it changed meanwhile
            // (delivered by a flush, deleted, held); one routing for the group, not one per
            // recipient. A group whose lane changed meanwhile (a provider's MX answer
            // expired) is dispatched afresh.
            guard var entry = entries[id], !entry.meta.held else { continue }
            let now = environment.now()
            let due = indexes.filter {
                entry.states[$0] == .pending && !entry.inFlight.contains($0) && (entry.meta.recipients[$0]?.nextAttemptMillis ?? 0) <= now
            }
            guard let first = due.first else { continue }
            let route = route(entry.envelope, first)
            guard route.laneKey == key else {
                await dispatch(id)
                continue
            }
            let parts = take(&entry, key, route, due, now: now)
            entries[id] = entry
            await submit(id, entry, route, parts, now: now)
        }
    }

    /// The route of one recipient, with its provider's lane when its MX hosts belong to one.
    private func route(_ envelope: Envelope, _ i: Int) -> Route {
        var route = router.route(recipient: envelope.recipients[i].address, sender: envelope.sender)
        if case .mx(let domain) = route.nextHop, let name = providerOf[domain]?.0,
            let provider = config.providers.first(where: { $0.name == name })
        {
            route.limits = router.limits(provider: provider, route: route)
            route.provider = name
        }
        return route
    }

    /// Finds the provider of each domain from its MX host names, the lookups side by side
    /// (a message to ten new domains waits for one DNS round trip, not ten); each answer is
    /// kept for its TTL (at least a minute, at most a day).
    private func learnProviders(_ domains: Set<String>) async {
        guard let resolver, !domains.isEmpty else { return }
        let answers = await withTaskGroup(of: (String, (names: [String], ttl: Int)?).self) { group in
            for domain in domains { group.addTask { (domain, await resolver.mxNames(domain: domain)) } }
            var out: [(String, (names: [String], ttl: Int)?)] = []
            for await answer in group { out.append(answer) }
            return out
        }
        let now = environment.now()
        for (domain, found) in answers {
            let name = found.flatMap { names, _ in config.providers.first { p in names.contains { p.matches($0) } }?.name }
            let ttl = Int64(min(max(found?.ttl ?? 300, 60), 86_400))
            providerOf[domain] = (name, now + ttl * 1000)
        }
    }

    /// Forgets lanes that have been quiet for `lane_idle_time`, and provider answers past
    /// their TTL, so a relay that has sent to a million domains keeps only the live ones.
    private func sweep(now: Int64) async {
        providerOf = providerOf.filter { $0.value.1 > now }
        let idle = Self.millis(config.delivery.laneIdleTime.duration)
        let candidates = lanes.filter { key, record in activeQueue.isIdle(key) && record.quiet(now: now, idle: idle) }
        for (key, record) in candidates {
            let seen = record.activity
            if let lane = record.lane {
                guard await lane.isQuiet() else { continue }
            }
            // Nothing reached the lane while it was asked (no await from here on).
            guard let current = lanes[key], current.lane === record.lane, current.activity == seen, activeQueue.isIdle(key)
            else { continue }
            lanes[key] = nil
            record.lane?.dropMetrics()
        }
        if !candidates.isEmpty { logger.debug("lanes: \(lanes.count) kept after forgetting idle ones") }
    }

    private func lane(for route: Route) -> Lane {
        let key = route.laneKey
        if let lane = lanes[key]?.lane { return lane }
        let lane = Lane(key: key, limits: route.limits, environment: environment) { [weak self] outcome in
            await self?.completed(outcome)
        }
        lanes[key, default: LaneRecord()].lane = lane
        lanes[key, default: LaneRecord()].route = route
        // Being made is news: the sweep leaves a new lane alone for `lane_idle_time`, time
        // for a suspension from before a restart to reach it.
        lanes[key, default: LaneRecord()].activity = environment.now()
        if let s = suspensions[key], s.untilMillis > environment.now() {
            // A suspension from before a restart holds for the lane made again.
            tasks.start { await lane.suspend(until: s.untilMillis, reason: s.reason) }
        }
        return lane
    }

    private func loadSuspensions() {
        do {
            let now = environment.now()
            let stored = try spool.loadSuspensions().filter { $0.value.untilMillis > now }
            suspensions = Dictionary(uniqueKeysWithValues: stored.map { (LaneKey($0.key), $0.value) })
        } catch {
            logger.error("\(spool.suspensionsPath): unreadable, lane suspensions from before the restart are lost: \(error)")
            return
        }
        for (key, s) in suspensions.sorted(by: { $0.key < $1.key }) {
            logger.notice("lane \(key): suspended until \(Lane.time(s.untilMillis)) from before the restart: \(s.reason)")
            // Its lane is made now, so that `tern lanes` shows it before its next mail.
            _ = makeLane(named: key)
        }
    }

    /// The lane of a provider (`provider:NAME`), a smarthost (`host:port`, `user@host:port`)
    /// or a recipient domain delivered direct to its MX hosts, made before any mail for it;
    /// nil for a name that is none of these.
    private func makeLane(named key: LaneKey) -> Lane? {
        if let lane = lanes[key]?.lane { return lane }
        if key.rawValue.hasPrefix("provider:") {
            guard let provider = config.providers.first(where: { LaneKey.provider($0.name) == key }) else { return nil }
            return lane(for: router.route(provider: provider))
        }
        if let route = router.smarthostRoutes().first(where: { $0.laneKey == key }) { return lane(for: route) }
        guard key.isDomain else { return nil }
        let route = router.route(recipient: "postmaster@\(key)", sender: "")
        return route.laneKey == key ? lane(for: route) : nil
    }

    /// Records a lane's suspension (nil: ended) in the spool's `suspensions.json`.
    private func recordSuspension(_ key: LaneKey, _ value: LaneSuspension?) {
        let now = environment.now()
        suspensions[key] = value
        suspensions = suspensions.filter { $0.value.untilMillis > now }
        do {
            try spool.saveSuspensions(Dictionary(uniqueKeysWithValues: suspensions.map { ($0.key.rawValue, $0.value) }))
        } catch {
            logger.error("\(spool.suspensionsPath): cannot record the suspension of \(key): \(error)")
        }
    }

    // MARK: - Outcomes

    func completed(_ outcome: JobOutcome) async {
        let id = outcome.job.id
        let laneKey = outcome.job.route.laneKey
        let mayRefill = activeQueue.finished(lane: laneKey)
        active.record(activeQueue.active)
        lanes[laneKey, default: LaneRecord()].activity = environment.now()
        defer {
            if mayRefill { tasks.start { await self.refill(laneKey) } }
        }
        guard var entry = entries[id] else { return }
        let now = environment.now()
        for result in outcome.results { entry.inFlight.remove(result.index) }
        // The decision, whole (Delivery/Settlement); what follows carries it out.
        let settlement = Settlement(
            envelope: entry.envelope, states: entry.states, meta: entry.meta, results: outcome.results, lane: laneKey, now: now,
            rules: settlementRules, random: &random)
        entry.states = settlement.states
        entry.meta = settlement.meta
        entry.busy += 1
        entries[id] = entry
        if let reply = settlement.lastReply { lanes[laneKey]?.lastReply = reply }
        for applied in settlement.applied {
            let recipient = entry.envelope.recipients[applied.result.index]
            log(id, recipient: recipient.address, result: applied.result, verdict: applied.verdict, times: outcome.times,
                arrival: entry.envelope.arrivalMillis, now: now, lane: laneKey)
            switch applied.verdict {
            case .delivered:
                attempts.sent.increment()
                Self.countDelivery(lane: laneKey, status: "sent")
            case .bounced:
                attempts.bounced.increment()
                Self.countDelivery(lane: laneKey, status: "bounced")
            case .deferred:
                attempts.deferred.increment()
                Self.countDelivery(lane: laneKey, status: "deferred")
            case .tryNextHost: break
            }
        }
        // The lane learns how the job went (its one writer of health is its state machine).
        if let lane = lanes[laneKey]?.lane {
            if let feedback = settlement.laneFeedback {
                await lane.record(softFailure: feedback.softFailure, reason: feedback.reason)
            }
            for action in settlement.laneActions {
                switch action.kind {
                case .suspend:
                    recordSuspension(action.lane, LaneSuspension(untilMillis: action.untilMillis, reason: action.reason))
                    await lane.suspend(until: action.untilMillis, reason: action.reason)
                case .reduce(let factor):
                    await lane.reduce(factor: factor, until: action.untilMillis, reason: action.reason)
                }
            }
        }

        // The bounce is in the spool before its recipients are marked bounced.
        if !settlement.bounces.isEmpty { await notify(id, entry: entry, recipients: settlement.bounces) }
        if !settlement.delayWarnings.isEmpty { await notify(id, entry: entry, recipients: settlement.delayWarnings) }
        if !settlement.successes.isEmpty { await notify(id, entry: entry, recipients: settlement.successes) }

        // Record this job's outcome while still counted as busy, so that a job of the same
        // message that finishes meanwhile does not remove the file under us.
        guard let current = entries[id] else { return }
        let lastOne = current.allFinal && current.busy == 1 && current.inFlight.isEmpty
        if !lastOne {
            do {
                if !settlement.marks.isEmpty { try await spool.mark(id, slot: current.slot, settlement.marks) }
            } catch {
                logger.error("\(id): cannot record delivery state: \(error)")
            }
            if settlement.deferred || !settlement.delayWarnings.isEmpty { await saveMeta(id) }
        }
        guard var after = entries[id] else { return }
        after.busy -= 1
        entries[id] = after
        if after.allFinal, after.busy == 0, after.inFlight.isEmpty {
            entries[id] = nil
            retryQueue.remove(id)
            depth.record(entries.count)
            spool.remove(id, slot: after.slot, hasMeta: after.meta != DeliveryMeta())
            return
        }
        if settlement.deferred, let next = after.meta.recipients.values.map(\.nextAttemptMillis).min() {
            retryQueue.schedule(id, at: next)
        }
    }

    /// Writes a message's `meta/` file with its newest state. Writes of one message never
    /// overlap (two lanes deferring it at once would share the temporary file): a write
    /// asked for while one runs makes the running one write once more, with the state of
    /// then. The caller stays counted as busy meanwhile, so the file is not retired under it.
    private func saveMeta(_ id: QueueID) async {
        guard metaWriting.insert(id).inserted else {
            metaAgain.insert(id)
            return
        }
        defer { metaWriting.remove(id) }
        repeat {
            metaAgain.remove(id)
            guard let meta = entries[id]?.meta else { return }
            do { try await spool.writeMeta(id, meta) } catch { logger.error("\(id): cannot record delivery state: \(error)") }
        } while metaAgain.contains(id)
    }

    /// The first reply rule that matches a deferral's or bounce's server reply.
    /// Queues a DSN from `<>` to the sender. Mail from `<>` gets none (no bounce loops); it
    /// goes to `delivery.postmaster` when that is set.
    private func notify(_ id: QueueID, entry: Entry, recipients: [DeliveryStatusNotification.Recipient]) async {
        var to = entry.envelope.sender
        if to.isEmpty {
            guard let postmaster = config.delivery.postmaster, recipients.contains(where: { $0.action == .failed }) else {
                logger.info("\(id): undeliverable mail from <>: no notification")
                return
            }
            to = postmaster
        }
        let returnLimit = 50_000
        do {
            let original = try await spool.readContent(id, slot: entry.slot, size: entry.contentSize, limit: returnLimit + 1)
            let now = environment.now()
            let dsn = DeliveryStatusNotification(
                reportingMTA: config.hostname, queueID: id.rawValue, envelopeSender: entry.envelope.sender, envid: entry.envelope.envid,
                arrivalDate: MailDate.rfc5322(time_t(entry.envelope.arrivalMillis / 1000)), date: MailDate.rfc5322(time_t(now / 1000)),
                recipients: recipients, returnHeadersOnly: entry.envelope.ret == .headers, returnLimit: returnLimit)
            let boundary = "\(id.rawValue).\(UInt32.random(in: 0...UInt32.max, using: &random))/\(config.hostname)"
            let bytes = dsn.render(original: original, boundary: boundary, messageID: "\(id.rawValue).dsn.\(now)@\(config.hostname)")
            let writer = spool.begin()
            try await writer.append(bytes)
            let envelope = Envelope(
                sender: "", recipients: [EnvelopeRecipient(address: to)], body: "8BITMIME", smtpUTF8: !to.utf8.allSatisfy { $0 < 0x80 },
                client: ClientInfo(address: "127.0.0.1", port: 0, helo: config.hostname, protocol: "local"), listener: "bounce",
                arrivalMillis: now)
            try await writer.commit(envelope)
            let kind =
                recipients.contains(where: { $0.action == .failed })
                ? "non-delivery" : recipients.contains(where: { $0.action == .delayed }) ? "delay" : "success"
            logger.info("\(id): sender \(kind) notification: \(writer.id)", metadata: [LogSink.serviceKey: "bounce"])
            logger.info("\(writer.id): from=<>, size=\(writer.size), nrcpt=1 (queue active)", metadata: [LogSink.serviceKey: "qmgr"])
            await queued(writer.id, slot: writer.slot, envelope: envelope, size: writer.size)
        } catch {
            // The recipients stay as they are in the spool; a restart tries again.
            logger.error("\(id): cannot queue the notification: \(error)")
        }
    }

    /// The delivery line, as Postfix's smtp writes it, and the lane after the reply (where
    /// pflogsumm's patterns and `grep status=` ignore it; `tern report` reads it).
    private func log(
        _ id: QueueID, recipient: String, result: RecipientResult, verdict: RecipientVerdict, times: AttemptTimes, arrival: Int64, now: Int64,
        lane: LaneKey
    ) {
        let (status, dsn, text): (String, String, String)
        switch verdict {
        case .delivered(let reply): (status, dsn, text) = ("sent", (reply.enhanced ?? EnhancedStatusCode(2, 0, 0)).description, reply.description)
        case .bounced(let s, let d): (status, dsn, text) = ("bounced", s.description, d)
        case .deferred(let s, let d): (status, dsn, text) = ("deferred", s.description, d)
        case .tryNextHost: return
        }
        func seconds(_ ms: Int64) -> String {
            let s = Double(max(0, ms)) / 1000
            return s < 0.01 ? "0" : String(format2(s))
        }
        let line =
            "\(id): to=<\(recipient)>, relay=\(result.relay), delay=\(seconds(now - arrival)), "
            + "delays=\(seconds(times.queued))/\(seconds(times.waited))/\(seconds(times.setup))/\(seconds(times.transmission)), "
            + "dsn=\(dsn), status=\(status) (\(text)) lane=\(lane)"
        logger.info("\(line)", metadata: [LogSink.serviceKey: "smtp"])
    }

    static func millis(_ d: Duration) -> Int64 {
        d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    }

    // MARK: - Queue control

    /// Which messages an operator command applies to.
    public struct Selection: Sendable, Codable {
        public var ids: [String]?
        public var domain: String?
        public var sender: String?
        public var deferredOnly: Bool
        public var all: Bool

        /// `a@b.example` matches that sender; `@b.example` every sender in that domain.
        static func senderMatches(_ selector: String, _ sender: String) -> Bool {
            let s = selector.lowercased()
            let actual = sender.lowercased()
            if s.hasPrefix("@") { return actual.hasSuffix(s) && actual.count > s.count }
            return s == actual
        }

        public init(ids: [String]? = nil, domain: String? = nil, sender: String? = nil, deferredOnly: Bool = false, all: Bool = false) {
            self.ids = ids
            self.domain = domain
            self.sender = sender
            self.deferredOnly = deferredOnly
            self.all = all
        }

        /// The recipients of a message it selects; empty when it selects none.
        public func recipients(_ id: QueueID, _ envelope: Envelope, _ states: [RecipientState], _ meta: DeliveryMeta) -> [Int] {
            let pending = states.indices.filter { states[$0] == .pending }
            if let ids, !ids.contains(id.rawValue) { return [] }
            if let sender, !Self.senderMatches(sender, envelope.sender) { return [] }
            if deferredOnly { return pending.filter { meta.recipients[$0] != nil } }
            if let domain {
                return pending.filter { Router.domain(of: envelope.recipients[$0].address) == domain.lowercased() }
            }
            return pending
        }
    }

    /// Attempts the selected recipients now, and wakes resting lanes they go to.
    public func flush(_ selection: Selection) async -> Int {
        var count = 0
        for id in Array(entries.keys) {
            guard var e = entries[id], !e.meta.held else { continue }
            let chosen = selection.recipients(id, e.envelope, e.states, e.meta)
            guard !chosen.isEmpty else { continue }
            for i in chosen { e.meta.recipients[i]?.nextAttemptMillis = 0 }
            entries[id] = e
            count += 1
        }
        for lane in lanes.values.compactMap(\.lane) { await lane.revive(by: "revived by tern queue flush", endingSuspension: false) }
        for (id, _) in entries { await dispatch(id) }
        return count
    }

    /// Deletes the selected recipients (whole messages unless `domain` narrows it), with no
    /// notification to the sender, as `postsuper -d` does.
    /// Takes back from the lanes the jobs of the chosen messages that have not started:
    /// their recipients are no longer in flight. Lanes given room are refilled.
    private func withdraw(_ chosen: @escaping @Sendable (QueueID) -> Bool) async {
        var freed: [LaneKey] = []
        for (key, record) in lanes where activeQueue.outstanding(key) > 0 {
            guard let lane = record.lane else { continue }
            let jobs = await lane.withdraw(chosen)
            guard !jobs.isEmpty else { continue }
            for job in jobs {
                entries[job.id]?.inFlight.subtract(job.recipients)
                activeQueue.finished(lane: key)
            }
            freed.append(key)
        }
        active.record(activeQueue.active)
        if !stopping { for key in freed { await refill(key) } }
    }

    public func delete(_ selection: Selection) async -> Int {
        // Jobs of these messages that wait in a lane are taken back first, so that no
        // deleted recipient is sent after the operator was told it is gone.
        let chosen = Set(entries.filter { !selection.recipients($0.key, $0.value.envelope, $0.value.states, $0.value.meta).isEmpty }.keys)
        await withdraw { chosen.contains($0) }
        var count = 0
        // Each message is read afresh: a delivery may have finished during the last await.
        for id in Array(entries.keys) {
            guard var e = entries[id] else { continue }
            let chosen = selection.recipients(id, e.envelope, e.states, e.meta)
            guard !chosen.isEmpty else { continue }
            var changes: [Int: RecipientState] = [:]
            for i in chosen {
                e.states[i] = .deleted
                changes[i] = .deleted
            }
            entries[id] = e
            count += 1
            logger.info("\(id): deleted by the operator (\(chosen.count) recipient\(chosen.count == 1 ? "" : "s"))")
            if e.allFinal, e.inFlight.isEmpty, e.busy == 0 {
                entries[id] = nil
                retryQueue.remove(id)
                do { try await spool.removeNow(id, slot: e.slot) } catch { logger.error("\(id): cannot remove: \(error)") }
            } else {
                try? await spool.mark(id, slot: e.slot, changes)
            }
        }
        depth.record(entries.count)
        // The rest of a message whose job was taken back goes again.
        for id in chosen where entries[id] != nil { await dispatch(id) }
        return count
    }

    /// Holds (or releases) the selected messages: held mail stays queued, untouched.
    public func hold(_ selection: Selection, _ held: Bool) async -> Int {
        var changed: [QueueID] = []
        for (id, entry) in entries where entry.meta.held != held {
            // No await in this loop: the snapshot is current.
            guard !selection.recipients(id, entry.envelope, entry.states, entry.meta).isEmpty else { continue }
            entries[id]!.meta.held = held
            if !held {
                // Released mail is attempted at once, not at its old retry time.
                for i in entries[id]!.meta.recipients.keys { entries[id]!.meta.recipients[i]!.nextAttemptMillis = 0 }
            }
            changed.append(id)
        }
        if held {
            let ids = Set(changed)
            await withdraw { ids.contains($0) }
        }
        for id in changed {
            guard entries[id] != nil else { continue }
            await saveMeta(id)
            logger.info("\(id): \(held ? "held" : "released") by the operator")
            if !held { await dispatch(id) }
        }
        return changed.count
    }

    /// On shutdown: dispatch nothing more and give deliveries under way up to `timeout` to
    /// finish and be recorded, so a restart does not send them again.
    public func drain(timeout: Duration) async {
        stopping = true
        // Jobs that wait in lanes (a suspended lane holds its own) have not started: they
        // go after the restart.
        await withdraw { _ in true }
        let deadline = ContinuousClock.now + timeout
        while entries.values.contains(where: { !$0.inFlight.isEmpty || $0.busy > 0 }), ContinuousClock.now < deadline, !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(50))
        }
        let left = entries.values.filter { !$0.inFlight.isEmpty }.count
        if left > 0 { logger.notice("stopping with \(left) deliveries under way; they are tried again after the restart") }
    }

    /// The `ip:port` of each listener with a fixed port; a wildcard listener is reached on
    /// loopback too. A next hop at one of these is this relay.
    static func ownAddresses(_ listeners: [ListenerConfig]) -> Set<String> {
        var out: Set<String> = []
        for l in listeners where l.address.port != 0 {
            out.insert("\(l.address.host):\(l.address.port)")
            if ["0.0.0.0", "::", "*", ""].contains(l.address.host) {
                out.insert("127.0.0.1:\(l.address.port)")
                out.insert("::1:\(l.address.port)")
            }
        }
        return out
    }

    static func retrySchedule(_ d: DeliveryConfig) -> RetrySchedule {
        RetrySchedule(first: d.retryFirst.duration, maximum: d.retryMaximum.duration, jitter: d.retryJitter, lifetime: d.queueLifetime.duration)
    }

    /// Takes a new config's delivery side (SIGHUP, `tern reload`): routes and smarthost
    /// passwords, providers, lane limits, reply rules, the retry schedule and queue
    /// lifetime, timeouts, MX port and TLS policy. Queued mail, deliveries under way and open
    /// connections are kept; each lane gets the limits its route and provider now give it,
    /// and new connections the new timeouts and logins. The DNS resolver, listeners,
    /// access rules, filters and spool take a restart.
    public func reload(_ new: TernConfig, credentials: [String: ClientCredentials]) async {
        if new.delivery.resolver != config.delivery.resolver {
            logger.warning("delivery.resolver changed: that takes a restart; the running resolver stays")
        }
        let resolverSetting = config.delivery.resolver
        config.routes = new.routes
        config.providers = new.providers
        config.delivery = new.delivery
        config.delivery.resolver = resolverSetting
        let d = config.delivery
        retry = Self.retrySchedule(d)
        environment.credentials = credentials
        environment.mxPort = d.mxPort
        environment.connectTimeout = d.connectTimeout.duration
        environment.commandTimeout = d.commandTimeout.duration
        environment.dataTimeout = d.dataTimeout.duration
        router = Router(routes: config.routes, delivery: config.delivery)
        providerOf = [:]
        for (_, record) in lanes {
            guard let lane = record.lane, let old = record.route else { continue }
            var limits = router.limits(ofRoute: old.name)
            if let name = old.provider, let provider = config.providers.first(where: { $0.name == name }) {
                var route = old
                route.limits = limits
                limits = router.limits(provider: provider, route: route)
            }
            // The source address is part of the lane's key: a lane keeps its own; mail for
            // a new address goes to a new lane.
            limits.sourceAddress = old.limits.sourceAddress
            await lane.update(limits: limits, environment: environment)
        }
        logger.notice("configuration reloaded: \(config.routes.count) routes, \(config.providers.count) providers, \(config.delivery.replyRules.count) reply rules; \(lanes.count) lanes updated")
        // Waiting mail is routed again under the new config.
        activeQueue.limit = config.delivery.activeLimit
        activeQueue.clearWaiting()
        for id in Array(entries.keys) { await dispatch(id) }
    }

    /// Every lane's state, for `tern lanes`.
    public func laneStatus() async -> [LaneStatus] {
        var out: [LaneStatus] = []
        for (key, record) in lanes.sorted(by: { $0.key < $1.key }) {
            guard let lane = record.lane else { continue }
            var s = await lane.status()
            s.domains = record.domains.count
            s.backlog = activeQueue.waiting(key)
            s.lastReply = record.lastReply
            out.append(s)
        }
        return out
    }

    /// Suspends a lane (`resume` with `until` nil); a destination alone (`provider:yahoo`)
    /// also names its lanes with their own source addresses (`provider:yahoo/192.0.2.7`).
    /// Returns false when no lane matches.
    public func suspendLane(_ name: String, until: Int64?) async -> Bool {
        // `gmail` names the provider's lane `provider:gmail` when no lane has that name.
        let key = lanes[LaneKey(name)]?.lane == nil && config.providers.contains(where: { $0.name == name }) ? LaneKey.provider(name) : LaneKey(name)
        var chosen = lanes.filter { $0.key.isLane(of: key) }.compactMapValues(\.lane)
        if chosen.isEmpty, until != nil, let made = makeLane(named: key) {
            // No mail for it yet: its lane is made now, so the suspension holds for the first
            // message too.
            chosen = [key: made]
        }
        guard !chosen.isEmpty else { return false }
        let now = environment.now()
        for (k, lane) in chosen {
            lanes[k]?.activity = now
            if let until {
                recordSuspension(k, LaneSuspension(untilMillis: until, reason: "suspended by the operator"))
                await lane.suspend(until: until, reason: "suspended by the operator")
            } else {
                if suspensions[k] != nil { recordSuspension(k, nil) }
                await lane.revive(by: "resumed by the operator")
            }
        }
        if until == nil {
            // Resumed: its deferred mail goes now, not at its retry time.
            for (id, entry) in entries where !entry.meta.held {
                for (i, state) in entry.states.enumerated() where state == .pending && entry.meta.recipients[i] != nil {
                    if chosen[route(entry.envelope, i).laneKey] != nil { entries[id]!.meta.recipients[i]!.nextAttemptMillis = 0 }
                }
            }
            for id in Array(entries.keys) { await dispatch(id) }
        }
        return true
    }

}

/// `12.34` style seconds for log fields.
func format2(_ value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    let whole = hundredths / 100
    let frac = hundredths % 100
    return frac == 0 ? "\(whole)" : "\(whole).\(frac < 10 ? "0" : "")\(frac)"
}

/// One destination lane as the scheduler knows it: the actor (once made) and what the
/// scheduler keeps about it, in one place instead of a dictionary per field.
struct LaneRecord {
    /// Made when the first job is submitted (or for a suspension, or a `tern lanes` name).
    var lane: Lane?
    /// The route (and provider) the lane was made for, to give it new limits on reload.
    var route: Route?
    /// The recipient domains seen, and the last reply or error (for `tern lanes`).
    var domains: Set<String> = []
    var lastReply: String?
    /// When the lane last had any news (ms).
    var activity: Int64 = 0

    /// No news for `idle` ms: with nothing in the active queue for it, and its actor quiet
    /// too, the scheduler may forget the lane.
    func quiet(now: Int64, idle: Int64) -> Bool { now - activity >= idle }
}
