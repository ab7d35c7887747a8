#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Spool
import TernCore

#if canImport(Glibc)
import Glibc
#endif

enum QueueListing {
    /// Postfix `mailq`-like: one block per message, recipients indented below.
    static func table(_ messages: [QueuedMessage]) -> String {
        var out = "-Queue ID-        --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        var total = 0
        for m in messages {
            total += m.size
            let size = String(m.size)
            out += m.id.rawValue + "  " + String(repeating: " ", count: max(0, 8 - size.count)) + size
            out += " " + arrival(m.envelope.arrivalMillis) + " " + (m.envelope.sender.isEmpty ? "<>" : m.envelope.sender) + "\n"
            for r in m.envelope.recipients { out += String(repeating: " ", count: 48) + r.address + "\n" }
            out += "\n"
        }
        out += "-- \(total / 1024) Kbytes in \(messages.count) Request\(messages.count == 1 ? "" : "s").\n"
        return out
    }

    static func arrival(_ millis: Int64) -> String {
        var seconds = time_t(millis / 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%SZ", &parts)
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func json(_ messages: [QueuedMessage]) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try encoder.encode(messages), as: UTF8.self)
    }
}
