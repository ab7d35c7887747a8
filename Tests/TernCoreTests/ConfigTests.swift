import XCTest

@testable import TernCore

final class ConfigValueTests: XCTestCase {
    func testByteSize() {
        XCTAssertEqual(ByteSize(parsing: "10MB")?.bytes, 10 << 20)
        XCTAssertEqual(ByteSize(parsing: "512kb")?.bytes, 512 << 10)
        XCTAssertEqual(ByteSize(parsing: "1G")?.bytes, 1 << 30)
        XCTAssertEqual(ByteSize(parsing: "1000")?.bytes, 1000)
        XCTAssertNil(ByteSize(parsing: "ten"))
        XCTAssertNil(ByteSize(parsing: "-1MB"))
        XCTAssertNil(ByteSize(parsing: "99999999999999999GB"))
        XCTAssertEqual(ByteSize(bytes: 10 << 20).description, "10MB")
    }

    func testDuration() {
        XCTAssertEqual(ConfigDuration(parsing: "5m")?.duration, .seconds(300))
        XCTAssertEqual(ConfigDuration(parsing: "500ms")?.duration, .milliseconds(500))
        XCTAssertEqual(ConfigDuration(parsing: "2d")?.duration, .seconds(172_800))
        XCTAssertNil(ConfigDuration(parsing: "5"))
        XCTAssertNil(ConfigDuration(parsing: "5 minutes"))
        XCTAssertEqual(ConfigDuration(.seconds(600)).description, "10m")
    }

    func testCIDR() throws {
        let net = try XCTUnwrap(CIDR(parsing: "10.0.0.0/8"))
        XCTAssertTrue(net.contains(IPAddress(parsing: "10.1.2.3")!))
        XCTAssertFalse(net.contains(IPAddress(parsing: "11.0.0.1")!))
        XCTAssertTrue(net.contains(IPAddress(parsing: "::ffff:10.9.9.9")!), "IPv4-mapped IPv6")
        let odd = try XCTUnwrap(CIDR(parsing: "192.168.4.0/22"))
        XCTAssertTrue(odd.contains(IPAddress(parsing: "192.168.7.255")!))
        XCTAssertFalse(odd.contains(IPAddress(parsing: "192.168.8.0")!))
        let v6 = try XCTUnwrap(CIDR(parsing: "fc00::/7"))
        XCTAssertTrue(v6.contains(IPAddress(parsing: "fd12::1")!))
        XCTAssertFalse(v6.contains(IPAddress(parsing: "fe80::1")!))
        XCTAssertFalse(v6.contains(IPAddress(parsing: "10.0.0.1")!))
        XCTAssertTrue(CIDR(parsing: "::1")!.contains(IPAddress(parsing: "::1")!))
        XCTAssertTrue(CIDR(parsing: "0.0.0.0/0")!.contains(IPAddress(parsing: "8.8.8.8")!))
        XCTAssertNil(CIDR(parsing: "10.0.0.0/33"))
        XCTAssertNil(CIDR(parsing: "10.0.0/8"))
        XCTAssertNil(CIDR(parsing: "::1/129"))
    }

    func testListenAddress() {
        XCTAssertEqual(ListenAddress(parsing: "127.0.0.1:2525"), ListenAddress(host: "127.0.0.1", port: 2525))
        XCTAssertEqual(ListenAddress(parsing: "[::1]:25"), ListenAddress(host: "::1", port: 25))
        XCTAssertEqual(ListenAddress(parsing: "*:587"), ListenAddress(host: "::", port: 587))
        XCTAssertNil(ListenAddress(parsing: "127.0.0.1"))
        XCTAssertNil(ListenAddress(parsing: "127.0.0.1:70000"))
        XCTAssertNil(ListenAddress(parsing: "example.com:25"))
        XCTAssertNil(ListenAddress(parsing: "::1:25"))
    }
}

final class ConfigLoaderTests: XCTestCase {
    private let base = "listeners:\n  - { name: mx, kind: smtp, address: \"127.0.0.1:2525\" }\n"

    private func error(_ yaml: String) -> ConfigError? {
        do {
            _ = try ConfigLoader.parse(yaml, file: "t.yaml")
            return nil
        } catch {
            return error
        }
    }

    func testDefaults() throws {
        let config = try ConfigLoader.parse(base, file: "t.yaml")
        XCTAssertEqual(config.spool, "var/spool")
        XCTAssertEqual(config.limits.maxMessageSize.bytes, 10 << 20)
        XCTAssertEqual(config.access.mynetworks.map(\.description), ["127.0.0.0/8", "::1/128"])
        XCTAssertEqual(config.access.bareLineEndings, .normalizeTrusted)
        XCTAssertFalse(config.hostname.isEmpty)
    }

    func testUnknownKeyNamesPathAndLine() {
        let e = error(base + "access:\n  mynetworks: []\n  relay_domains: [x]\n")
        XCTAssertEqual(e?.keyPath, "access.relay_domains")
        XCTAssertEqual(e?.line, 5)
        XCTAssertTrue(e?.message.hasPrefix("unknown key") ?? false)
    }

    func testBadValuesNamePathAndLine() {
        XCTAssertEqual(error(base + "limits:\n  max_recipients: 0\n")?.keyPath, "limits.max_recipients")
        XCTAssertEqual(error(base + "limits:\n  max_recipients: many\n")?.message, "expected a whole number")
        let listener = error("listeners:\n  - { name: a, kind: smtp, address: \"127.0.0.1:1\" }\n  - { name: b, kind: smtp, address: nowhere }\n")
        XCTAssertEqual(listener?.keyPath, "listeners[1].address")
        XCTAssertEqual(listener?.line, 3)
        XCTAssertEqual(error("hostname: x\n")?.keyPath, "listeners")
        XCTAssertEqual(error(base + "log: { level: chatty }\n")?.keyPath, "log.level")
    }

    func testContradictions() {
        XCTAssertEqual(
            error("listeners:\n  - { name: s, kind: smtps, address: \"127.0.0.1:465\" }\n")?.message,
            "a smtps listener needs tls.certificate and tls.key")
        XCTAssertEqual(error("listeners: []\n")?.message, "at least one listener is needed")
        XCTAssertEqual(
            error(base + "limits: { max_connections: 5, max_connections_per_client: 6 }\n")?.keyPath,
            "limits.max_connections_per_client")
    }

    func testDescriptionReadsLikeACompilerError() {
        let e = ConfigError(file: "config/tern.yaml", line: 12, keyPath: "limits.x", message: "unknown key")
        XCTAssertEqual(e.description, "config/tern.yaml:12: limits.x: unknown key")
    }
}
