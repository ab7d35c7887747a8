import NIOCore

/// A deadline on one event loop that moves often (each command, each reply) without a timer
/// each time it moves. A timer is scheduled only when none would fire by the new deadline;
/// when one fires early, because the deadline moved later since, the owner schedules it again
/// for what is left. So a session's or a connection's many deadlines cost about one timer per
/// timeout period instead of a schedule and a cancel per line, and the deadline itself is
/// unchanged: it is never an idle timer, only the time set last.
///
/// Used by the channel handlers, on their loop only.
public struct MovingDeadline {
    private var due: NIODeadline?
    private var timer: Scheduled<Void>?
    private var timerAt = NIODeadline.distantPast

    public enum Fired: Equatable {
        /// The deadline passed.
        case expired
        /// The deadline moved later: schedule again for it.
        case later(NIODeadline)
        /// No deadline runs now.
        case none
    }

    public init() {}

    /// The deadline now, if one runs.
    public var deadline: NIODeadline? { due }

    /// Sets the deadline; `schedule` makes a timer for the time given, and is called only
    /// when no timer would fire by then.
    public mutating func set(_ due: NIODeadline, schedule: (NIODeadline) -> Scheduled<Void>) {
        self.due = due
        if timer != nil, timerAt <= due { return }
        timer?.cancel()
        timerAt = due
        timer = schedule(due)
    }

    /// No deadline runs until the next `set`; a timer already scheduled fires to no effect.
    public mutating func clear() { due = nil }

    /// No deadline, and no timer.
    public mutating func cancel() {
        due = nil
        timer?.cancel()
        timer = nil
    }

    /// The timer fired at `now`.
    public mutating func fired(now: NIODeadline = .now()) -> Fired {
        timer = nil
        guard let due else { return .none }
        if now >= due {
            self.due = nil
            return .expired
        }
        return .later(due)
    }
}
