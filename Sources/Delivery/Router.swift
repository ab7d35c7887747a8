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
    public var nextHop: NextHop { didSet { laneKey = makeLaneKey() } }
    public var tls: TLSPolicyName
    public var caFile: String?
    /// The smarthost user, when the route authenticates.
    public var authUser: String? { didSet { laneKey = makeLaneKey() } }
    public var limits: LaneLimits {
        didSet { if limits.sourceAddress != oldValue.sourceAddress { laneKey = makeLaneKey() } }
    }
    /// The provider whose MX hosts serve the domain, when one matched: its domains share a lane.
    public var provider: String? { didSet { laneKey = makeLaneKey() } }

    /// One lane per destination. Connections are reused only within a lane, so a lane is
    /// also everything a connection was set up with: two routes that log in to the same
    /// smarthost as different users get two lanes, and mail that leaves from another source
    /// address gets its own lane (`provider:gmail/192.0.2.7`), as providers count
    /// connections and rates per sending IP. Kept up to date as the fields it is made of
    /// change: it is built from strings, and the scheduler asks for it several times per
    /// message.
    public private(set) var laneKey = LaneKey("")

    public init(
        name: String, nextHop: NextHop, tls: TLSPolicyName, caFile: String? = nil, authUser: String? = nil,
        limits: LaneLimits, provider: String? = nil
    ) {
        self.name = name
        self.nextHop = nextHop
        self.tls = tls
        self.caFile = caFile
        self.authUser = authUser
        self.limits = limits
        self.provider = provider
        self.laneKey = makeLaneKey()
    }

    private func makeLaneKey() -> LaneKey {
        let destination: String
        switch nextHop {
        case .mx(let domain): destination = provider.map { LaneKey.provider($0).rawValue } ?? domain
        case .smarthost(let host, let port):
            let hostPort = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            destination = authUser.map { "\($0)@\(hostPort)" } ?? hostPort
        }
        return LaneKey(destination: destination, sourceAddress: limits.sourceAddress)
    }
}

/// The ordered `routes` table. The first line whose recipient domains (and sender domains,
/// when it has them) match wins; no match means direct MX delivery.
public struct Router: Sendable {
    public let routes: [RouteConfig]
    public let delivery: DeliveryConfig

    /// Each route's lane limits, worked out once. Routes to the same smarthost (host, port
    /// and login) share a lane, so they share its limits too: each key comes from the first
    /// route in the table that sets it, whichever route's mail reaches the lane first. Only
    /// `source_address` stays each route's own (it makes a lane of its own).
    private let limits: [LaneLimits]

    public init(routes: [RouteConfig], delivery: DeliveryConfig) {
        self.routes = routes
        self.delivery = delivery
        func destination(_ r: RouteConfig) -> String? {
            guard r.transport == .smarthost, let s = r.smarthost else { return nil }
            return "\(s.auth?.user ?? "")@\(s.host):\(s.port)"
        }
        var limits = routes.map { $0.lane?.applied(to: delivery.lane) ?? delivery.lane }
        for i in routes.indices {
            guard let target = destination(routes[i]) else { continue }
            var merged = delivery.lane
            for j in routes.indices.reversed() where destination(routes[j]) == target {
                merged = routes[j].lane?.applied(to: merged) ?? merged
            }
            merged.sourceAddress = limits[i].sourceAddress
            limits[i] = merged
        }
        self.limits = limits
    }

    /// The lane limits of the route with this name (`default`: `delivery.lane`).
    public func limits(ofRoute name: String) -> LaneLimits {
        routes.firstIndex(where: { $0.name == name }).map { limits[$0] } ?? delivery.lane
    }

    /// The limits of a provider's lane: `delivery.lane` with the provider's keys. A route's
    /// own limits do not apply (every route into the provider shares its lane), except its
    /// `source_address` when the provider sets none.
    public func limits(provider: ProviderConfig, route: Route) -> LaneLimits {
        var l = provider.lane?.applied(to: delivery.lane) ?? delivery.lane
        if provider.lane?.sourceAddress == nil { l.sourceAddress = route.limits.sourceAddress }
        return l
    }

    public func route(recipient: String, sender: String) -> Route {
        let domain = Self.domain(of: recipient)
        let senderDomain = sender.isEmpty ? nil : Self.domain(of: sender)
        for (i, config) in routes.enumerated() where config.domains.contains(where: { Self.matches($0, domain) }) {
            if let senders = config.senderDomains {
                guard let s = senderDomain, senders.contains(where: { Self.matches($0, s) }) else { continue }
            }
            let limits = self.limits[i]
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

    /// The route of each smarthost line of the table, as mail for it would get it (to make
    /// a smarthost's lane before its first mail).
    public func smarthostRoutes() -> [Route] {
        routes.indices.compactMap { i in
            guard routes[i].transport == .smarthost, let s = routes[i].smarthost else { return nil }
            return Route(
                name: routes[i].name, nextHop: .smarthost(host: s.host, port: s.port), tls: s.tls, caFile: s.caFile, authUser: s.auth?.user,
                limits: limits[i])
        }
    }

    /// The lane of a provider's mail by direct MX delivery, before any of it has come (an
    /// operator suspends a provider ahead of time).
    public func route(provider: ProviderConfig) -> Route {
        var route = Route(name: "default", nextHop: .mx(domain: ""), tls: delivery.mxTLS, limits: delivery.lane)
        route.limits = limits(provider: provider, route: route)
        route.provider = provider.name
        return route
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
