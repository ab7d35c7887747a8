#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOConcurrencyHelpers

/// A queue id: 16 characters of Crockford base32, the first 11 the arrival time in
/// microseconds, the last 5 a counter, so that ids sort by arrival as plain strings and two
/// messages never share one, even within one microsecond.
public struct QueueID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: String

    public init?(_ text: String) {
        guard text.utf8.count == 16, text.utf8.allSatisfy({ QueueID.alphabet.contains($0) }) else { return nil }
        rawValue = text
    }

    fileprivate init(unchecked text: String) { rawValue = text }

    public var description: String { rawValue }
    public static func < (a: QueueID, b: QueueID) -> Bool { a.rawValue < b.rawValue }

    /// Crockford's base32: digits and upper-case letters without I, L, O, U; ASCII order is
    /// numeric order.
    static let alphabet: [UInt8] = Array("0123456789ABCDEFGHJKMNPQRSTVWXYZ".utf8)
}

/// Makes queue ids that grow strictly, even if the wall clock steps back.
public final class QueueIDGenerator: Sendable {
    private struct State {
        var lastMicros: UInt64 = 0
        var counter: UInt64 = 0
    }
    private let state = NIOLockedValueBox(State())

    public init() {}

    public func next() -> QueueID {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let micros = UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1000
        let (t, n) = state.withLockedValue { s -> (UInt64, UInt64) in
            if micros > s.lastMicros {
                s.lastMicros = micros
                s.counter = 0
            } else {
                s.counter += 1
                if s.counter >= 1 << 25 {  // 5 base32 digits used up: borrow the next microsecond
                    s.lastMicros += 1
                    s.counter = 0
                }
            }
            return (s.lastMicros, s.counter)
        }
        var chars = [UInt8](repeating: 0, count: 16)
        var v = t
        for i in stride(from: 10, through: 0, by: -1) {
            chars[i] = QueueID.alphabet[Int(v & 31)]
            v >>= 5
        }
        v = n
        for i in stride(from: 15, through: 11, by: -1) {
            chars[i] = QueueID.alphabet[Int(v & 31)]
            v >>= 5
        }
        return QueueID(unchecked: String(decoding: chars, as: UTF8.self))
    }
}
