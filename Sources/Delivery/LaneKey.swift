/// The name of a lane: one destination, as a connection to it is set up. `gmail.com` (a
/// recipient domain's MX hosts), `provider:gmail` (the MX hosts of every domain a provider
/// serves), `smtp.example.net:587` or `relay@smtp.example.net:587` (a smarthost, per login),
/// each with `/192.0.2.7` when mail leaves from that source address. `tern lanes`, the
/// `lane=` of log lines, metrics and the suspensions file show it as this text.
public struct LaneKey: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public let rawValue: String

    public init(_ rawValue: String) { self.rawValue = rawValue }
    public init(stringLiteral value: String) { self.rawValue = value }

    /// The lane of a provider's MX hosts.
    public static func provider(_ name: String) -> LaneKey { LaneKey("provider:\(name)") }

    /// The lane of a destination, from the given source address when there is one.
    public init(destination: String, sourceAddress: String?) {
        self.rawValue = sourceAddress.map { "\(destination)/\($0)" } ?? destination
    }

    /// This lane, or the same destination from a source address of its own: what an
    /// operator means by naming the destination alone (`tern lanes suspend provider:yahoo`).
    public func isLane(of destination: LaneKey) -> Bool {
        rawValue == destination.rawValue || rawValue.hasPrefix(destination.rawValue + "/")
    }

    /// A recipient domain's own lane (not a provider's, not a smarthost's).
    public var isDomain: Bool { !rawValue.contains(":") && rawValue.contains(".") }

    public var description: String { rawValue }

    public static func < (a: LaneKey, b: LaneKey) -> Bool { a.rawValue < b.rawValue }
}
