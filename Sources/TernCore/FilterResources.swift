import Dispatch
import NIOConcurrencyHelpers

/// The bytes of messages held in memory for filters, across all sessions, against one
/// budget: a message that would take the total past it is not buffered, and its client gets
/// `452 4.3.1` instead of the process growing without bound.
public final class MessageMemoryBudget: Sendable {
    public let limit: Int
    private let used = NIOLockedValueBox(0)

    public init(limit: Int) { self.limit = limit }

    public var inUse: Int { used.withLockedValue { $0 } }

    /// Takes `bytes` from the budget for `reservation`, or returns false (taking nothing).
    public func grow(_ reservation: Reservation, by bytes: Int) -> Bool {
        let granted = used.withLockedValue { u -> Bool in
            guard u + bytes <= limit else { return false }
            u += bytes
            return true
        }
        if granted { reservation.bytes.withLockedValue { $0 += bytes } }
        return granted
    }

    fileprivate func release(_ bytes: Int) {
        used.withLockedValue { $0 -= bytes }
    }

    public func reserve() -> Reservation { Reservation(budget: self) }

    /// One message's share; given back when the reservation goes away, however the message
    /// ends (queued, refused, or the client gone mid-DATA).
    public final class Reservation: Sendable {
        fileprivate let bytes = NIOLockedValueBox(0)
        private let budget: MessageMemoryBudget

        fileprivate init(budget: MessageMemoryBudget) { self.budget = budget }

        deinit { budget.release(bytes.withLockedValue { $0 }) }
    }
}

/// CPU-heavy filter work (pattern matching over headers, hashing a body) runs here, on
/// Dispatch's threads, never on the cooperative pool that every session's task and the
/// event loops' hand-offs share: one large message must not make other clients wait.
public enum FilterWork {
    public static func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global(qos: .userInitiated).async {
                continuation.resume(with: Result { try body() })
            }
        }
    }
}
