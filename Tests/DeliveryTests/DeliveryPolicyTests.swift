import SMTPProtocol
import XCTest

@testable import Delivery

final class DeliveryPolicyTests: XCTestCase {
    private func reply(_ code: Int, _ esc: EnhancedStatusCode? = nil) -> AttemptOutcome {
        .reply(SMTPReply(code, esc, "text"))
    }

    func testTheTable() {
        XCTAssertEqual(
            DeliveryPolicy.verdict(stage: .endOfData, outcome: reply(250, .ok)), .delivered(SMTPReply(250, .ok, "text")))
        // 5xx to the envelope or the content is final.
        for stage in [DeliveryStage.mail, .rcpt, .data, .endOfData] {
            XCTAssertEqual(
                DeliveryPolicy.verdict(stage: stage, outcome: reply(550, EnhancedStatusCode(5, 1, 1))),
                .bounced(status: EnhancedStatusCode(5, 1, 1), diagnostic: "smtp; 550 5.1.1 text"), "\(stage)")
        }
        // 5xx before the envelope says nothing final about the recipient: the next host,
        // and deferred (4xx) when none is left.
        for stage in [DeliveryStage.greeting, .hello, .startTLS, .auth] {
            XCTAssertEqual(DeliveryPolicy.verdict(stage: stage, outcome: reply(554)), .tryNextHost(reply(554)), "\(stage)")
        }
        XCTAssertEqual(
            DeliveryPolicy.exhausted(reply(554), note: nil), .deferred(status: EnhancedStatusCode(4, 0, 0), diagnostic: "smtp; 554 text"))
        // Soft failures move on to the next MX, and defer only at the last.
        let soft: [(DeliveryStage, AttemptOutcome, RecipientVerdict)] = [
            (.rcpt, reply(450, EnhancedStatusCode(4, 2, 0)), .deferred(status: EnhancedStatusCode(4, 2, 0), diagnostic: "smtp; 450 4.2.0 text")),
            (.connect, .connection("refused"), .deferred(status: EnhancedStatusCode(4, 4, 1), diagnostic: "X-Tern; connection failed: refused")),
            (
                .startTLS, .tls("certificate name mismatch"),
                .deferred(status: EnhancedStatusCode(4, 7, 5), diagnostic: "X-Tern; TLS failed: certificate name mismatch")
            ),
            (.data, .timeout("DATA"), .deferred(status: EnhancedStatusCode(4, 4, 2), diagnostic: "X-Tern; timed out: DATA")),
        ]
        for (stage, outcome, last) in soft {
            XCTAssertEqual(DeliveryPolicy.verdict(stage: stage, outcome: outcome), .tryNextHost(outcome), "\(stage)")
            XCTAssertEqual(DeliveryPolicy.exhausted(outcome, note: nil), last, "\(stage)")
        }
    }

    func testExpiryTurnsADeferralIntoABounce() {
        let deferred = RecipientVerdict.deferred(status: EnhancedStatusCode(4, 4, 1), diagnostic: "X-Tern; connection failed: refused")
        XCTAssertEqual(
            DeliveryPolicy.expire(deferred),
            .bounced(status: EnhancedStatusCode(5, 4, 1), diagnostic: "X-Tern; connection failed: refused (gave up: queue lifetime exceeded)"))
        let delivered = RecipientVerdict.delivered(SMTPReply(250, .ok, "ok"))
        XCTAssertEqual(DeliveryPolicy.expire(delivered), delivered)
    }

    func testOnlyConnectionAndGreetingFailuresThrottleALane() {
        XCTAssertTrue(DeliveryPolicy.throttlesLane(stage: .connect, outcome: .connection("refused")))
        XCTAssertTrue(DeliveryPolicy.throttlesLane(stage: .greeting, outcome: reply(421)))
        XCTAssertFalse(DeliveryPolicy.throttlesLane(stage: .rcpt, outcome: reply(450)))
        XCTAssertFalse(DeliveryPolicy.throttlesLane(stage: .endOfData, outcome: .timeout("x")))
        XCTAssertFalse(DeliveryPolicy.throttlesLane(stage: .greeting, outcome: reply(220)))
    }
}

/// A deterministic generator for the jitter (SplitMix64).
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

final class RetryScheduleTests: XCTestCase {
    func testDoublesUpToTheMaximumWithoutJitter() {
        let schedule = RetrySchedule(jitter: 0)
        var rng = SeededGenerator(state: 1)
        let minutes = (1...9).map { schedule.delay(afterAttempts: $0, using: &rng).components.seconds / 60 }
        XCTAssertEqual(minutes, [5, 10, 20, 40, 80, 160, 240, 240, 240])
        XCTAssertEqual(schedule.delay(afterAttempts: 10_000, using: &rng), .seconds(14_400))
    }

    func testJitterStaysWithinItsBoundsAndSpreads() {
        let schedule = RetrySchedule(jitter: 0.2)
        var rng = SeededGenerator(state: 42)
        let delays = (0..<500).map { _ in Double(schedule.delay(afterAttempts: 1, using: &rng).components.seconds) }
        XCTAssertGreaterThanOrEqual(delays.min()!, 240)
        XCTAssertLessThanOrEqual(delays.max()!, 360)
        XCTAssertGreaterThan(Set(delays).count, 50, "deferred mail must not all come back at once")
    }

    func testLifetime() {
        let schedule = RetrySchedule(lifetime: .seconds(3600))
        XCTAssertFalse(schedule.hasExpired(arrivalMillis: 0, nowMillis: 3_599_999))
        XCTAssertTrue(schedule.hasExpired(arrivalMillis: 0, nowMillis: 3_600_000))
    }
}
