import Delivery
import TernCore
import XCTest

final class RouterTests: XCTestCase {
    func config(_ yaml: String) throws -> TernConfig {
        try ConfigLoader.parse("listeners:\n  - { name: mx, kind: smtp, address: \"127.0.0.1:2525\" }\n" + yaml, file: "t.yaml")
    }

    func testFirstMatchWinsAndPatternsMeanWhatTheySay() throws {
        let c = try config(
            """
            routes:
              - { name: partner, domains: [partner.example], transport: mx }
              - name: subs
                domains: [.corp.example]
                transport: smarthost
                smarthost: { host: relay.corp.example, port: 2525, tls: encrypt }
              - name: ses
                domains: ["*"]
                transport: smarthost
                smarthost: { host: email-smtp.example, port: 587 }
            """)
        let router = Router(routes: c.routes, delivery: c.delivery)
        XCTAssertEqual(router.route(recipient: "a@Partner.Example", sender: "s@x.example").nextHop, .mx(domain: "partner.example"))
        let sub = router.route(recipient: "a@eu.corp.example", sender: "")
        XCTAssertEqual(sub.name, "subs")
        XCTAssertEqual(sub.nextHop, .smarthost(host: "relay.corp.example", port: 2525))
        XCTAssertEqual(sub.tls, .encrypt)
        XCTAssertEqual(router.route(recipient: "a@corp.example", sender: "").name, "ses", ".corp.example covers subdomains only")
        let ses = router.route(recipient: "a@gmail.example", sender: "")
        XCTAssertEqual(ses.tls, .verify, "a smarthost verifies by default")
        XCTAssertEqual(ses.laneKey, "email-smtp.example:587")
        var egress = ses
        egress.limits.sourceAddress = "192.0.2.7"
        XCTAssertEqual(egress.laneKey, "email-smtp.example:587/192.0.2.7", "another source address, another lane")
        var google = router.route(recipient: "a@partner.example", sender: "")
        google.provider = "google"
        XCTAssertEqual(google.laneKey, "provider:google")
    }

    func testRoutesToOneSmarthostShareItsLimitsAndProvidersTheirs() throws {
        let c = try config(
            """
            delivery: { lane: { max_connections: 30 } }
            routes:
              - { name: b, domains: [b.example], transport: smarthost, smarthost: { host: ses.example, port: 587 }, lane: { rate: "14/s" } }
              - { name: a, domains: [a.example], transport: smarthost, smarthost: { host: ses.example, port: 587 },
                  lane: { rate: "99/s", max_connections: 4, source_address: 192.0.2.7 } }
              - { name: other, domains: ["*"], transport: smarthost, smarthost: { host: other.example, port: 587 } }
            providers:
              - { name: google, mx: ["*.google.example"], lane: { max_connections: 2 } }
            """)
        let router = Router(routes: c.routes, delivery: c.delivery)
        let b = router.route(recipient: "x@b.example", sender: "")
        let a = router.route(recipient: "x@a.example", sender: "")
        XCTAssertEqual(b.limits.rate, RateLimit(parsing: "14/s"), "the first route that sets a key gives it")
        XCTAssertEqual(a.limits.rate, RateLimit(parsing: "14/s"), "for every route to that smarthost")
        XCTAssertEqual(b.limits.maxConnections, 4, "a key only a later route sets still holds for the lane")
        XCTAssertNil(b.limits.sourceAddress)
        XCTAssertEqual(a.limits.sourceAddress, "192.0.2.7", "the source address stays the route's own")
        XCTAssertEqual(router.route(recipient: "x@z.example", sender: "").limits.maxConnections, 30, "another smarthost: its own")
        XCTAssertEqual(router.limits(ofRoute: "a").rate, RateLimit(parsing: "14/s"))
        XCTAssertEqual(router.limits(ofRoute: "default").maxConnections, 30)

        var mx = Router(routes: [], delivery: c.delivery).route(recipient: "x@hosted.example", sender: "")
        mx.limits.sourceAddress = "192.0.2.9"
        let google = router.limits(provider: c.providers[0], route: mx)
        XCTAssertEqual(google.maxConnections, 2)
        XCTAssertEqual(google.sourceAddress, "192.0.2.9")
    }

    func testReplyRulesMatchCodeEnhancedTextAndLane() throws {
        let c = try config(
            """
            delivery:
              reply_rules:
                - { text: "\\\\[TS04\\\\]", lanes: [provider:yahoo], action: suspend, for: 2h }
                - { code: 4, enhanced: "4.7", action: reduce }
                - { code: 452, action: bounce }
            """)
        let rules = c.delivery.replyRules
        XCTAssertEqual(rules.count, 3)
        let ts04 = "421 4.7.0 [TS04] Messages from 192.0.2.7 temporarily deferred"
        XCTAssertTrue(rules[0].matches(code: 421, enhanced: "4.7.0", text: ts04, lane: "provider:yahoo"))
        XCTAssertTrue(rules[0].matches(code: 421, enhanced: "4.7.0", text: ts04, lane: "provider:yahoo/192.0.2.7"), "its own source address")
        XCTAssertFalse(rules[0].matches(code: 421, enhanced: "4.7.0", text: ts04, lane: "provider:yahoo-jp"))
        XCTAssertFalse(rules[0].matches(code: 421, enhanced: "4.7.0", text: "421 4.7.0 [TS03] x", lane: "provider:yahoo"))
        XCTAssertTrue(rules[1].matches(code: 451, enhanced: "4.7.28", text: "", lane: "x"), "a class and a prefix")
        XCTAssertFalse(rules[1].matches(code: 451, enhanced: "4.70.1", text: "", lane: "x"), "4.7 is not a prefix of 4.70")
        XCTAssertFalse(rules[1].matches(code: 550, enhanced: "4.7.1", text: "", lane: "x"))
        XCTAssertTrue(rules[2].matches(code: 452, enhanced: nil, text: "", lane: "x"))
        XCTAssertThrowsError(try config("delivery:\n  reply_rules:\n    - { action: suspend }\n"), "a rule must match something")
    }

    func testSenderDependentRouteAndDefault() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("router-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let secret = dir.appendingPathComponent("pw").path
        try "s3cret\n".write(toFile: secret, atomically: true, encoding: .utf8)
        chmod(secret, 0o600)
        let c = try config(
            """
            routes:
              - name: tenant-a
                domains: ["*"]
                sender_domains: [tenant-a.example]
                transport: smarthost
                smarthost: { host: smtp.example, auth: { user: a, password_file: \(secret) } }
            """)
        let router = Router(routes: c.routes, delivery: c.delivery)
        let a = router.route(recipient: "x@y.example", sender: "app@tenant-a.example")
        XCTAssertEqual(a.name, "tenant-a")
        XCTAssertEqual(a.laneKey, "a@smtp.example:587", "each login gets its own lane")
        XCTAssertEqual(router.route(recipient: "x@y.example", sender: "app@other.example").name, "default")
        XCTAssertEqual(router.route(recipient: "x@y.example", sender: "").nextHop, .mx(domain: "y.example"), "<> matches no sender route")
        XCTAssertEqual(try c.routes[0].smarthost?.auth?.readPassword(), "s3cret")

        chmod(secret, 0o644)
        XCTAssertThrowsError(try config("routes:\n  - { name: t, domains: [\"*\"], transport: smarthost, smarthost: { host: h, auth: { user: a, password_file: \(secret) } } }\n")) {
            let text = "\($0)"
            XCTAssertTrue(text.contains("routes[0].smarthost.auth.password_file") && text.contains("644"), text)
        }
    }

    func testBadRoutesAreConfigErrors() {
        for (yaml, expected) in [
            ("routes:\n  - { name: r, domains: [\"a b\"], transport: mx }\n", "routes[0].domains"),
            ("routes:\n  - { name: r, domains: [x.example], transport: smarthost }\n", "routes[0].smarthost"),
            ("routes:\n  - { name: r, domains: [x.example], transport: uucp }\n", "must be one of mx, smarthost"),
            ("routes:\n  - { name: r, domains: [x.example], transport: mx }\n  - { name: r, domains: [y.example], transport: mx }\n", "routes[1].name"),
            ("delivery: { retry_first: 10m, retry_maximum: 5m }\n", "delivery.retry_maximum"),
            ("delivery: { lane: { max_conections: 3 } }\n", "delivery.lane.max_conections: unknown key"),
        ] {
            XCTAssertThrowsError(try config(yaml), yaml) { XCTAssertTrue("\($0)".contains(expected), "\($0) should name \(expected)") }
        }
    }
}

final class LaneWindowTests: XCTestCase {
    func testWindowOpensOnSuccessClosesOnFailureAndParksADeadDestination() throws {
        var limits = LaneLimits()
        limits.maxConnections = 6
        limits.initialConnections = 3
        limits.deadTime = ConfigDuration(.seconds(60))
        var w = LaneWindow(limits: limits)
        for _ in 0..<3 {
            XCTAssertTrue(w.mayOpen(now: 0))
            w.opened()
        }
        XCTAssertFalse(w.mayOpen(now: 0), "the window starts at initial_connections")
        for _ in 0..<10 { w.succeeded() }
        XCTAssertEqual(w.window, 6, "and grows one per success up to max_connections")
        XCTAssertTrue(w.mayOpen(now: 0))

        XCTAssertFalse(w.failed(now: 1000))
        XCTAssertEqual(w.window, 5)
        XCTAssertFalse(w.failed(now: 1000))
        XCTAssertTrue(w.failed(now: 1000), "three failures in a row against a window shrunk to three: dead")
        XCTAssertTrue(w.isDead(now: 60_999))
        XCTAssertFalse(w.mayOpen(now: 30_000), "a dead destination is not retried in a tight loop")
        XCTAssertFalse(w.isDead(now: 61_000))
        XCTAssertEqual(w.window, 1, "after the rest, one probe")
        XCTAssertTrue(w.failed(now: 61_000), "a failed probe parks it again at once")
        w.revive()
        XCTAssertTrue(w.mayOpen(now: 61_001) == (w.active < w.window))
    }
}

final class TokenBucketTests: XCTestCase {
    func testBurstThenSteadyRate() {
        var b = TokenBucket(rate: 60, perMillis: 60_000, burst: 3, now: 0)
        XCTAssertEqual([b.take(now: 0), b.take(now: 0), b.take(now: 0)], [0, 0, 0], "the burst goes at once")
        XCTAssertEqual(b.take(now: 0), 1000, "then one a second")
        XCTAssertEqual(b.take(now: 0), 2000, "reservations queue up")
        var c = TokenBucket(rate: 60, perMillis: 60_000, burst: 3, now: 0)
        for _ in 0..<3 { _ = c.take(now: 0) }
        XCTAssertEqual(c.take(now: 1000), 0, "a second later one token is back")
        XCTAssertEqual(c.take(now: 100_000), 0)
        XCTAssertEqual(c.take(now: 100_000), 0)
        XCTAssertEqual(c.take(now: 100_000), 0, "a long pause saves up no more than the burst")
        XCTAssertEqual(c.take(now: 100_000), 1000)
    }

    func testWaitTakesNothingAndRetuningKeepsWhatWasSaved() {
        var b = TokenBucket(rate: 10, perMillis: 60_000, burst: 2, now: 0)
        XCTAssertEqual(b.wait(now: 0), 0)
        XCTAssertEqual(b.wait(now: 0), 0, "asking takes nothing")
        b.takeAvailable(now: 0)
        b.takeAvailable(now: 0)
        XCTAssertEqual(b.wait(now: 0), 6000, "10/min: the next in six seconds")
        XCTAssertEqual(b.wait(now: 5000), 1000)
        XCTAssertEqual(b.wait(now: 6000), 0)

        var full = TokenBucket(rate: 10, perMillis: 1000, burst: 10, now: 0)
        _ = full.take(now: 0)
        var slower = full.retuned(rate: 1, perMillis: 1000, burst: 10, now: 0)
        for _ in 0..<9 { XCTAssertEqual(slower.take(now: 0), 0, "the nine saved tokens stay") }
        XCTAssertEqual(slower.take(now: 0), 1000, "then the new rate")
        var empty = TokenBucket(rate: 10, perMillis: 1000, burst: 10, now: 0)
        for _ in 0..<10 { _ = empty.take(now: 0) }
        var halved = empty.retuned(rate: 5, perMillis: 1000, burst: 10, now: 0)
        XCTAssertEqual(halved.take(now: 0), 200, "a slower rate gives no fresh burst")
    }

    func testRatesParse() {
        XCTAssertEqual(RateLimit(parsing: "60/min"), RateLimit(parsing: "60/m"))
        XCTAssertEqual(RateLimit(parsing: "10/s")?.perMillis, 1000)
        XCTAssertEqual(RateLimit(parsing: "5000/h")?.count, 5000)
        XCTAssertNil(RateLimit(parsing: "fast"))
        XCTAssertNil(RateLimit(parsing: "0/s"))
    }
}

final class LaneBackoffTests: XCTestCase {
    func testBacksOffOnSoftFailuresAndRecoversStepByStep() {
        var limits = LaneLimits()
        limits.maxConnections = 8
        var w = LaneWindow(limits: limits)
        var changes: [Int] = []
        for i in 0..<20 { changes.append(w.record(softFailure: i % 3 != 0)) }  // two in three fail
        XCTAssertEqual(changes.filter { $0 == 1 }.count, 1)
        XCTAssertEqual(w.backoffLevel, 1, "about 67% soft failures: one level down")
        for _ in 0..<10 { _ = w.record(softFailure: true) }
        XCTAssertEqual(w.backoffLevel, 2)
        for _ in 0..<9 { XCTAssertEqual(w.record(softFailure: false), 0) }
        XCTAssertEqual(w.record(softFailure: false), -1, "ten successes in a row: one level back")
        XCTAssertEqual(w.backoffLevel, 1)
        for _ in 0..<10 { _ = w.record(softFailure: false) }
        XCTAssertEqual(w.backoffLevel, 0)
        for _ in 0..<50 { XCTAssertEqual(w.record(softFailure: false), 0) }

        limits.backoffThreshold = 0
        var off = LaneWindow(limits: limits)
        for _ in 0..<40 { XCTAssertEqual(off.record(softFailure: true), 0, "0 turns it off") }
    }

    func testBackoffLowersTheConnectionCeiling() {
        var limits = LaneLimits()
        limits.maxConnections = 8
        limits.initialConnections = 8
        var w = LaneWindow(limits: limits)
        for _ in 0..<10 { _ = w.record(softFailure: true) }
        XCTAssertEqual(w.backoffLevel, 1)
        for _ in 0..<4 { XCTAssertTrue(w.mayOpen(now: 0)); w.opened() }
        XCTAssertFalse(w.mayOpen(now: 0), "level 1: half of 8")
    }

    func testStatesCeilingsAndRatesAsTheyChange() {
        var limits = LaneLimits()
        limits.maxConnections = 8
        limits.rate = RateLimit(parsing: "100/min")
        var w = LaneWindow(limits: limits, now: 0)
        XCTAssertEqual(w.state(now: 0), .active)
        XCTAssertTrue(w.isQuiet(now: 0))
        XCTAssertEqual(w.effectiveRate(now: 0), RateLimit(parsing: "100/min"))

        w.reduce(factor: 0.25, until: 1000)
        XCTAssertEqual(w.state(now: 500), .reduced(until: 1000))
        XCTAssertEqual(w.connectionCeiling(now: 500), 2)
        XCTAssertEqual(w.effectiveRate(now: 500)?.count, 25)
        XCTAssertFalse(w.isQuiet(now: 500), "a reduced lane is remembered")
        XCTAssertEqual(w.connectionCeiling(now: 1000), 8, "the reduction ends by itself")
        XCTAssertTrue(w.expire(now: 1000).reduction)
        XCTAssertFalse(w.expire(now: 1001).reduction)

        for _ in 0..<10 { _ = w.record(softFailure: true) }
        XCTAssertEqual(w.state(now: 2000), .backingOff(level: 1))
        XCTAssertEqual(w.effectiveRate(now: 2000)?.count, 50)
        w.reduce(factor: 0.75, until: 3000)
        XCTAssertEqual(w.connectionCeiling(now: 2500), 4, "the lower of backoff and reduction")
        XCTAssertEqual(w.effectiveRate(now: 2500)?.count, 50)

        w.suspend(until: 5000)
        XCTAssertEqual(w.state(now: 4000), .suspended(until: 5000))
        w.succeeded()
        XCTAssertEqual(w.state(now: 4000), .suspended(until: 5000), "a connection that was already open does not end a suspension")
        XCTAssertFalse(w.mayOpen(now: 4000))
        w.revive()
        XCTAssertEqual(w.state(now: 4000), .backingOff(level: 1), "resumed; the reduction is over, the backoff stays")

        var dead = LaneWindow(limits: LaneLimits(), now: 0)
        while !dead.failed(now: 0) {}
        XCTAssertEqual(dead.state(now: 1), .dead(until: 300_000))
        XCTAssertFalse(dead.failed(now: 2), "failures during a rest do not extend it")
    }

    func testConnectionRateGatesNewConnections() {
        var limits = LaneLimits()
        limits.connectionRate = RateLimit(parsing: "6/min")
        limits.connectionBurst = 2
        var w = LaneWindow(limits: limits, now: 0)
        XCTAssertEqual(w.connectionWait(now: 0), 0)
        XCTAssertEqual(w.takeConnection(now: 0), 0)
        XCTAssertEqual(w.takeConnection(now: 0), 0)
        XCTAssertEqual(w.connectionWait(now: 0), 10_000, "6/min: one every ten seconds after the burst")
        XCTAssertEqual(w.takeConnection(now: 0), 10_000, "a connection that must open anyway waits its turn")
        XCTAssertEqual(w.takeConnection(now: 0), 20_000)

        var slower = limits
        slower.connectionRate = RateLimit(parsing: "1/min")
        w.update(limits: slower, now: 0)
        XCTAssertEqual(w.connectionWait(now: 0), 180_000, "reservations made stay, at the new rate")
        var unlimited = LaneWindow(limits: LaneLimits())
        XCTAssertEqual(unlimited.connectionWait(now: 0), 0, "no connection rate: no wait")
    }
}

final class LaneKeyTests: XCTestCase {
    func testADestinationNamesItsLanesFromEverySourceAddress() {
        let yahoo = LaneKey.provider("yahoo")
        XCTAssertEqual(yahoo.rawValue, "provider:yahoo")
        XCTAssertTrue(yahoo.isLane(of: yahoo))
        XCTAssertTrue(LaneKey(destination: "provider:yahoo", sourceAddress: "192.0.2.7").isLane(of: yahoo))
        XCTAssertFalse(LaneKey("provider:yahoo2").isLane(of: yahoo), "a longer name is another destination")
        XCTAssertFalse(yahoo.isLane(of: LaneKey(destination: "provider:yahoo", sourceAddress: "192.0.2.7")))
    }

    func testOnlyARecipientDomainIsADomainLane() {
        XCTAssertTrue(LaneKey("example.org").isDomain)
        XCTAssertFalse(LaneKey("provider:gmail").isDomain)
        XCTAssertFalse(LaneKey("smtp.example.net:587").isDomain)
        XCTAssertFalse(LaneKey("localhost").isDomain)
    }

    /// The lane key is kept, not built on each use: it must follow every field it is made of.
    func testTheLaneKeyFollowsTheFieldsItIsMadeOf() {
        var route = Route(name: "r", nextHop: .mx(domain: "example.org"), tls: .may, limits: LaneLimits())
        XCTAssertEqual(route.laneKey, "example.org")
        route.provider = "google"
        XCTAssertEqual(route.laneKey, "provider:google")
        route.limits.sourceAddress = "192.0.2.7"
        XCTAssertEqual(route.laneKey, "provider:google/192.0.2.7")
        route.limits.maxConnections = 3
        XCTAssertEqual(route.laneKey, "provider:google/192.0.2.7")
        route.nextHop = .smarthost(host: "::1", port: 2525)
        XCTAssertEqual(route.laneKey, "[::1]:2525/192.0.2.7")
        route.authUser = "relay"
        XCTAssertEqual(route.laneKey, "relay@[::1]:2525/192.0.2.7")
        route.limits.sourceAddress = nil
        XCTAssertEqual(route.laneKey, "relay@[::1]:2525")
    }
}
