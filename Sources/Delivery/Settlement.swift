import SMTPProtocol
import Spool
import TernCore

/// What became of one recipient of a job, as a lane reports it.
public struct RecipientResult: Sendable, Equatable {
    public var index: Int
    public var verdict: RecipientVerdict
    /// The server's reply behind the verdict, when a server gave one: reply rules match on it.
    public var reply: SMTPReply?
    /// `host[ip]:port` of the server that gave the verdict, or `none`.
    public var relay: String
    /// `dns; host` for the DSN's Remote-MTA.
    public var remoteMTA: String?
    /// Delivered to a server that does not offer DSN: NOTIFY=SUCCESS is ours to answer.
    public var relayedWithoutDSN = false
    /// Not attempted: the lane was resting (dead or suspended) and deferred the job itself.
    /// Such a result tells the lane nothing new about the destination.
    public var laneResting = false

    public init(
        index: Int, verdict: RecipientVerdict, reply: SMTPReply? = nil, relay: String, remoteMTA: String? = nil,
        relayedWithoutDSN: Bool = false, laneResting: Bool = false
    ) {
        self.index = index
        self.verdict = verdict
        self.reply = reply
        self.relay = relay
        self.remoteMTA = remoteMTA
        self.relayedWithoutDSN = relayedWithoutDSN
        self.laneResting = laneResting
    }

    /// The reply inside an attempt's outcome, if it was one.
    public static func reply(of outcome: AttemptOutcome) -> SMTPReply? {
        if case .reply(let r) = outcome { return r }
        return nil
    }
}

/// The settlement of one finished job: from a message's state and the job's results, what
/// the spool must record, what the sender must be told, and what the lane must learn. The
/// whole decision, and nothing but the decision: the scheduler carries it out (spool writes,
/// DSNs, lane calls, logs). Reply rules and the queue lifetime apply here, once, on typed
/// replies.
/// - SeeAlso: Postfix `qmgr_deliver.c` / `qmgr_defer.c` (what a delivery agent's status means
///   for the queue file), RFC 3461 §4.1 (NOTIFY), RFC 3464 (what a DSN reports)
public struct Settlement: Sendable {
    /// A verdict as it finally stands (after reply rules and expiry), for the log and metrics.
    public struct Applied: Sendable, Equatable {
        public var result: RecipientResult
        public var verdict: RecipientVerdict
    }

    /// Slow down or stop the lane, as a reply rule says.
    public struct LaneAction: Sendable, Equatable {
        public enum Kind: Sendable, Equatable {
            case suspend
            case reduce(factor: Double)
        }
        public var lane: LaneKey
        public var kind: Kind
        public var untilMillis: Int64
        public var reason: String
    }

    /// What the lane's automatic back-off learns from this job.
    public struct LaneFeedback: Sendable, Equatable {
        /// No recipient was delivered and at least one got a temporary failure.
        public var softFailure: Bool
        public var reason: String
    }

    public var applied: [Applied] = []
    /// The message's recipient states and delivery notes after this job.
    public var states: [RecipientState]
    public var meta: DeliveryMeta
    /// States that became final with this job: to be marked in the queue file.
    public var marks: [Int: RecipientState] = [:]
    /// DSN recipients to report to the sender: failures, delays (one warning per message),
    /// and successes that a server without DSN could not report itself.
    public var bounces: [DeliveryStatusNotification.Recipient] = []
    public var delayWarnings: [DeliveryStatusNotification.Recipient] = []
    public var successes: [DeliveryStatusNotification.Recipient] = []
    public var laneActions: [LaneAction] = []
    public var laneFeedback: LaneFeedback?
    /// Some recipient was deferred: the message waits for `nextAttemptMillis`.
    public var deferred = false
    /// The earliest next attempt of any deferred recipient.
    public var nextAttemptMillis: Int64?
    /// The last reply or error of the job, for `tern lanes`.
    public var lastReply: String?

    /// What the settlement needs to know besides the message.
    public struct Rules: Sendable {
        public var replyRules: [ReplyRule]
        public var retry: RetrySchedule
        /// Warn the sender once a message has waited this long (`delivery.delay_warning`).
        public var delayWarning: Duration?

        public init(replyRules: [ReplyRule], retry: RetrySchedule, delayWarning: Duration?) {
            self.replyRules = replyRules
            self.retry = retry
            self.delayWarning = delayWarning
        }
    }

    public init(
        envelope: Envelope, states: [RecipientState], meta: DeliveryMeta, results: [RecipientResult], lane: LaneKey, now: Int64,
        rules: Rules, random: inout some RandomNumberGenerator
    ) {
        self.states = states
        self.meta = meta
        var seenActions = Set<String>()
        for result in results {
            guard result.index >= 0, result.index < envelope.recipients.count else { continue }
            // Deleted by the operator while under way: whatever happened, it is final now.
            if states[result.index] == .deleted { continue }
            var verdict = result.verdict
            if case .tryNextHost(let outcome) = verdict {
                // A lane reports a host failure only once no host is left; should one slip
                // through, it is what it would have become.
                verdict = DeliveryPolicy.exhausted(outcome, note: nil)
            }
            if let reply = result.reply, verdict.isFailure,
                let rule = rules.replyRules.first(where: { $0.matches(reply, lane: lane) })
            {
                let reason = "reply rule matched: \(reply)"
                switch rule.action {
                case .bounce:
                    if case .deferred(let status, let diagnostic) = verdict {
                        verdict = .bounced(
                            status: EnhancedStatusCode(5, status.subject, status.detail), diagnostic: diagnostic + " (bounced by a reply rule)")
                    }
                case .suspend, .reduce:
                    // Once per rule per job, however many recipients matched it.
                    if seenActions.insert("\(rule.action) \(rule.duration)").inserted {
                        let until = now + Self.millis(rule.duration.duration)
                        laneActions.append(
                            LaneAction(
                                lane: lane, kind: rule.action == .suspend ? .suspend : .reduce(factor: rule.factor), untilMillis: until,
                                reason: reason))
                    }
                }
            }
            if case .deferred = verdict, rules.retry.hasExpired(arrivalMillis: envelope.arrivalMillis, nowMillis: now) {
                verdict = DeliveryPolicy.expire(verdict)
            }
            applied.append(Applied(result: result, verdict: verdict))
            let recipient = envelope.recipients[result.index]
            switch verdict {
            case .delivered(let reply):
                lastReply = reply.description
                self.states[result.index] = .delivered
                marks[result.index] = .delivered
                self.meta.recipients[result.index] = nil
                // RFC 3461 §5.2.2.2: a server without DSN cannot report success itself.
                if result.relayedWithoutDSN, recipient.notify?.contains(.success) == true {
                    successes.append(
                        .init(
                            finalRecipient: recipient.address, originalRecipient: recipient.orcpt, action: .relayed,
                            status: reply.enhanced ?? EnhancedStatusCode(2, 0, 0), remoteMTA: result.remoteMTA, diagnostic: "smtp; \(reply)"))
                }
            case .bounced(let status, let diagnostic):
                lastReply = diagnostic
                self.states[result.index] = .bounced
                marks[result.index] = .bounced
                if Self.wants(recipient.notify, .failure) {
                    bounces.append(
                        .init(
                            finalRecipient: recipient.address, originalRecipient: recipient.orcpt, action: .failed, status: status,
                            remoteMTA: result.remoteMTA, diagnostic: diagnostic))
                }
            case .deferred(_, let diagnostic):
                lastReply = diagnostic
                deferred = true
                let previous = self.meta.recipients[result.index]?.attempts ?? 0
                let delay = rules.retry.delay(afterAttempts: previous + 1, using: &random)
                self.meta.recipients[result.index] = DeliveryMeta.Recipient(
                    attempts: previous + 1, nextAttemptMillis: now + Self.millis(delay), lastError: diagnostic)
            case .tryNextHost:
                break  // turned into a deferral above
            }
        }
        delayWarnings = Self.delayWarnings(envelope: envelope, states: self.states, meta: &self.meta, now: now, after: rules.delayWarning)
        if deferred { nextAttemptMillis = self.meta.recipients.values.map(\.nextAttemptMillis).min() }
        // The lane's back-off learns from attempts only, not from its own deferrals while resting.
        if !results.contains(where: \.laneResting) {
            var soft: String?
            var delivered = false
            for r in results {
                switch r.verdict {
                case .delivered: delivered = true
                case .deferred(let status, let d) where status.klass == 4: soft = d
                default: break
                }
            }
            laneFeedback = LaneFeedback(softFailure: !delivered && soft != nil, reason: soft ?? "")
        }
    }

    /// NOTIFY=NEVER asks for nothing; without NOTIFY, failures (and delays) are reported.
    static func wants(_ notify: DSNNotify?, _ kind: DSNNotify) -> Bool {
        guard let notify else { return true }
        return notify.contains(kind)
    }

    /// One delay warning per message, once it has waited `after`, for the recipients still
    /// pending that were tried and asked for (or did not refuse) delay notices.
    static func delayWarnings(
        envelope: Envelope, states: [RecipientState], meta: inout DeliveryMeta, now: Int64, after: Duration?
    ) -> [DeliveryStatusNotification.Recipient] {
        guard let after, !meta.warned, now - envelope.arrivalMillis >= millis(after) else { return [] }
        var out: [DeliveryStatusNotification.Recipient] = []
        for (i, state) in states.enumerated() where state == .pending && i < envelope.recipients.count {
            let r = envelope.recipients[i]
            guard let m = meta.recipients[i], wants(r.notify, .delay) else { continue }
            out.append(
                .init(
                    finalRecipient: r.address, originalRecipient: r.orcpt, action: .delayed, status: EnhancedStatusCode(4, 0, 0),
                    diagnostic: m.lastError))
        }
        if !out.isEmpty { meta.warned = true }
        return out
    }

    static func millis(_ d: Duration) -> Int64 {
        d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    }
}

extension RecipientVerdict {
    var isFailure: Bool {
        switch self {
        case .deferred, .bounced, .tryNextHost: return true
        case .delivered: return false
        }
    }
}

extension ReplyRule {
    /// Whether the rule matches a server's reply on `lane`.
    public func matches(_ reply: SMTPReply, lane: LaneKey) -> Bool {
        matches(code: reply.code, enhanced: reply.enhanced?.description, text: reply.description, lane: lane.rawValue)
    }
}
