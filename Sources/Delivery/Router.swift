import TernCore

/// Where one recipient's mail goes: which route matched, the next hop, and the lane that
/// carries it. Pure: no DNS here; an MX lane is keyed by the recipient domain.
public struct Route: Sendable, Equatable {
    public enum NextHop: Sendable, Equatable, Hashable {
        /// The recipient domain's MX hosts (or the address of a domain literal).
        case mx(domain: String)
        case smarthost(host: String, port: Int)
    }

    /// The route's name from the config; `default` when no line matched.
    public var name: String
    public var nextHop: NextHop
    public var tls: TLSPolicyName
    public var caFile: String?
    /// The smarthost user, when the route authenticates.
    public var authUser: String?
    public var limits: LaneLimits
    /// The provider whose MX hosts serve the domain, when one matched: its domains share a lane.
    public var provider: String?

    /// One lane per destination. Connections are reused only within a lane, so a lane is
    /// also everything a connection was set up with: two routes that log in to the same
    /// smarthost as different users get two lanes, and mail that leaves from another source
    /// address gets its own lane (`provider:gmail/192.0.2.7`), as providers count
    /// connections and rates per sending IP.
    public var laneKey: String {
        let destination: String
        switch nextHop {
        case .mx(let domain): destination = provider.map { "provider:\($0)" } ?? domain
        case .smarthost(let host, let port):
            let hostPort = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            destination = authUser.map { "\($0)@\(hostPort)" } ?? hostPort
        }
        return limits.sourceAddress.map { "\(destination)/\($0)" } ?? destination
    }
}

/// The ordered `routes` table. The first line whose recipient domains (and sender domains,
/// when it has them) match wins; no match means direct MX delivery.
public struct Router: Sendable {
    public let routes: [RouteConfig]
    public let delivery: DeliveryConfig

    public init(routes: [RouteConfig], delivery: DeliveryConfig) {
        self.routes = routes
        self.delivery = delivery
    }

    public func route(recipient: String, sender: String) -> Route {
        let domain = Self.domain(of: recipient)
        let senderDomain = sender.isEmpty ? nil : Self.domain(of: sender)
        for config in routes where config.domains.contains(where: { Self.matches($0, domain) }) {
            if let senders = config.senderDomains {
                guard let s = senderDomain, senders.contains(where: { Self.matches($0, s) }) else { continue }
            }
            let limits = config.lane?.applied(to: delivery.lane) ?? delivery.lane
            switch config.transport {
            case .mx:
                return Route(name: config.name, nextHop: .mx(domain: domain), tls: delivery.mxTLS, limits: limits)
            case .smarthost:
                let s = config.smarthost!
                return Route(
                    name: config.name, nextHop: .smarthost(host: s.host, port: s.port), tls: s.tls, caFile: s.caFile,
                    authUser: s.auth?.user, limits: limits)
            }
        }
        return Route(name: "default", nextHop: .mx(domain: domain), tls: delivery.mxTLS, limits: delivery.lane)
    }

    /// The domain of an address, lowercased (the text after the last `@`).
    public static func domain(of address: String) -> String {
        guard let at = address.lastIndex(of: "@") else { return "" }
        return String(address[address.index(after: at)...]).lowercased()
    }

    /// `*` matches all; `.example.com` matches its subdomains only; anything else exactly.
    static func matches(_ pattern: String, _ domain: String) -> Bool {
        if pattern == "*" { return true }
        if pattern.hasPrefix(".") { return domain.hasSuffix(pattern) }
        return domain == pattern
    }
}
