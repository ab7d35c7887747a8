#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Spool
import TernCore

/// A queued message as `tern queue list` and `show` print it.
struct ListedMessage: Encodable {
    struct Recipient: Encodable {
        var address: String
        /// pending (not tried yet), deferred, delivered, bounced, deleted.
        var state: String
        var attempts: Int
        var nextAttempt: String?
        var lastError: String?

        enum CodingKeys: String, CodingKey {
            case address, state, attempts
            case nextAttempt = "next_attempt"
            case lastError = "last_error"
        }
    }

    var id: String
    var size: Int
    var held: Bool
    var envelope: Envelope
    var recipients: [Recipient]

    init(_ m: SpooledMessage) {
        id = m.id.rawValue
        size = m.contentSize
        held = m.meta.held
        envelope = m.envelope
        recipients = m.envelope.recipients.enumerated().map { i, r in
            let meta = m.meta.recipients[i]
            let state: String
            switch m.states[i] {
            case .pending: state = meta == nil ? "pending" : "deferred"
            case .delivered: state = "delivered"
            case .bounced: state = "bounced"
            case .deleted: state = "deleted"
            }
            return Recipient(
                address: r.address, state: state, attempts: meta?.attempts ?? 0,
                nextAttempt: m.states[i] == .pending ? meta.map { QueueListing.time($0.nextAttemptMillis) } : nil, lastError: meta?.lastError)
        }
    }
}

enum QueueListing {
    /// Postfix `mailq`-like: one block per message, recipients indented below with their
    /// state; a deferred recipient's last error and next attempt below it.
    static func table(_ messages: [SpooledMessage]) -> String {
        var out = "-Queue ID-        --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        var total = 0
        for m in messages {
            let listed = ListedMessage(m)
            total += m.contentSize
            let size = String(m.contentSize)
            out += m.id.rawValue + (m.meta.held ? "! " : "  ") + String(repeating: " ", count: max(0, 8 - size.count)) + size
            out += " " + time(m.envelope.arrivalMillis) + " " + (m.envelope.sender.isEmpty ? "<>" : m.envelope.sender) + "\n"
            for r in listed.recipients {
                out += String(repeating: " ", count: 48) + r.address + "  [" + r.state
                if r.attempts > 0 { out += ", \(r.attempts) attempt\(r.attempts == 1 ? "" : "s")" }
                if let next = r.nextAttempt { out += ", next \(next)" }
                out += "]\n"
                if let e = r.lastError { out += String(repeating: " ", count: 50) + "(" + e + ")\n" }
            }
            out += "\n"
        }
        out += "-- \(total / 1024) Kbytes in \(messages.count) Request\(messages.count == 1 ? "" : "s").\n"
        return out
    }

    static func time(_ millis: Int64) -> String {
        MailDate.utc(time_t(millis / 1000))
    }

    static func json(_ value: some Encodable) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}
