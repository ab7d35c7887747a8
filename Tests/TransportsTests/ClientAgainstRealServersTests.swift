import Delivery
import Foundation
import NIOPosix
import SMTPProtocol
import XCTest

@testable import Transports

/// The client against real receiving servers on loopback: Postfix's smtp-sink, and
/// aiosmtpd requiring STARTTLS and AUTH. Certificates are minted per run.
final class ClientAgainstRealServersTests: XCTestCase {
    var directory = ""
    var processes: [Process] = []
    var stdins: [Pipe] = []

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "tern-client-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory + "/out", withIntermediateDirectories: true)
    }

    override func tearDown() {
        for pipe in stdins { try? pipe.fileHandleForWriting.close() }
        for p in processes where p.isRunning {
            // By the PID we started, never by name. SIGKILL: smtp-sink, once it has dropped
            // to the postfix user, does not stop on SIGTERM.
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    @discardableResult
    private func run(_ arguments: [String], wait: Bool = true) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = arguments
        p.currentDirectoryURL = URL(fileURLWithPath: directory)
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        if wait {
            p.waitUntilExit()
            XCTAssertEqual(p.terminationStatus, 0, arguments.joined(separator: " "))
        } else {
            processes.append(p)
        }
        return p
    }

    private func mintCertificates() throws {
        try run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=Tern Test CA"])
        try run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "mx.key", "-out", "mx.csr", "-subj", "/CN=mx.test"])
        try "subjectAltName=DNS:mx.test,DNS:localhost\n".write(toFile: directory + "/ext.cnf", atomically: true, encoding: .utf8)
        try run(["openssl", "x509", "-req", "-in", "mx.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "mx.crt", "-days", "2", "-extfile", "ext.cnf"])
    }

    private func waitForPort(_ port: Int) async throws {
        for _ in 0..<100 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = UInt16(port).bigEndian
            let ok = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            close(fd)
            if ok == 0 { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        XCTFail("nothing listens on \(port)")
    }

    private func startAiosmtpd(password: String = "s3cret") async throws -> Int {
        try mintCertificates()
        let port = try freePort()
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Peers/aiosmtpd_server.py").path
        let stdin = Pipe()
        stdins.append(stdin)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", script, "\(port)", directory + "/mx.crt", directory + "/mx.key", "relay", password, directory + "/out"]
        p.standardInput = stdin
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        processes.append(p)
        try await waitForPort(port)
        return port
    }

    private func received() throws -> [String] {
        let dir = directory + "/out"
        return try FileManager.default.contentsOfDirectory(atPath: dir).sorted().map {
            try String(contentsOfFile: dir + "/" + $0, encoding: .utf8)
        }
    }

    private let content = InMemoryContent(Array("Subject: hi\r\n\r\n.a line with a leading dot\r\n..two\r\nend\r\n".utf8))

    func testRelaysThroughSmtpSinkWithDotStuffing() async throws {
        let port = try freePort()
        // As root smtp-sink must drop to a user, which then writes the dumps.
        let asUser = getuid() == 0 ? ["-u", "postfix"] : []
        chmod(directory + "/out", 0o777)
        try run(["smtp-sink"] + asUser + ["-d", directory + "/out/%Y%m%d%H%M%S.", "127.0.0.1:\(port)", "10"], wait: false)
        try await waitForPort(port)
        let connection = try await SMTPClientConnection.connect(
            host: "127.0.0.1", port: port, configuration: .init(heloName: "relay.test", tlsPolicy: .may, serverName: "localhost"))
        for n in 0..<3 {
            let message = OutboundMessage(sender: "app@client.test", recipients: [.init(address: "u\(n)@example.org")], size: 60)
            let verdicts = await connection.send(message, content: content)
            guard case .delivered = verdicts[0] else { return XCTFail("\(verdicts)") }
        }
        XCTAssertTrue(connection.isReady, "one connection carried all three")
        await connection.quit()
        try await Task.sleep(for: .milliseconds(300))
        let dumps = try received()
        XCTAssertEqual(dumps.count, 3)
        for dump in dumps {
            // smtp-sink writes its dumps with LF line ends; the dots are what matters.
            XCTAssertTrue(dump.contains("\n.a line with a leading dot\n..two\nend\n"), dump)
        }
    }

    func testSmarthostWithSTARTTLSVerifyAndAUTH() async throws {
        let port = try await startAiosmtpd()
        let configuration = SMTPClientConfiguration(
            heloName: "relay.test", tlsPolicy: .verify, credentials: .init(user: "relay", password: "s3cret"), serverName: "mx.test",
            caFile: directory + "/ca.crt")
        let connection = try await SMTPClientConnection.connect(host: "127.0.0.1", port: port, configuration: configuration)
        XCTAssertTrue(connection.tlsActive)
        let message = OutboundMessage(
            sender: "app@client.test",
            recipients: [.init(address: "u@example.org"), .init(address: "soft@example.org"), .init(address: "hard@example.org")], size: 60)
        let verdicts = await connection.send(message, content: content)
        XCTAssertEqual(verdicts.count, 3)
        guard case .delivered = verdicts[0] else { return XCTFail("\(verdicts[0])") }
        XCTAssertEqual(verdicts[1], .tryNextHost(.reply(SMTPReply(450, EnhancedStatusCode(4, 2, 0), "mailbox busy"))))
        XCTAssertEqual(verdicts[2], .bounced(status: EnhancedStatusCode(5, 1, 1), diagnostic: "smtp; 550 5.1.1 no such user"))
        await connection.quit()
        let got = try received()
        XCTAssertEqual(got.count, 1)
        XCTAssertTrue(got[0].hasPrefix("X-Envelope: app@client.test -> u@example.org\r\n"), got[0])
        XCTAssertTrue(got[0].contains("\r\n.a line with a leading dot\r\n"), "dots are unstuffed by the receiver")
    }

    func testWrongPasswordDefersAndWrongNameIsRefused() async throws {
        let port = try await startAiosmtpd()
        var configuration = SMTPClientConfiguration(
            heloName: "relay.test", tlsPolicy: .verify, credentials: .init(user: "relay", password: "wrong"), serverName: "mx.test",
            caFile: directory + "/ca.crt", commandTimeout: .seconds(5))
        do {
            _ = try await SMTPClientConnection.connect(host: "127.0.0.1", port: port, configuration: configuration)
            XCTFail("a wrong password must not connect")
        } catch {
            XCTAssertEqual(error.stage, .auth, "\(error)")
            let verdict = DeliveryPolicy.verdict(stage: error.stage, outcome: error.outcome)
            guard case .tryNextHost = verdict else { return XCTFail("a wrong password is not final, got \(verdict)") }
        }
        // verify refuses a certificate that does not name the host.
        configuration.credentials = .init(user: "relay", password: "s3cret")
        configuration.serverName = "other.test"
        do {
            _ = try await SMTPClientConnection.connect(host: "127.0.0.1", port: port, configuration: configuration)
            XCTFail("verify must refuse a certificate for another name")
        } catch {
            XCTAssertEqual(error.stage, .startTLS, "\(error)")
            guard case .tls = error.outcome else { return XCTFail("\(error.outcome)") }
        }
        // encrypt does not check the name (Postfix's `encrypt`).
        configuration.tlsPolicy = .encrypt
        let connection = try await SMTPClientConnection.connect(host: "127.0.0.1", port: port, configuration: configuration)
        XCTAssertTrue(connection.tlsActive)
        await connection.quit()
    }

    func testConnectionRefusedAndTimeout() async throws {
        let port = try freePort()  // nothing listens
        do {
            _ = try await SMTPClientConnection.connect(
                host: "127.0.0.1", port: port, configuration: .init(heloName: "r", tlsPolicy: .none, serverName: "x"))
            XCTFail("nothing listens")
        } catch {
            XCTAssertEqual(error.stage, .connect)
            XCTAssertTrue(DeliveryPolicy.throttlesLane(stage: error.stage, outcome: error.outcome))
        }
        // A server that accepts and never greets.
        let silent = try freePort()
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(silent).bigEndian
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(fd, 4)
        do {
            _ = try await SMTPClientConnection.connect(
                host: "127.0.0.1", port: silent,
                configuration: .init(heloName: "r", tlsPolicy: .none, serverName: "x", commandTimeout: .milliseconds(500)))
            XCTFail("a silent server must time out")
        } catch {
            XCTAssertEqual(error.stage, .greeting)
            XCTAssertEqual(error.outcome, .timeout("no reply after greeting"))
        }
    }
}
