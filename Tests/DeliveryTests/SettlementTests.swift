import XCTest

@testable import Delivery
@testable import SMTPProtocol
@testable import Spool
@testable import TernCore

/// Every verdict path of a job's settlement, with a fixed clock and no spool.
final class SettlementTests: XCTestCase {
    let hour: Int64 = 3_600_000

    func envelope(_ recipients: [EnvelopeRecipient], sender: String = "app@client.example", arrival: Int64 = 0) -> Envelope {
        Envelope(sender: sender, recipients: recipients, client: ClientInfo(address: "127.0.0.1", port: 1), listener: "mx", arrivalMillis: arrival)
    }

    func rules(_ yaml: String = "", delayWarning: Duration? = nil) throws -> Settlement.Rules {
        let c = try ConfigLoader.parse(
            "listeners:\n  - { name: mx, kind: smtp, address: \"127.0.0.1:2525\" }\n" + (yaml.isEmpty ? "" : "delivery:\n  reply_rules:\n" + yaml),
            file: "t.yaml")
        return Settlement.Rules(
            replyRules: c.delivery.replyRules, retry: RetrySchedule(first: .seconds(60), maximum: .seconds(600), jitter: 0, lifetime: .seconds(86_400)),
            delayWarning: delayWarning)
    }

    func settle(
        _ env: Envelope, _ results: [RecipientResult], states: [RecipientState]? = nil, meta: DeliveryMeta = DeliveryMeta(),
        now: Int64 = 1000, rules r: Settlement.Rules? = nil, lane: LaneKey = "x.example"
    ) throws -> Settlement {
        var random = SystemRandomNumberGenerator()
        return Settlement(
            envelope: env, states: states ?? env.recipients.map { _ in .pending }, meta: meta, results: results, lane: lane, now: now,
            rules: try r ?? rules(), random: &random)
    }

    let ok = SMTPReply(250, EnhancedStatusCode(2, 0, 0), "ok")
    let busy = SMTPReply(421, EnhancedStatusCode(4, 7, 0), "[TS04] try later")
    let unknown = SMTPReply(550, EnhancedStatusCode(5, 1, 1), "no such user")

    func result(_ i: Int, _ reply: SMTPReply, stage: DeliveryStage = .rcpt, dsn: Bool = true) -> RecipientResult {
        // As the transport reports it: a soft failure at the last host is deferred.
        var verdict = DeliveryPolicy.verdict(stage: stage, outcome: .reply(reply))
        if case .tryNextHost(let outcome) = verdict { verdict = DeliveryPolicy.exhausted(outcome, note: nil) }
        return RecipientResult(
            index: i, verdict: verdict, reply: reply,
            relay: "mx[10.0.0.1]:25", remoteMTA: "dns; mx", relayedWithoutDSN: !dsn)
    }

    func testDeliveredSoftAndHardInOneJob() throws {
        let env = envelope(["a@x.example", "b@x.example", "c@x.example"].map { EnvelopeRecipient(address: $0) })
        let s = try settle(env, [result(0, ok), result(1, busy), result(2, unknown)])
        XCTAssertEqual(s.states, [.delivered, .pending, .bounced])
        XCTAssertEqual(s.marks, [0: .delivered, 2: .bounced])
        XCTAssertEqual(s.meta.recipients[1], DeliveryMeta.Recipient(attempts: 1, nextAttemptMillis: 61_000, lastError: "smtp; \(busy)"))
        XCTAssertTrue(s.deferred)
        XCTAssertEqual(s.nextAttemptMillis, 61_000)
        XCTAssertEqual(s.bounces.map(\.finalRecipient), ["c@x.example"])
        XCTAssertEqual(s.bounces.first?.status, EnhancedStatusCode(5, 1, 1))
        XCTAssertEqual(s.laneFeedback, .init(softFailure: false, reason: "smtp; \(busy)"), "something was delivered")
        XCTAssertEqual(s.applied.count, 3)
    }

    func testRetriesBackOffAndExpire() throws {
        let env = envelope([EnvelopeRecipient(address: "a@x.example")])
        var meta = DeliveryMeta()
        meta.recipients[0] = .init(attempts: 3, nextAttemptMillis: 0, lastError: nil)
        let s = try settle(env, [result(0, busy)], meta: meta, now: 10_000)
        XCTAssertEqual(s.meta.recipients[0]?.attempts, 4)
        XCTAssertEqual(s.meta.recipients[0]?.nextAttemptMillis, 10_000 + 480_000, "60 s doubled three times")
        XCTAssertEqual(s.laneFeedback, .init(softFailure: true, reason: "smtp; \(busy)"))
        // Past the queue lifetime: the deferral becomes a bounce, with the reason.
        let late = try settle(env, [result(0, busy)], meta: meta, now: 25 * hour)
        XCTAssertEqual(late.states, [.bounced])
        guard case .bounced(let status, let text) = late.applied[0].verdict else { return XCTFail() }
        XCTAssertEqual(status, EnhancedStatusCode(5, 7, 0))
        XCTAssertTrue(text.hasSuffix("(gave up: queue lifetime exceeded)"))
        XCTAssertFalse(late.deferred)
    }

    func testNotifyVariants() throws {
        let env = envelope([
            EnvelopeRecipient(address: "never@x.example", notify: [.never]),
            EnvelopeRecipient(address: "success@x.example", notify: [.success]),
            EnvelopeRecipient(address: "failure@x.example", notify: [.failure]),
            EnvelopeRecipient(address: "default@x.example"),
        ])
        let s = try settle(env, [result(0, unknown), result(1, ok, dsn: false), result(2, unknown), result(3, unknown)])
        XCTAssertEqual(s.bounces.map(\.finalRecipient), ["failure@x.example", "default@x.example"], "NEVER asks for nothing")
        XCTAssertEqual(s.successes.map(\.finalRecipient), ["success@x.example"], "relayed to a server without DSN: ours to report")
        XCTAssertEqual(s.successes.first?.action, .relayed)
        let withDSN = try settle(env, [result(1, ok, dsn: true)])
        XCTAssertTrue(withDSN.successes.isEmpty, "a server with DSN reports success itself")
    }

    func testReplyRules() throws {
        let r = try rules(
            """
                - { text: "\\\\[TS04\\\\]", action: suspend, for: 2h }
                - { code: 452, action: bounce }
                - { enhanced: "4.7.28", action: reduce, for: 1h, factor: 0.5 }
            """)
        let env = envelope(["a@x.example", "b@x.example", "c@x.example"].map { EnvelopeRecipient(address: $0) })
        // Two recipients match the suspend rule: the lane is suspended once.
        let s = try settle(env, [result(0, busy), result(1, busy)], rules: r)
        XCTAssertEqual(s.laneActions, [.init(lane: "x.example", kind: .suspend, untilMillis: 1000 + 2 * hour, reason: "reply rule matched: \(busy)")])
        XCTAssertEqual(s.states, [.pending, .pending, .pending])
        // A bounce rule turns a deferral into a bounce.
        let full = SMTPReply(452, EnhancedStatusCode(4, 2, 2), "mailbox full")
        let b = try settle(env, [result(2, full)], rules: r)
        XCTAssertEqual(b.states[2], .bounced)
        guard case .bounced(let status, let text) = b.applied[0].verdict else { return XCTFail() }
        XCTAssertEqual(status, EnhancedStatusCode(5, 2, 2))
        XCTAssertTrue(text.hasSuffix("(bounced by a reply rule)"))
        // Reduce, on the enhanced code.
        let g = try settle(env, [result(0, SMTPReply(421, EnhancedStatusCode(4, 7, 28), "unusual rate"))], rules: r)
        XCTAssertEqual(g.laneActions.first?.kind, .reduce(factor: 0.5))
        // A rule never matches a delivery, nor a failure without a server's reply.
        XCTAssertTrue(try settle(env, [result(0, SMTPReply(250, nil, "[TS04] fine"))], rules: r).laneActions.isEmpty)
        let noReply = RecipientResult(
            index: 0, verdict: .deferred(status: EnhancedStatusCode(4, 4, 1), diagnostic: "smtp; 421 4.7.0 [TS04] (as text only)"),
            relay: "none")
        XCTAssertTrue(try settle(env, [noReply], rules: r).laneActions.isEmpty, "typed replies only, never re-parsed text")
    }

    func testDelayWarningOncePerMessage() throws {
        let env = envelope([EnvelopeRecipient(address: "a@x.example"), EnvelopeRecipient(address: "b@x.example", notify: [.failure])])
        let r = try rules(delayWarning: .seconds(3600))
        var meta = DeliveryMeta()
        meta.recipients[1] = .init(attempts: 1, nextAttemptMillis: 0, lastError: "earlier")
        let early = try settle(env, [result(0, busy)], meta: meta, now: hour - 1, rules: r)
        XCTAssertTrue(early.delayWarnings.isEmpty)
        let s = try settle(env, [result(0, busy)], meta: meta, now: hour, rules: r)
        XCTAssertEqual(s.delayWarnings.map(\.finalRecipient), ["a@x.example"], "b asked for failures only")
        XCTAssertEqual(s.delayWarnings.first?.action, .delayed)
        XCTAssertTrue(s.meta.warned)
        let again = try settle(env, [result(0, busy)], meta: s.meta, now: 2 * hour, rules: r)
        XCTAssertTrue(again.delayWarnings.isEmpty, "once")
    }

    func testDeletedNextHostAndRestingResults() throws {
        let env = envelope(["a@x.example", "b@x.example"].map { EnvelopeRecipient(address: $0) })
        // Deleted by the operator while under way: stays deleted, nothing reported.
        let d = try settle(env, [result(0, ok)], states: [.deleted, .pending])
        XCTAssertEqual(d.states, [.deleted, .pending])
        XCTAssertTrue(d.applied.isEmpty && d.marks.isEmpty)
        // A host failure that slipped through is a deferral, as it would have become.
        let n = try settle(env, [RecipientResult(index: 1, verdict: .tryNextHost(.connection("refused")), relay: "none")])
        guard case .deferred(let status, _) = n.applied[0].verdict else { return XCTFail() }
        XCTAssertEqual(status, EnhancedStatusCode(4, 4, 1))
        // Deferred by a resting lane: the lane learns nothing from it.
        let resting = RecipientResult(index: 0, verdict: DeliveryPolicy.exhausted(.connection("x"), note: "resting"), relay: "none", laneResting: true)
        XCTAssertNil(try settle(env, [resting]).laneFeedback)
        // An index out of range (never from a lane of ours) is ignored, not a trap.
        XCTAssertTrue(try settle(env, [RecipientResult(index: 7, verdict: .delivered(ok), relay: "x")]).applied.isEmpty)
    }

    func testBounceOfABounceIsStillDecided() throws {
        // The null sender's mail: the settlement reports the failure like any other; the
        // scheduler then sends it to delivery.postmaster or drops it (no bounce loops).
        let env = envelope([EnvelopeRecipient(address: "a@x.example")], sender: "")
        let s = try settle(env, [result(0, unknown)])
        XCTAssertEqual(s.states, [.bounced])
        XCTAssertEqual(s.bounces.count, 1)
    }
}
