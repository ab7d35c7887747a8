import XCTest

@testable import Delivery
@testable import TernCore

/// The lane's decisions with a manual clock: no sockets, no sleeps.
final class LaneStateMachineTests: XCTestCase {
    typealias Machine = LaneStateMachine<Int>

    func limits(_ change: (inout LaneLimits) -> Void = { _ in }) -> LaneLimits {
        var l = LaneLimits()
        l.initialConnections = 2
        l.maxConnections = 4
        l.deadTime = ConfigDuration(.seconds(60))
        change(&l)
        return l
    }

    func started(_ actions: [Machine.Action]) -> Int {
        actions.reduce(0) { n, a in if case .startWorkers(let k, _) = a { return n + k } else { return n } }
    }

    func deferred(_ actions: [Machine.Action]) -> [Int] {
        actions.flatMap { a -> [Int] in if case .deferJobs(let jobs, _, _) = a { return jobs } else { return [] } }
    }

    func testWorkersStartUpToTheWindowAndTakeJobsInOrder() {
        var m = Machine(key: "x.example", limits: limits(), idleMillis: 2000, now: 0)
        XCTAssertEqual(started(m.submit(1, now: 0)), 1)
        XCTAssertEqual(started(m.submit(2, now: 0)), 1)
        XCTAssertEqual(started(m.submit(3, now: 0)), 0, "the window starts at 2")
        guard case (.job(1), _) = m.next(finished: false, now: 0) else { return XCTFail() }
        guard case (.job(2), _) = m.next(finished: false, now: 0) else { return XCTFail() }
        // Greetings widen the window: one more worker for the job left.
        XCTAssertEqual(started(m.connectionSucceeded(now: 1)), 1)
        guard case (.job(3), _) = m.next(finished: false, now: 1) else { return XCTFail() }
        XCTAssertEqual(m.inFlight, 3)
        // Done and nothing queued: the worker waits, idle; a new job goes straight to it.
        guard case (.wait(let waiter), _) = m.next(finished: true, now: 2) else { return XCTFail() }
        let actions = m.submit(4, now: 3)
        guard case .resume(waiter, .some(4)) = actions.first else { return XCTFail("\(actions)") }
        XCTAssertEqual(m.queued, 0)
    }

    func testAnIdleWorkerClosesAfterItsIdleTime() {
        var m = Machine(key: "x.example", limits: limits(), idleMillis: 2000, now: 0)
        _ = m.submit(1, now: 0)
        _ = m.next(finished: false, now: 0)
        guard case (.wait(let waiter), _) = m.next(finished: true, now: 1) else { return XCTFail() }
        guard case .resume(waiter, nil) = m.idleExpired(waiter).first else { return XCTFail() }
        XCTAssertTrue(m.idleExpired(waiter).isEmpty, "once")
        _ = m.workerDone(now: 2)
        XCTAssertTrue(m.isQuiet(now: 3))
    }

    /// A lane whose two workers took jobs 1 and 2, then a window's worth of failed
    /// connections (the window shrinks with each): dead at 1 ms. Returns what that said.
    func deadLane(_ m: inout Machine) -> [Machine.Action] {
        _ = m.submit(1, now: 0)
        _ = m.submit(2, now: 0)
        _ = m.next(finished: false, now: 0)
        _ = m.next(finished: false, now: 0)
        return m.connectionFailed(.connection("refused"), now: 1)
    }

    func testADeadDestinationDefersItsJobsAndRevives() {
        var m = Machine(key: "dead.example", limits: limits(), idleMillis: 2000, now: 0)
        // Dead, logged once.
        let dead = deadLane(&m)
        guard case .log(.warning, let text) = dead.first else { return XCTFail("\(dead)") }
        XCTAssertTrue(text.contains("destination dead for 1m"), text)
        // Workers get no more jobs; new jobs are deferred without a try, with the reason.
        guard case (.close, _) = m.next(finished: true, now: 2) else { return XCTFail() }
        guard case (.close, _) = m.next(finished: true, now: 2) else { return XCTFail() }
        _ = m.workerDone(now: 2)
        _ = m.workerDone(now: 2)
        let actions = m.submit(3, now: 3)
        XCTAssertEqual(deferred(actions), [3])
        guard case .deferJobs(_, .connection("refused"), _) = actions.first else { return XCTFail() }
        // After the dead time, the lane tries again.
        XCTAssertEqual(started(m.submit(4, now: 61_000)), 1)
        XCTAssertEqual(m.window.state(now: 61_000), .active)
        _ = m.next(finished: false, now: 61_000)
        let revived = m.connectionSucceeded(now: 61_001)
        guard case .log(.notice, let back) = revived.first else { return XCTFail("\(revived)") }
        XCTAssertTrue(back.contains("reachable again"))
        XCTAssertNil(m.stateReason)
    }

    func testASuspensionHoldsJobsUntilItEnds() {
        var m = Machine(key: "s.example", limits: limits(), idleMillis: 2000, now: 0)
        let actions = m.suspend(until: 10_000, reason: "operator", now: 0)
        guard case .wake(afterMillis: 10_010) = actions.last else { return XCTFail("\(actions)") }
        XCTAssertTrue(m.submit(1, now: 100).isEmpty, "held: not deferred, not started")
        XCTAssertEqual(m.queued, 1)
        XCTAssertTrue(m.revive(reason: "flush", endingSuspension: false, now: 200).isEmpty, "a flush does not end a suspension")
        let over = m.timerFired(now: 10_010)
        guard case .log(.notice, let text) = over.first else { return XCTFail("\(over)") }
        XCTAssertTrue(text.contains("suspension over"))
        XCTAssertEqual(started(over), 1)
    }

    func testTheMessageRateSpacesWorkAndClosesIdleConnections() {
        var m = Machine(key: "r.example", limits: limits { $0.rate = RateLimit(parsing: "1/s") }, idleMillis: 200, now: 0)
        XCTAssertEqual(started(m.submit(1, now: 0)), 1)
        let second = m.submit(2, now: 0)
        XCTAssertEqual(started(second), 0, "no token for a second connection")
        guard case .wake(let wait) = second.last else { return XCTFail("\(second)") }
        XCTAssertEqual(wait, 1000)
        XCTAssertTrue(m.submit(3, now: 10).isEmpty, "one wake-up at a time")
        guard case (.job(1), _) = m.next(finished: false, now: 0) else { return XCTFail() }
        // The next message may go only in a second, longer than the idle time: close.
        guard case (.close, _) = m.next(finished: true, now: 10) else { return XCTFail() }
        XCTAssertEqual(started(m.timerFired(now: 1000)), 1)
    }

    func testTheConnectionRateSpacesConnections() {
        var m = Machine(
            key: "c.example", limits: limits { $0.connectionRate = RateLimit(parsing: "2/s") }, idleMillis: 2000, now: 0)
        XCTAssertEqual(started(m.submit(1, now: 0)), 1)
        let next = m.submit(2, now: 0)
        XCTAssertEqual(started(next), 0)
        guard case .wake(let wait) = next.last else { return XCTFail("\(next)") }
        XCTAssertEqual(wait, 500)
        XCTAssertEqual(started(m.timerFired(now: 500)), 1)
    }

    func testBackOffAndRecoveryAreLogged() {
        var m = Machine(key: "b.example", limits: limits { $0.maxConnections = 8 }, idleMillis: 2000, now: 0)
        var raised: [Machine.Action] = []
        for i in 0..<20 { raised += m.record(softFailure: i % 3 != 0, reason: "421 busy", now: Int64(i)) }
        XCTAssertEqual(m.window.state(now: 100), .backingOff(level: 1))
        XCTAssertEqual(m.stateReason, "421 busy")
        guard case .log(.warning, let text) = raised.first else { return XCTFail("\(raised)") }
        XCTAssertTrue(text.contains("backing off to level 1 (4 connections)"), text)
        var recovered: [Machine.Action] = []
        for i in 0..<40 { recovered += m.record(softFailure: false, reason: "", now: Int64(100 + i)) }
        XCTAssertEqual(m.window.state(now: 200), .active)
        XCTAssertNil(m.stateReason)
        XCTAssertTrue(recovered.contains { if case .log(.notice, let t) = $0 { return t.contains("recovering to level 0") } else { return false } })
    }

    func testAReductionEndsByItsTimer() {
        var m = Machine(key: "red.example", limits: limits { $0.rate = RateLimit(parsing: "10/s") }, idleMillis: 2000, now: 0)
        let actions = m.reduce(factor: 0.5, until: 5000, reason: "421 4.7.28", now: 0)
        guard case .log(.notice, let text) = actions.first else { return XCTFail() }
        XCTAssertTrue(text.contains("reduced to 2 connections, 5/s"), text)
        XCTAssertEqual(m.window.state(now: 1), .reduced(until: 5000))
        let over = m.timerFired(now: 5000)
        XCTAssertTrue(over.contains { if case .log(_, let t) = $0 { return t.contains("reduction over, back to 4 connections, 10/s") } else { return false } })
    }

    func testWithdrawTakesOnlyQueuedJobs() {
        var m = Machine(key: "w.example", limits: limits { $0.initialConnections = 1 }, idleMillis: 2000, now: 0)
        for j in 1...4 { _ = m.submit(j, now: 0) }
        guard case (.job(1), _) = m.next(finished: false, now: 0) else { return XCTFail() }
        XCTAssertEqual(m.withdraw { $0 % 2 == 1 }, [3], "job 1 is under way: untouched")
        XCTAssertEqual(m.queued, 2)
        guard case (.job(2), _) = m.next(finished: true, now: 1) else { return XCTFail() }
        guard case (.job(4), _) = m.next(finished: true, now: 2) else { return XCTFail() }
    }

    func testLimitsChangedMidFlight() {
        var m = Machine(key: "u.example", limits: limits { $0.initialConnections = 1; $0.maxConnections = 1 }, idleMillis: 2000, now: 0)
        for j in 1...3 { _ = m.submit(j, now: 0) }
        XCTAssertEqual(m.window.active, 1)
        // A reload raises the ceiling and the start: the waiting jobs get workers at once.
        let actions = m.update(limits: limits { $0.initialConnections = 3; $0.maxConnections = 3 }, idleMillis: 2000, now: 1)
        XCTAssertEqual(started(actions), 2, "a worker for each job beyond the one starting")
        XCTAssertEqual(m.window.active, 3)
    }

    /// `tern queue flush` ends a rest after failures at once (and says so); the jobs then
    /// go without waiting for the dead time.
    func testAFlushRevivesADeadDestination() {
        var m = Machine(key: "dead.example", limits: limits(), idleMillis: 2000, now: 0)
        _ = deadLane(&m)
        XCTAssertTrue(m.window.isDead(now: 2))
        let revived = m.revive(reason: "revived by tern queue flush", endingSuspension: false, now: 2)
        guard case .log(.notice, let text) = revived.first else { return XCTFail("\(revived)") }
        XCTAssertEqual(text, "lane dead.example: revived by tern queue flush")
        XCTAssertFalse(m.window.isDead(now: 2))
        XCTAssertNil(m.stateReason)
        XCTAssertTrue(m.revive(reason: "again", endingSuspension: false, now: 3).allSatisfy { if case .log = $0 { false } else { true } },
                      "nothing to say when the lane is not resting")
    }

    /// The permits a worker asks for: each message waits its turn at the rate, each
    /// connection after a worker's first at the connection rate; no rate, no wait.
    func testPermitsFollowTheRates() {
        var m = Machine(
            key: "p.example", limits: limits { $0.rate = RateLimit(parsing: "2/s"); $0.connectionRate = RateLimit(parsing: "1/s") },
            idleMillis: 2000, now: 0)
        XCTAssertEqual(m.permitMessage(now: 0), 0, "the burst")
        XCTAssertEqual(m.permitMessage(now: 0), 500)
        XCTAssertEqual(m.permitMessage(now: 0), 1000, "reservations queue up")
        XCTAssertEqual(m.permitConnection(now: 0), 0)
        XCTAssertEqual(m.permitConnection(now: 0), 1000)
        var free = Machine(key: "f.example", limits: limits(), idleMillis: 2000, now: 0)
        XCTAssertEqual(free.permitMessage(now: 0), 0)
        XCTAssertEqual(free.permitConnection(now: 0), 0)
    }

    /// A long queue taken from the front is compacted as it goes, and order is kept.
    func testALongQueueKeepsItsOrderAsItDrains() {
        var m = Machine(key: "long.example", limits: limits { $0.initialConnections = 1; $0.maxConnections = 1 }, idleMillis: 2000, now: 0)
        for i in 0..<5000 { _ = m.submit(i, now: 0) }
        var got: [Int] = []
        var finished = false
        while case (.job(let j), _) = m.next(finished: finished, now: 0) {
            got.append(j)
            finished = true
        }
        XCTAssertEqual(got, Array(0..<5000))
        XCTAssertEqual(m.queued, 0)
    }

    /// Random interleavings of events never break the lane's invariants: every job is in
    /// exactly one place (queued, with a worker, deferred, withdrawn or done), connections
    /// never exceed the ceiling, and a withdrawn job is never handed to a worker.
    func testRandomInterleavingsKeepTheInvariants() {
        var rng = SplitMix(seed: 42)
        for round in 0..<300 {
            var m = Machine(
                key: "p.example",
                limits: limits {
                    $0.maxConnections = 1 + Int(rng.next() % 5)
                    $0.initialConnections = 1 + Int(rng.next() % 3)
                    if rng.next() % 2 == 0 { $0.rate = RateLimit(parsing: "\(1 + rng.next() % 20)/s") }
                    if rng.next() % 3 == 0 { $0.connectionRate = RateLimit(parsing: "\(1 + rng.next() % 10)/s") }
                }, idleMillis: 500, now: 0)
            var now: Int64 = 0
            var nextJob = 0
            var queuedSet = Set<Int>(), withWorker = Set<Int>(), finished = Set<Int>(), withdrawn = Set<Int>()
            var workers: [(id: Int, job: Int?)] = []  // started workers; job nil: asking
            var waiting: [Int: Int] = [:]  // waiter → worker index
            var pendingStarts = 0
            var workerIndex = 0

            func apply(_ actions: [Machine.Action]) {
                for a in actions {
                    switch a {
                    case .startWorkers(let n, _): pendingStarts += n
                    case .resume(let waiter, let job):
                        guard let w = waiting.removeValue(forKey: waiter) else { return XCTFail("resume of an unknown waiter") }
                        if let job {
                            XCTAssertFalse(withdrawn.contains(job), "a withdrawn job went to a worker")
                            // Only a job just submitted goes straight to an idle worker.
                            XCTAssertNotNil(queuedSet.remove(job), "resumed with a job that was not queued")
                            withWorker.insert(job)
                            workers[w].job = job
                        } else {
                            workers[w].job = -1  // closing
                        }
                    case .deferJobs(let jobs, _, _):
                        for j in jobs { XCTAssertNotNil(queuedSet.remove(j), "deferred a job not queued"); finished.insert(j) }
                    case .wake, .log: break
                    }
                }
            }

            for _ in 0..<200 {
                now += Int64(rng.next() % 300)
                switch rng.next() % 9 {
                case 0, 1:
                    nextJob += 1
                    queuedSet.insert(nextJob)
                    apply(m.submit(nextJob, now: now))
                case 2 where pendingStarts > 0:
                    pendingStarts -= 1
                    workers.append((workerIndex, nil))
                    workerIndex += 1
                    let (next, actions) = m.next(finished: false, now: now)
                    apply(actions)
                    handle(next, worker: workers.count - 1)
                case 3:
                    // A worker with a job finishes it.
                    if let w = workers.firstIndex(where: { ($0.job ?? -1) > 0 }) {
                        let job = workers[w].job!
                        withWorker.remove(job)
                        finished.insert(job)
                        workers[w].job = nil
                        let (next, actions) = m.next(finished: true, now: now)
                        apply(actions)
                        handle(next, worker: w)
                    }
                case 4:
                    if let (waiter, _) = waiting.first { apply(m.idleExpired(waiter)) }
                case 5:
                    if let w = workers.firstIndex(where: { $0.job == -1 }) {
                        workers[w].job = -2  // gone
                        apply(m.workerDone(now: now))
                    }
                case 6:
                    apply(rng.next() % 2 == 0 ? m.connectionFailed(.connection("x"), now: now) : m.connectionSucceeded(now: now))
                case 7:
                    let taken = m.withdraw { _ in rng.next() % 3 == 0 }
                    for j in taken { XCTAssertNotNil(queuedSet.remove(j)); withdrawn.insert(j) }
                default:
                    apply(m.timerFired(now: now))
                }
                XCTAssertLessThanOrEqual(m.window.active, max(m.window.limits.maxConnections, 1), "round \(round)")
                XCTAssertEqual(m.queued, queuedSet.count, "round \(round): queued")
                XCTAssertEqual(m.inFlight, withWorker.count, "round \(round): in flight")
                XCTAssertTrue(queuedSet.isDisjoint(with: withWorker) && withWorker.isDisjoint(with: finished)
                    && finished.isDisjoint(with: withdrawn) && queuedSet.isDisjoint(with: withdrawn))
                XCTAssertEqual(queuedSet.count + withWorker.count + finished.count + withdrawn.count, nextJob)
            }

            func handle(_ next: Machine.Next, worker w: Int) {
                switch next {
                case .job(let j):
                    XCTAssertFalse(withdrawn.contains(j), "a withdrawn job went to a worker")
                    XCTAssertNotNil(queuedSet.remove(j))
                    withWorker.insert(j)
                    workers[w].job = j
                case .close: workers[w].job = -1
                case .wait(let waiter): waiting[waiter] = w
                }
            }
        }
    }
}

/// A seeded generator, so that a failing interleaving can be replayed.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE5_E9B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
