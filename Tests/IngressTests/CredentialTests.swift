import CCrypt
import SMTPProtocol
import XCTest

@testable import Ingress

final class CredentialTests: XCTestCase {
    private func hash(_ password: String, prefix: String) throws -> String {
        var setting = [CChar](repeating: 0, count: 256)
        XCTAssertNotNil(crypt_gensalt_rn(prefix, 0, nil, 0, &setting, Int32(setting.count)))
        return try XCTUnwrap(UserDatabase.crypt(password, setting: String(cString: setting)))
    }

    func testSystemCryptHashesVerify() throws {
        for prefix in ["$6$", "$5$", "$y$"] {
            let h = try hash("s3cret pass", prefix: prefix)
            XCTAssertTrue(h.hasPrefix(prefix))
            let db = UserDatabase(hashes: ["alice": h])
            XCTAssertTrue(db.verify(user: "alice", password: "s3cret pass"), prefix)
            XCTAssertFalse(db.verify(user: "alice", password: "s3cret pas"), prefix)
            XCTAssertFalse(db.verify(user: "bob", password: "s3cret pass"), prefix)
        }
    }

    /// Regression: crypt(3) stops at a NUL, so `secret1\0junk` logged in as `secret1`.
    func testAPasswordWithANULNeverMatches() throws {
        let db = UserDatabase(hashes: ["alice": try hash("secret1", prefix: "$6$")])
        XCTAssertTrue(db.verify(user: "alice", password: "secret1"))
        XCTAssertFalse(db.verify(user: "alice", password: "secret1\0junk"))
        XCTAssertFalse(db.verify(user: "alice", password: "secret1\0"))
        XCTAssertFalse(db.verify(user: "alice\0x", password: "secret1"))
    }

    func testUsersFileFormat() throws {
        let path = "/tmp/tern-users-\(getpid())"
        let h = try hash("pw", prefix: "$6$")
        let f = fopen(path, "w")!
        fputs("# comment\n\nalice:\(h)\n", f)
        fclose(f)
        defer { unlink(path) }
        let db = try UserDatabase.load(path: path)
        XCTAssertEqual(db.count, 1)
        XCTAssertTrue(db.verify(user: "alice", password: "pw"))

        let bad = fopen(path, "w")!
        fputs("alice:plaintext\n", bad)
        fclose(bad)
        XCTAssertThrowsError(try UserDatabase.load(path: path)) { error in
            XCTAssertTrue("\(error)".contains(":1: expected name:hash"))
        }
    }

    func testAuthThrottle() {
        let throttle = AuthThrottle(limit: 3, window: .seconds(60))
        let t0 = ContinuousClock.now
        XCTAssertEqual(throttle.recordFailure("10.0.0.1", now: t0), .seconds(1))
        XCTAssertEqual(throttle.recordFailure("10.0.0.1", now: t0), .seconds(2))
        XCTAssertFalse(throttle.isBlocked("10.0.0.1", now: t0))
        _ = throttle.recordFailure("10.0.0.1", now: t0)
        XCTAssertTrue(throttle.isBlocked("10.0.0.1", now: t0))
        XCTAssertFalse(throttle.isBlocked("10.0.0.2", now: t0))
        XCTAssertFalse(throttle.isBlocked("10.0.0.1", now: t0 + .seconds(61)), "the window passes")
    }

    func testConnectionLimiter() {
        let limiter = ConnectionLimiter(maxTotal: 3, maxPerClient: 2)
        XCTAssertEqual(limiter.admit("a"), .admitted)
        XCTAssertEqual(limiter.admit("a"), .admitted)
        XCTAssertEqual(limiter.admit("a"), .tooManyFromClient)
        XCTAssertEqual(limiter.admit("b"), .admitted)
        XCTAssertEqual(limiter.admit("c"), .tooManyTotal)
        limiter.release("a")
        XCTAssertEqual(limiter.admit("c"), .admitted)
        XCTAssertEqual(limiter.open, 3)
    }

    func testBase64() {
        XCTAssertEqual(SASLBase64.encode("Username:"), "VXNlcm5hbWU6")
        XCTAssertEqual(SASLBase64.decode("AGFsaWNlAHB3").map { String(decoding: $0, as: UTF8.self) }, "\0alice\0pw")
        XCTAssertEqual(SASLBase64.decode("YQ=="), [0x61])
        XCTAssertNil(SASLBase64.decode("YQ="))
        XCTAssertNil(SASLBase64.decode("Y=Q="))
        XCTAssertNil(SASLBase64.decode("YQ==YQ=="))
        for n in 0..<20 {
            let bytes = (0..<n).map { UInt8(truncatingIfNeeded: $0 * 37) }
            XCTAssertEqual(SASLBase64.decode(SASLBase64.encode(bytes)), bytes)
        }
    }

    func testReceivedHeader() {
        let h = ReceivedHeader.make(
            helo: "app1.example", clientAddress: "10.0.0.5", hostname: "relay.example", protocolName: "ESMTPS",
            queueID: "ID", tlsVersion: "TLSv1.3", recipients: ["u@example.org"], date: 0)
        XCTAssertTrue(h.hasPrefix("Received: from app1.example ([10.0.0.5])\r\n\t(using TLSv1.3)\r\n\tby relay.example (Tern) with ESMTPS id ID\r\n\tfor <u@example.org>; "))
        // Local time of the epoch: 1 Jan 1970, or 31 Dec 1969 west of Greenwich.
        XCTAssertNotNil(h.range(of: #"for <u@example\.org>; (Thu, 1 Jan 1970|Wed, 31 Dec 1969) \d\d:\d\d:\d\d [+-]\d{4}\r\n$"#, options: .regularExpression), h)
        let v6 = ReceivedHeader.make(
            helo: nil, clientAddress: "::1", hostname: "r", protocolName: "ESMTP", queueID: "ID", tlsVersion: nil,
            recipients: ["a@x", "b@x"], date: 0)
        XCTAssertTrue(v6.hasPrefix("Received: from unknown ([IPv6:::1])\r\n\tby r (Tern) with ESMTP id ID;\r\n\t"))
        XCTAssertFalse(v6.contains("for <"), "no recipient list for several recipients")
    }
}
