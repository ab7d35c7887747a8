import SMTPProtocol
import TernCore
import XCTest

@testable import Ingress

/// The session driven directly: lines in, actions out. No sockets.
final class SessionStateMachineTests: XCTestCase {
    private func policy(_ kind: ListenerKind = .smtp, tls: Bool = true, auth: Bool = true, maxErrors: Int = 10) -> SessionPolicy {
        SessionPolicy(
            kind: kind, hostname: "relay.test", tlsAvailable: tls, authAvailable: auth, maxMessageSize: 1000,
            maxRecipients: 2, maxErrors: maxErrors, allowedSenders: ["alice": ["@shop.test"]], bareLineEndings: .normalizeTrusted)
    }

    private func code(_ action: SessionStateMachine.Action) -> Int {
        switch action {
        case .reply(let r), .close(let r), .startTLS(let r), .beginData(let r, _), .replyThenClose(let r, _): return r.code
        case .discardChunk(let r, _): return r.code
        case .verifyCredentials, .receiveChunk, .checkCommand: return 0
        }
    }

    private func enhanced(_ action: SessionStateMachine.Action) -> String? {
        if case .reply(let r) = action { return r.enhanced?.description }
        if case .close(let r) = action { return r.enhanced?.description }
        return nil
    }

    private func send(_ m: inout SessionStateMachine, _ line: String) -> SessionStateMachine.Action {
        m.line(Array(line.utf8))
    }

    func testTrustedClientTransaction() {
        var m = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
        XCTAssertEqual(m.greeting().code, 220)
        guard case .reply(let ehlo) = send(&m, "EHLO c.test") else { return XCTFail() }
        XCTAssertEqual(ehlo.lines, ["relay.test", "PIPELINING", "SIZE 1000", "STARTTLS", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"])
        XCTAssertEqual(code(send(&m, "MAIL FROM:<a@c.test>")), 250)
        XCTAssertEqual(code(send(&m, "RCPT TO:<u@example.org>")), 250)
        XCTAssertEqual(send(&m, "DATA"), .beginData(SMTPReply(354, nil, "End data with <CR><LF>.<CR><LF>"), normalize: true))
        XCTAssertEqual(m.dataEnded(.queued("ID1")), .reply(SMTPReply(250, .ok, "Ok: queued as ID1")))
        XCTAssertNil(m.transaction)
        XCTAssertEqual(m.protocolName, "ESMTP")
        XCTAssertEqual(send(&m, "QUIT"), .close(SMTPReply(221, .ok, "Bye")))
        XCTAssertTrue(m.isClosed)
    }

    func testUntrustedClientCannotRelay() {
        var m = SessionStateMachine(policy: policy(), trusted: false, tlsActive: false)
        _ = send(&m, "EHLO c.test")
        _ = send(&m, "MAIL FROM:<a@c.test>")
        let rcpt = send(&m, "RCPT TO:<u@example.org>")
        XCTAssertEqual(code(rcpt), 554)
        XCTAssertEqual(enhanced(rcpt), "5.7.1")
        XCTAssertEqual(code(send(&m, "DATA")), 554)
    }

    func testAuthOnlyOverTLSThenRelay() {
        var m = SessionStateMachine(policy: policy(), trusted: false, tlsActive: false)
        _ = send(&m, "EHLO c.test")
        XCTAssertEqual(code(send(&m, "AUTH PLAIN AGFsaWNlAHB3")), 538)
        XCTAssertEqual(send(&m, "STARTTLS"), .startTLS(SMTPReply(220, .ok, "Ready to start TLS")))
        m.tlsEstablished()
        XCTAssertNil(m.helo, "RFC 3207: state is reset after TLS")
        XCTAssertEqual(code(send(&m, "AUTH PLAIN AGFsaWNlAHB3")), 503, "EHLO first")
        guard case .reply(let ehlo) = send(&m, "EHLO c.test") else { return XCTFail() }
        XCTAssertTrue(ehlo.lines.contains("AUTH PLAIN LOGIN"))
        XCTAssertFalse(ehlo.lines.contains("STARTTLS"))
        XCTAssertEqual(send(&m, "AUTH PLAIN AGFsaWNlAHB3"), .verifyCredentials(user: "alice", password: "pw"))
        XCTAssertEqual(code(m.authChecked(user: "alice", success: true)), 235)
        XCTAssertEqual(m.protocolName, "ESMTPSA")
        XCTAssertEqual(code(send(&m, "AUTH PLAIN AGFsaWNlAHB3")), 503, "already authenticated")
        let notOwned = send(&m, "MAIL FROM:<ceo@bank.test>")
        XCTAssertEqual(code(notOwned), 553)
        XCTAssertEqual(enhanced(notOwned), "5.7.1")
        XCTAssertEqual(code(send(&m, "MAIL FROM:<shop@shop.test>")), 250)
        XCTAssertEqual(code(send(&m, "RCPT TO:<u@example.org>")), 250)
    }

    func testAuthLoginExchangeAndCancel() {
        var m = SessionStateMachine(policy: policy(), trusted: false, tlsActive: true)
        _ = send(&m, "EHLO c.test")
        XCTAssertEqual(send(&m, "AUTH LOGIN"), .reply(SMTPReply(334, nil, "VXNlcm5hbWU6")))
        XCTAssertTrue(m.awaitingSASLResponse)
        XCTAssertEqual(send(&m, "Ym9i"), .reply(SMTPReply(334, nil, "UGFzc3dvcmQ6")))
        XCTAssertEqual(send(&m, "c2VjcmV0"), .verifyCredentials(user: "bob", password: "secret"))
        let failed = m.authChecked(user: "bob", success: false)
        XCTAssertEqual(code(failed), 535)
        XCTAssertEqual(enhanced(failed), "5.7.8")
        XCTAssertEqual(send(&m, "AUTH PLAIN"), .reply(SMTPReply(334, nil, "")))
        XCTAssertEqual(code(send(&m, "*")), 501)
        XCTAssertEqual(code(send(&m, "AUTH PLAIN !!!!")), 501)
        XCTAssertEqual(code(send(&m, "AUTH CRAM-MD5")), 504)
        // authzid different from authcid is refused without checking a password
        XCTAssertEqual(code(send(&m, "AUTH PLAIN " + SASLBase64.encode(Array("root\0bob\0secret".utf8)))), 535)
    }

    func testSubmissionGates() {
        var m = SessionStateMachine(policy: policy(.submission), trusted: true, tlsActive: false)
        _ = send(&m, "EHLO c.test")
        XCTAssertEqual(send(&m, "MAIL FROM:<a@c.test>"), .reply(.startTLSFirst))
        XCTAssertEqual(send(&m, "AUTH PLAIN AGFsaWNlAHB3"), .reply(.startTLSFirst))
        m.tlsEstablished()
        _ = send(&m, "EHLO c.test")
        XCTAssertEqual(send(&m, "MAIL FROM:<a@c.test>"), .reply(.authRequired), "mynetworks does not bypass submission AUTH")
        var s = SessionStateMachine(policy: policy(.smtps), trusted: false, tlsActive: true)
        guard case .reply(let ehlo) = send(&s, "EHLO c.test") else { return XCTFail() }
        XCTAssertFalse(ehlo.lines.contains("STARTTLS"))
        XCTAssertEqual(code(send(&s, "STARTTLS")), 502)
    }

    func testOrderAndLimits() {
        var m = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
        XCTAssertEqual(enhanced(send(&m, "MAIL FROM:<a@c.test>")), "5.5.1")
        _ = send(&m, "HELO c.test")
        XCTAssertEqual(code(send(&m, "MAIL FROM:<a@c.test> SIZE=5")), 555)
        _ = send(&m, "EHLO c.test")
        XCTAssertEqual(code(send(&m, "RCPT TO:<u@example.org>")), 503)
        XCTAssertEqual(code(send(&m, "DATA")), 503)
        let big = send(&m, "MAIL FROM:<a@c.test> SIZE=1001")
        XCTAssertEqual(code(big), 552)
        XCTAssertEqual(enhanced(big), "5.3.4")
        XCTAssertEqual(code(send(&m, "MAIL FROM:<a@c.test> SIZE=1000")), 250)
        XCTAssertEqual(code(send(&m, "MAIL FROM:<a@c.test>")), 503, "nested MAIL")
        XCTAssertEqual(code(send(&m, "RCPT TO:<u1@example.org>")), 250)
        XCTAssertEqual(code(send(&m, "RCPT TO:<u2@example.org>")), 250)
        let tooMany = send(&m, "RCPT TO:<u3@example.org>")
        XCTAssertEqual(code(tooMany), 452)
        XCTAssertEqual(enhanced(tooMany), "4.5.3")
        XCTAssertEqual(code(send(&m, "RSET")), 250)
        XCTAssertNil(m.transaction)
        XCTAssertEqual(code(send(&m, "VRFY x")), 252)
        XCTAssertEqual(send(&m, "BDAT 10 LAST"), .discardChunk(SMTPReply(503, .invalidCommand, "Error: need RCPT command"), size: 10))
    }

    func testChunkingSequence() {
        var m = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
        _ = send(&m, "EHLO c.test")
        XCTAssertEqual(send(&m, "BDAT 5"), .discardChunk(SMTPReply(503, .invalidCommand, "Error: need RCPT command"), size: 5))
        _ = send(&m, "MAIL FROM:<a@c.test>")
        XCTAssertEqual(send(&m, "BDAT 5"), .discardChunk(SMTPReply(554, .invalidCommand, "Error: no valid recipients"), size: 5))
        _ = send(&m, "RCPT TO:<u@example.org>")
        XCTAssertEqual(send(&m, "BDAT 5"), .receiveChunk(size: 5, last: false, first: true, normalize: true))
        XCTAssertEqual(m.chunkReceived(size: 5), .reply(SMTPReply(250, .ok, "5 octets received")))
        XCTAssertTrue(m.isReceivingMessage)
        XCTAssertEqual(code(send(&m, "DATA")), 503, "no DATA inside a BDAT sequence")
        XCTAssertEqual(code(send(&m, "MAIL FROM:<b@c.test>")), 503)
        XCTAssertEqual(send(&m, "BDAT 3 LAST"), .receiveChunk(size: 3, last: true, first: false, normalize: true))
        XCTAssertEqual(code(m.dataEnded(.queued("ID"))), 250)
        XCTAssertFalse(m.isReceivingMessage)
        // RSET abandons a sequence.
        _ = send(&m, "MAIL FROM:<a@c.test>")
        _ = send(&m, "RCPT TO:<u@example.org>")
        _ = send(&m, "BDAT 1")
        _ = m.chunkReceived(size: 1)
        XCTAssertEqual(code(send(&m, "RSET")), 250)
        XCTAssertFalse(m.isReceivingMessage)
        XCTAssertNil(m.transaction)
    }

    func testDataOutcomes() {
        for (outcome, expected) in [
            (DataOutcome.tooBig, "552 5.3.4"), (.containsNUL, "550 5.6.0"), (.bareLineEnding, "550 5.6.2"),
            (.spoolFailure, "451 4.3.0"),
        ] {
            var m = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
            _ = send(&m, "EHLO c.test")
            _ = send(&m, "MAIL FROM:<a@c.test>")
            _ = send(&m, "RCPT TO:<u@example.org>")
            _ = send(&m, "DATA")
            guard case .reply(let r) = m.dataEnded(outcome) else { return XCTFail() }
            XCTAssertEqual("\(r.code) \(r.enhanced!)", expected)
            XCTAssertEqual(code(send(&m, "MAIL FROM:<a@c.test>")), 250, "the session goes on")
        }
    }

    func testBareLineEndingPolicyFollowsTrust() {
        var untrusted = SessionStateMachine(policy: policy(), trusted: false, tlsActive: true)
        _ = send(&untrusted, "EHLO c.test")
        _ = send(&untrusted, "AUTH PLAIN AGFsaWNlAHB3")
        _ = untrusted.authChecked(user: "alice", success: true)
        _ = send(&untrusted, "MAIL FROM:<a@shop.test>")
        _ = send(&untrusted, "RCPT TO:<u@example.org>")
        guard case .beginData(_, let normalize) = send(&untrusted, "DATA") else { return XCTFail() }
        XCTAssertFalse(normalize)
    }

    func testErrorCapCloses() {
        var m = SessionStateMachine(policy: policy(maxErrors: 3), trusted: true, tlsActive: false)
        XCTAssertEqual(code(send(&m, "FOO")), 500)
        XCTAssertEqual(code(m.lineTooLong()), 500)
        XCTAssertEqual(send(&m, "BAR"), .close(.tooManyErrors))
        XCTAssertTrue(m.isClosed)
    }

    func testTimeoutAndShutdown() {
        var idle = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
        XCTAssertEqual(enhanced(idle.timeout()), "4.4.2")
        var busy = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
        _ = send(&busy, "EHLO c.test")
        XCTAssertEqual(code(busy.shutdown()!), 421, "idle: closes at once")
        var inTransaction = SessionStateMachine(policy: policy(), trusted: true, tlsActive: false)
        _ = send(&inTransaction, "EHLO c.test")
        _ = send(&inTransaction, "MAIL FROM:<a@c.test>")
        _ = send(&inTransaction, "RCPT TO:<u@example.org>")
        XCTAssertNil(inTransaction.shutdown(), "in a transaction: finish first")
        _ = send(&inTransaction, "DATA")
        guard case .replyThenClose(let r, let final) = inTransaction.dataEnded(.queued("X")) else { return XCTFail() }
        XCTAssertEqual(r.code, 250)
        XCTAssertEqual(final.enhanced, EnhancedStatusCode(4, 3, 2))
    }

    /// The one decision about what the bytes after a line are: every action names it.
    func testEachActionSaysHowTheFramingReadsOn() {
        typealias M = SessionStateMachine
        XCTAssertEqual(M.framing(after: .reply(.ok)), .commands)
        XCTAssertEqual(M.framing(after: .verifyCredentials(user: "u", password: "p")), .commands)
        XCTAssertEqual(M.framing(after: .close(.ok)), .closed)
        XCTAssertEqual(M.framing(after: .startTLS(.ok)), .tls)
        XCTAssertEqual(M.framing(after: .beginData(.ok, normalize: true)), .data(normalize: true))
        XCTAssertEqual(M.framing(after: .receiveChunk(size: 7, last: false, first: true, normalize: false)), .chunk(size: 7))
        XCTAssertEqual(M.framing(after: .discardChunk(.ok, size: 9)), .chunk(size: 9))
    }

    func testMailIsRefusedWhenTheSpoolCannotTakeIt() {
        var p = policy()
        p.minFreeSpace = 1000
        p.freeSpace = { 999 }
        var full = SessionStateMachine(policy: p, trusted: true, tlsActive: false)
        _ = send(&full, "EHLO client.test")
        XCTAssertEqual(send(&full, "MAIL FROM:<a@client.test>"), .reply(.insufficientStorage))

        p.freeSpace = { 1500 }
        var tight = SessionStateMachine(policy: p, trusted: true, tlsActive: false)
        _ = send(&tight, "EHLO client.test")
        XCTAssertEqual(send(&tight, "MAIL FROM:<a@client.test> SIZE=501"), .reply(.insufficientStorage))
        XCTAssertEqual(code(send(&tight, "MAIL FROM:<a@client.test> SIZE=500")), 250)
    }
}
