import XCTest

@testable import Delivery

final class RetryQueueTests: XCTestCase {
    func testDueSoonestFirstAndTheEarliestTimeWins() {
        var q = RetryQueue<String>()
        q.schedule("b", at: 20)
        q.schedule("a", at: 10)
        q.schedule("c", at: 30)
        q.schedule("c", at: 5)  // sooner: moves up
        q.schedule("a", at: 50)  // later: ignored
        XCTAssertEqual(q.nextDue(), 5)
        XCTAssertEqual(q.popDue(now: 9), ["c"])
        XCTAssertEqual(q.popDue(now: 25), ["a", "b"])
        XCTAssertTrue(q.isEmpty)
        XCTAssertEqual(q.popDue(now: 1000), [], "the replaced entry of c is skipped")
    }

    func testRemoved() {
        var q = RetryQueue<Int>()
        for i in 0..<10 { q.schedule(i, at: Int64(i)) }
        q.remove(3)
        q.remove(7)
        XCTAssertEqual(q.count, 8)
        XCTAssertEqual(q.popDue(now: 100), [0, 1, 2, 4, 5, 6, 8, 9])
        XCTAssertNil(q.nextDue())
    }

    func testAgainstASortedList() {
        var rng = SplitMix(seed: 7)
        var q = RetryQueue<Int>()
        var model: [Int: Int64] = [:]
        var now: Int64 = 0
        for _ in 0..<5000 {
            let id = Int(rng.next() % 200)
            switch rng.next() % 4 {
            case 0, 1:
                let t = now + Int64(rng.next() % 1000)
                q.schedule(id, at: t)
                model[id] = min(model[id] ?? t, t)
            case 2:
                q.remove(id)
                model[id] = nil
            default:
                now += Int64(rng.next() % 300)
                let expected = model.filter { $0.value <= now }.sorted { ($0.value, $0.key) < ($1.value, $1.key) }
                let got = q.popDue(now: now)
                XCTAssertEqual(got, expected.map(\.key), "soonest first, ties by id")
                for e in expected { model[e.key] = nil }
            }
            XCTAssertEqual(q.count, model.count)
        }
    }

    /// A burst of 100,000 due at once (a destination back after an outage) leaves no storage
    /// sized for it behind.
    func testABurstGivesItsMemoryBack() {
        var q = RetryQueue<Int>()
        for id in 0..<100_000 { q.schedule(id, at: Int64(id % 10)) }
        q.schedule(-1, at: 1_000)
        XCTAssertGreaterThanOrEqual(q.capacity.heap, 100_000)
        XCTAssertEqual(q.popDue(now: 100).count, 100_000)
        XCTAssertLessThan(q.capacity.heap, 1_000)
        XCTAssertLessThan(q.capacity.due, 1_000)
        XCTAssertEqual(q.popDue(now: 1_000), [-1], "what was not due is kept")
    }

    /// A message rescheduled sooner again and again leaves stale heap entries; they are
    /// swept out, and what is due still comes once, soonest first.
    func testRescheduledSoonerManyTimesStaysCorrect() {
        var q = RetryQueue<Int>()
        for id in 0..<100 { q.schedule(id, at: 1_000_000) }
        for round in 1...10 {
            for id in 0..<100 { q.schedule(id, at: Int64(1_000_000 - round * 1000 - id)) }
        }
        XCTAssertLessThanOrEqual(q.capacity.heap, 4 * 100 * 2, "stale entries do not pile up")
        XCTAssertEqual(q.count, 100)
        XCTAssertEqual(q.nextDue(), Int64(1_000_000 - 10_000 - 99))
        XCTAssertEqual(q.popDue(now: 2_000_000), (0..<100).reversed().map { $0 })
        XCTAssertNil(q.nextDue())
    }
}
