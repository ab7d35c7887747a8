import XCTest

@testable import TernCore

final class AlertPolicyTests: XCTestCase {
    func config() -> AlertsConfig {
        var c = AlertsConfig(to: ["ops@example.com"])
        c.queueDepth = 10
        c.upstreamAuthFailures = 2
        c.bounceRate = 5
        c.minDeliveries = 20
        c.window = ConfigDuration(.seconds(600))
        c.repeat = ConfigDuration(.seconds(3600))
        return c
    }

    func sample(_ minute: Int64, queued: Int = 0, _ change: (inout OperationalCounters.Totals) -> Void = { _ in }) -> AlertPolicy.Sample {
        var totals = OperationalCounters.Totals()
        change(&totals)
        return AlertPolicy.Sample(now: minute * 60_000, queued: queued, oldestAgeSeconds: 0, totals: totals)
    }

    func testRaisedOncePerRepeatThenCleared() {
        var policy = AlertPolicy(config: config())
        XCTAssertEqual(policy.check(sample(0, queued: 5)), [])
        XCTAssertEqual(policy.check(sample(1, queued: 11)).map(\.kind), [.queueDepth])
        XCTAssertEqual(policy.check(sample(2, queued: 50)), [], "within the repeat interval")
        XCTAssertEqual(policy.check(sample(62, queued: 50)).map(\.cleared), [false], "repeated after an hour")
        let cleared = policy.check(sample(63, queued: 3))
        XCTAssertEqual(cleared.map(\.cleared), [true])
        XCTAssertEqual(policy.check(sample(64, queued: 3)), [])
        XCTAssertEqual(policy.check(sample(65, queued: 11)).map(\.kind), [.queueDepth], "a new crossing is news at once")
    }

    func testCountersCountWithinTheWindow() {
        var policy = AlertPolicy(config: config())
        XCTAssertEqual(policy.check(sample(0)), [])
        XCTAssertEqual(policy.check(sample(5) { $0.upstreamAuthFailures = 1 }), [])
        XCTAssertEqual(policy.check(sample(8) { $0.upstreamAuthFailures = 2 }).map(\.kind), [.upstreamAuth])
        // 20 minutes later the failures are out of the window: cleared.
        XCTAssertEqual(policy.check(sample(28) { $0.upstreamAuthFailures = 2 }).map(\.cleared), [true])
    }

    func testBounceRateNeedsEnoughDeliveries() {
        var policy = AlertPolicy(config: config())
        XCTAssertEqual(policy.check(sample(0)), [])
        XCTAssertEqual(policy.check(sample(1) { $0.bounced = 5; $0.sent = 5 }), [], "10 deliveries: too few to judge")
        let raised = policy.check(sample(2) { $0.bounced = 5; $0.sent = 45 })
        XCTAssertEqual(raised.map(\.kind), [.bounceRate])
        XCTAssertTrue(raised[0].summary.hasPrefix("10% of 50 deliveries bounced"), raised[0].summary)
    }
}
