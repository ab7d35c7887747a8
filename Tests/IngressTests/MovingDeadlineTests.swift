import NIOCore
import NIOEmbedded
import XCTest

@testable import TernCore

final class MovingDeadlineTests: XCTestCase {
    private let loop = EmbeddedEventLoop()
    private var scheduled: [NIODeadline] = []

    private func at(_ seconds: Int64) -> NIODeadline { .uptimeNanoseconds(UInt64(seconds) * 1_000_000_000) }

    private func set(_ deadline: inout MovingDeadline, _ seconds: Int64) {
        deadline.set(at(seconds)) { due in
            scheduled.append(due)
            return loop.scheduleTask(deadline: due) {}
        }
    }

    func testAMovingDeadlineCostsOneTimerUntilItFires() {
        var deadline = MovingDeadline()
        set(&deadline, 10)
        for t in stride(from: 11, through: 40, by: 1) { set(&deadline, Int64(t)) }
        XCTAssertEqual(scheduled, [at(10)], "each later deadline rides on the timer already there")
        // The timer fires at 10: the deadline is 40 now, so it goes again for that.
        XCTAssertEqual(deadline.fired(now: at(10)), .later(at(40)))
        set(&deadline, 40)
        XCTAssertEqual(scheduled, [at(10), at(40)])
        XCTAssertEqual(deadline.fired(now: at(40)), .expired)
        XCTAssertNil(deadline.deadline)
    }

    func testAnEarlierDeadlineGetsATimerOfItsOwn() {
        var deadline = MovingDeadline()
        set(&deadline, 300)
        set(&deadline, 30)  // a shorter timeout from now on
        XCTAssertEqual(scheduled, [at(300), at(30)])
        XCTAssertEqual(deadline.fired(now: at(30)), .expired)
    }

    func testNoDeadlineWhileClearedAndNoneAfterACancel() {
        var deadline = MovingDeadline()
        set(&deadline, 10)
        deadline.clear()
        XCTAssertEqual(deadline.fired(now: at(10)), .none, "paused: the timer fires to no effect")
        set(&deadline, 20)
        XCTAssertEqual(scheduled, [at(10), at(20)])
        deadline.cancel()
        XCTAssertNil(deadline.deadline)
        set(&deadline, 25)
        XCTAssertEqual(scheduled.last, at(25), "after a cancel the next deadline schedules again")
    }

    func testADeadlineIsNotMissedWhenTheTimerFiresLate() {
        var deadline = MovingDeadline()
        set(&deadline, 10)
        XCTAssertEqual(deadline.fired(now: at(12)), .expired)
    }
}
