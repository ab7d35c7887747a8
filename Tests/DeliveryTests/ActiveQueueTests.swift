import XCTest

@testable import Delivery

final class ActiveQueueTests: XCTestCase {
    typealias Queue = ActiveQueue<Int>

    /// Offers and hands over at once what may go, as the scheduler does.
    @discardableResult
    func offer(_ q: inout Queue, _ id: Int, _ lane: LaneKey, maxQueued: Int = 10) -> Queue.Admission {
        let admission = q.offer(id, recipients: [0], lane: lane, maxQueued: maxQueued)
        if admission == .now { q.handedOver(lane: lane, transactions: 1) }
        return admission
    }

    func testALaneHoldsMaxQueuedAndTheRestWaitsInArrivalOrder() {
        var q = Queue(limit: 100)
        XCTAssertEqual(offer(&q, 1, "a.example", maxQueued: 2), .now)
        XCTAssertEqual(offer(&q, 2, "a.example", maxQueued: 2), .now)
        XCTAssertEqual(offer(&q, 3, "a.example", maxQueued: 2), .waiting(refill: false), "the lane's own limit: no refill")
        XCTAssertEqual(offer(&q, 4, "a.example", maxQueued: 2), .waiting(refill: false))
        XCTAssertEqual(q.outstanding("a.example"), 2)
        XCTAssertEqual(q.waiting("a.example"), 2)
        XCTAssertNil(q.next(of: "a.example", maxQueued: 2), "no room yet")
        XCTAssertTrue(q.finished(lane: "a.example"), "waiting mail may go")
        XCTAssertEqual(q.next(of: "a.example", maxQueued: 2)?.id, 3)
        q.handedOver(lane: "a.example", transactions: 1)
        XCTAssertNil(q.next(of: "a.example", maxQueued: 2))
        q.finished(lane: "a.example")
        XCTAssertEqual(q.next(of: "a.example", maxQueued: 2)?.id, 4)
        q.handedOver(lane: "a.example", transactions: 1)
        q.finished(lane: "a.example")
        XCTAssertNil(q.next(of: "a.example", maxQueued: 2), "nothing left")
        XCTAssertEqual(q.waiting("a.example"), 0)
        q.finished(lane: "a.example")
        XCTAssertTrue(q.isIdle("a.example"))
        XCTAssertEqual(q.active, 0)
    }

    func testNewMailQueuesBehindMailAlreadyWaiting() {
        var q = Queue(limit: 100)
        offer(&q, 1, "a.example", maxQueued: 1)
        offer(&q, 2, "a.example", maxQueued: 1)
        q.finished(lane: "a.example")
        // Room now, but message 2 waited first: 3 goes behind it.
        XCTAssertEqual(offer(&q, 3, "a.example", maxQueued: 1), .waiting(refill: true))
        XCTAssertEqual(q.next(of: "a.example", maxQueued: 1)?.id, 2)
    }

    func testAMessageAlreadyWaitingKeepsItsPlaceAndGainsRecipients() {
        var q = Queue(limit: 100)
        offer(&q, 1, "a.example", maxQueued: 1)
        _ = q.offer(2, recipients: [0], lane: "a.example", maxQueued: 1)
        _ = q.offer(3, recipients: [0], lane: "a.example", maxQueued: 1)
        _ = q.offer(2, recipients: [0, 4], lane: "a.example", maxQueued: 1)
        XCTAssertEqual(q.waiting("a.example"), 2)
        q.finished(lane: "a.example")
        let first = q.next(of: "a.example", maxQueued: 1)
        XCTAssertEqual(first?.id, 2)
        XCTAssertEqual(first?.recipients, [0, 4], "no recipient twice")
    }

    /// The active queue's limit is shared: as room comes free, the lanes it held back are
    /// served in turn, not the busiest one first.
    func testTheActiveLimitServesHeldBackLanesInTurn() {
        var q = Queue(limit: 2)
        offer(&q, 1, "a.example")
        offer(&q, 2, "a.example")
        for id in 3...5 { XCTAssertEqual(offer(&q, id, "a.example"), .waiting(refill: false), "active queue full") }
        XCTAssertEqual(offer(&q, 6, "b.example"), .waiting(refill: false))
        XCTAssertEqual(offer(&q, 7, "c.example"), .waiting(refill: false))
        XCTAssertNil(q.nextStarved(), "no room")
        var served: [LaneKey] = []
        for _ in 0..<3 {
            q.finished(lane: "a.example")
            guard let lane = q.nextStarved(), let (id, _) = q.next(of: lane, maxQueued: 10) else { return XCTFail("room came free") }
            q.handedOver(lane: lane, transactions: 1)
            served.append(lane)
            XCTAssertEqual(id, ["a.example": 3, "b.example": 6, "c.example": 7][lane])
        }
        XCTAssertEqual(served, ["a.example", "b.example", "c.example"], "round robin, in the order they were held back")
        XCTAssertNil(q.nextStarved(), "the active queue is full again")
        q.finished(lane: "b.example")
        // a.example still has mail; it was served and left the turn order, so it takes
        // its turn again when its own refill finds the active queue full.
        XCTAssertEqual(q.next(of: "a.example", maxQueued: 10)?.id, 4)
        q.handedOver(lane: "a.example", transactions: 1)
        XCTAssertNil(q.next(of: "a.example", maxQueued: 10), "full: a.example waits its turn")
        q.finished(lane: "c.example")
        XCTAssertEqual(q.nextStarved(), "a.example")
    }

    func testRoomInTheActiveQueueWithMailAheadAsksForARefill() {
        var q = Queue(limit: 1)
        offer(&q, 1, "a.example")
        XCTAssertEqual(offer(&q, 2, "b.example"), .waiting(refill: false))
        q.finished(lane: "a.example")
        XCTAssertEqual(offer(&q, 3, "b.example"), .waiting(refill: true), "room, but 2 is ahead: refill, then 3")
        XCTAssertEqual(q.nextStarved(), "b.example")
        XCTAssertEqual(q.next(of: "b.example", maxQueued: 10)?.id, 2)
    }

    func testWithdrawnJobsFreeRoomAndAReloadForgetsWhatWaits() {
        var q = Queue(limit: 10)
        offer(&q, 1, "a.example", maxQueued: 2)
        offer(&q, 2, "a.example", maxQueued: 2)
        offer(&q, 3, "a.example", maxQueued: 2)
        XCTAssertTrue(q.finished(lane: "a.example", transactions: 2), "taken back: room, and mail waits")
        XCTAssertEqual(q.active, 0)
        XCTAssertEqual(q.waiting("a.example"), 1)
        q.clearWaiting()
        XCTAssertEqual(q.waiting("a.example"), 0)
        XCTAssertTrue(q.isIdle("a.example"))
        XCTAssertFalse(q.finished(lane: "a.example"), "more finished than handed over stays at zero")
        XCTAssertEqual(q.outstanding("a.example"), 0)
        XCTAssertEqual(q.active, 0)
    }

    func testAReloadThatRaisesTheLimitLetsMoreGo() {
        var q = Queue(limit: 1)
        offer(&q, 1, "a.example")
        offer(&q, 2, "b.example")
        XCTAssertNil(q.nextStarved())
        q.limit = 2
        XCTAssertEqual(q.nextStarved(), "b.example")
    }

    /// Random offers, hand-overs and ends: the counts never go negative, the active queue
    /// never exceeds its limit through `next`, and nothing offered is lost or served twice.
    func testRandomTrafficKeepsEveryMessageOnce() {
        var rng = SplitMix(seed: 7)
        let lanes: [LaneKey] = ["a.example", "b.example", "c.example"]
        var q = Queue(limit: 4)
        var inLane: [LaneKey: Int] = [:]
        var served: [Int] = []
        var offered = 0
        for _ in 0..<5000 {
            let lane = lanes[Int(rng.next() % 3)]
            switch rng.next() % 3 {
            case 0:
                offered += 1
                if offer(&q, offered, lane, maxQueued: 2) == .now {
                    served.append(offered)
                    inLane[lane, default: 0] += 1
                }
            case 1:
                if inLane[lane, default: 0] > 0 {
                    inLane[lane]! -= 1
                    q.finished(lane: lane)
                }
            default:
                let next = rng.next() % 2 == 0 ? lane : q.nextStarved()
                if let next, let (id, _) = q.next(of: next, maxQueued: 2) {
                    q.handedOver(lane: next, transactions: 1)
                    inLane[next, default: 0] += 1
                    served.append(id)
                }
            }
            XCTAssertLessThanOrEqual(q.active, 4)
            XCTAssertEqual(q.active, inLane.values.reduce(0, +))
            for l in lanes { XCTAssertLessThanOrEqual(q.outstanding(l), 2) }
        }
        XCTAssertEqual(Set(served).count, served.count, "nothing served twice")
        let waiting = lanes.map { q.waiting($0) }.reduce(0, +)
        XCTAssertEqual(served.count + waiting, offered, "every message served or still waiting")
    }
}
