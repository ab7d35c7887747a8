import Delivery
import SMTPProtocol
import XCTest

@testable import Transports

/// Transcripts: the server's replies in, the client's actions out. No sockets.
final class SMTPClientStateMachineTests: XCTestCase {
    private func r(_ code: Int, _ lines: String...) -> SMTPReply { SMTPReply(code, nil, lines) }

    private let ehloFull = SMTPReply(250, nil, ["mx.test", "PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8", "DSN", "STARTTLS", "AUTH PLAIN LOGIN"])

    private func message(_ recipients: [String] = ["a@example.org", "b@example.org"], size: Int = 100) -> OutboundMessage {
        OutboundMessage(
            sender: "app@client.test",
            recipients: recipients.map { .init(address: $0, notify: [.failure], orcpt: nil) }, size: size, eightBit: true,
            ret: .headers, envid: "E1")
    }

    func testPipelinedDeliveryWithTLSAndAuth() {
        var m = SMTPClientStateMachine(heloName: "relay.test", tlsPolicy: .verify, credentials: .init(user: "u", password: "p"))
        XCTAssertEqual(m.reply(r(220, "mx.test ESMTP")), .send([.ehlo("relay.test")]))
        XCTAssertEqual(m.reply(ehloFull), .send([.startTLS]))
        XCTAssertEqual(m.reply(r(220, "go ahead")), .startTLS)
        XCTAssertEqual(m.tlsEstablished(), .send([.ehlo("relay.test")]))
        XCTAssertEqual(m.reply(ehloFull), .send([.auth(mechanism: "PLAIN", initialResponse: "AHUAcA==")]))
        XCTAssertEqual(m.reply(r(235, "ok")), .wait)
        XCTAssertTrue(m.isReady)

        var mail = MailParameters()
        mail.size = 100
        mail.body = .eightBitMIME
        mail.ret = .headers
        mail.envid = "E1"
        var rcpt = RcptParameters()
        rcpt.notify = [.failure]
        let sent = m.send(message())
        XCTAssertEqual(sent, .send([
            .mail(.mailbox(Mailbox(localPart: "app", domain: "client.test")), mail),
            .rcpt(.mailbox(Mailbox(localPart: "a", domain: "example.org")), rcpt),
            .rcpt(.mailbox(Mailbox(localPart: "b", domain: "example.org")), rcpt),
            .data,
        ]), "DATA ends the pipelined group")
        XCTAssertEqual(m.currentStage, .mail)
        XCTAssertEqual(m.reply(r(250, "ok")), .wait)
        XCTAssertEqual(m.currentStage, .rcpt)
        XCTAssertEqual(m.reply(r(250, "ok")), .wait)
        XCTAssertEqual(m.reply(SMTPReply(550, EnhancedStatusCode(5, 1, 1), "no such user")), .wait, "DATA's reply is on its way")
        XCTAssertEqual(m.currentStage, .data)
        XCTAssertEqual(m.reply(r(354, "go")), .sendContent)
        let delivered = SMTPReply(250, .ok, "queued as X")
        XCTAssertEqual(m.reply(delivered), .messageDone([
            .delivered(delivered),
            .bounced(status: EnhancedStatusCode(5, 1, 1), diagnostic: "smtp; 550 5.1.1 no such user"),
        ], reset: false))
        XCTAssertTrue(m.isReady, "the connection can carry the next message")
        XCTAssertEqual(m.quit(), .close(quit: true, verdicts: []))
    }

    func testOneCommandAtATimeWithoutPipeliningAndHeloFallback() {
        var m = SMTPClientStateMachine(heloName: "relay.test", tlsPolicy: .may)
        _ = m.reply(r(220, "old.test"))
        XCTAssertEqual(m.reply(r(502, "what?")), .send([.helo("relay.test")]))
        XCTAssertEqual(m.reply(r(250, "old.test")), .wait)
        guard case .send(let first) = m.send(message(["a@example.org"])) else { return XCTFail() }
        XCTAssertEqual(first.count, 1)
        guard case .mail(_, let params) = first[0] else { return XCTFail() }
        XCTAssertEqual(params, MailParameters(), "no ESMTP parameters after HELO")
        XCTAssertEqual(m.reply(r(250, "ok")), .send([.rcpt(.mailbox(Mailbox(localPart: "a", domain: "example.org")), RcptParameters())]))
        XCTAssertEqual(m.reply(r(250, "ok")), .send([.data]))
    }

    func testRefusedSenderWithoutPipeliningSendsNoRecipients() {
        var m = SMTPClientStateMachine(heloName: "relay.test", tlsPolicy: .none)
        _ = m.reply(r(220, "x"))
        _ = m.reply(r(250, "x", "SIZE 1000"))
        _ = m.send(message())
        let refused = SMTPReply(553, EnhancedStatusCode(5, 7, 1), "sender rejected")
        let bounce = RecipientVerdict.bounced(status: EnhancedStatusCode(5, 7, 1), diagnostic: "smtp; 553 5.7.1 sender rejected")
        XCTAssertEqual(m.reply(refused), .messageDone([bounce, bounce], reset: true))
        XCTAssertEqual(m.reply(r(250, "reset")), .wait)
        XCTAssertTrue(m.isReady)
    }

    func testTLSPolicies() {
        var encrypt = SMTPClientStateMachine(heloName: "r", tlsPolicy: .encrypt)
        _ = encrypt.reply(r(220, "x"))
        guard case .close(true, _) = encrypt.reply(r(250, "x", "PIPELINING")) else { return XCTFail("encrypt without STARTTLS must not go on") }

        var may = SMTPClientStateMachine(heloName: "r", tlsPolicy: .may)
        _ = may.reply(r(220, "x"))
        XCTAssertEqual(may.reply(r(250, "x", "PIPELINING")), .wait, "may: no STARTTLS offered, plaintext")
        var mayRefused = SMTPClientStateMachine(heloName: "r", tlsPolicy: .may)
        _ = mayRefused.reply(r(220, "x"))
        XCTAssertEqual(mayRefused.reply(r(250, "x", "STARTTLS")), .send([.startTLS]))
        XCTAssertEqual(mayRefused.reply(r(454, "TLS not available")), .wait, "may: refused STARTTLS, plaintext")

        var none = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none)
        _ = none.reply(r(220, "x"))
        XCTAssertEqual(none.reply(r(250, "x", "STARTTLS")), .wait)

        var noPlaintextAuth = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none, credentials: .init(user: "u", password: "p"))
        _ = noPlaintextAuth.reply(r(220, "x"))
        guard case .close = noPlaintextAuth.reply(r(250, "x", "AUTH PLAIN")) else { return XCTFail("AUTH needs TLS by default") }
        var plaintextAllowed = SMTPClientStateMachine(
            heloName: "r", tlsPolicy: .none, credentials: .init(user: "u", password: "p", allowPlaintext: true))
        _ = plaintextAllowed.reply(r(220, "x"))
        XCTAssertEqual(plaintextAllowed.reply(r(250, "x", "AUTH LOGIN")), .send([.auth(mechanism: "LOGIN", initialResponse: nil)]))
        XCTAssertEqual(plaintextAllowed.reply(r(334, "VXNlcm5hbWU6")), .sendSASL("dQ=="))
        XCTAssertEqual(plaintextAllowed.reply(r(334, "UGFzc3dvcmQ6")), .sendSASL("cA=="))
        XCTAssertEqual(plaintextAllowed.reply(r(235, "ok")), .wait)
    }

    func testWrongPasswordDefers() {
        var m = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none, credentials: .init(user: "u", password: "bad", allowPlaintext: true))
        _ = m.reply(r(220, "x"))
        _ = m.reply(r(250, "x", "AUTH PLAIN"))
        XCTAssertEqual(m.reply(SMTPReply(535, .authFailed, "bad credentials")), .close(quit: true, verdicts: []))
        // With a message pending on the connection its recipients are not final here, and
        // deferred (as 4.7.8, not 5.7.8) when no other host is left, never bounced.
        let failure = AttemptOutcome.reply(SMTPReply(535, .authFailed, "x"))
        XCTAssertEqual(DeliveryPolicy.verdict(stage: .auth, outcome: failure), .tryNextHost(failure))
        XCTAssertEqual(
            DeliveryPolicy.exhausted(failure, note: nil), .deferred(status: EnhancedStatusCode(4, 7, 8), diagnostic: "smtp; 535 5.7.8 x"))
    }

    func testSizeAndSMTPUTF8AreCheckedBeforeSending() {
        var m = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none)
        _ = m.reply(r(220, "x"))
        _ = m.reply(r(250, "x", "SIZE 1000", "PIPELINING"))
        guard case .messageDone(let big, false) = m.send(message(size: 5000)) else { return XCTFail() }
        XCTAssertEqual(big.count, 2)
        guard case .bounced(let status, _) = big[0] else { return XCTFail() }
        XCTAssertEqual(status, .messageTooBig)
        var utf8 = message(size: 10)
        utf8.needsSMTPUTF8 = true
        guard case .messageDone(let refused, false) = m.send(utf8), case .bounced(let s2, _) = refused[0] else { return XCTFail() }
        XCTAssertEqual(s2, .utf8NotPermitted)
    }

    func testSoftFailuresMoveToTheNextMX() {
        var m = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none)
        _ = m.reply(r(220, "x"))
        _ = m.reply(r(250, "x", "PIPELINING"))
        _ = m.send(message(["a@example.org"]))
        _ = m.reply(r(250, "ok"))
        XCTAssertEqual(m.reply(r(451, "try later")), .wait)
        XCTAssertEqual(
            m.reply(SMTPReply(554, EnhancedStatusCode(5, 5, 1), "no valid recipients")),
            .messageDone([.tryNextHost(.reply(r(451, "try later")))], reset: true),
            "the refused DATA decides nothing: the RCPT's 451 does")
    }

    // MARK: - DATA pipelined with the envelope (RFC 2920 §3.1)

    func testEveryRecipientRefusedAndDataRefusedEndsWithRSET() {
        var m = readyMachine()
        _ = m.send(message())
        _ = m.reply(r(250, "ok"))
        _ = m.reply(SMTPReply(550, EnhancedStatusCode(5, 1, 1), "no such user"))
        XCTAssertEqual(m.reply(SMTPReply(550, EnhancedStatusCode(5, 1, 1), "no such user")), .wait)
        let bounce = RecipientVerdict.bounced(status: EnhancedStatusCode(5, 1, 1), diagnostic: "smtp; 550 5.1.1 no such user")
        XCTAssertEqual(m.reply(SMTPReply(554, EnhancedStatusCode(5, 5, 1), "no valid recipients")), .messageDone([bounce, bounce], reset: true))
        XCTAssertEqual(m.reply(r(250, "reset")), .wait)
        XCTAssertTrue(m.isReady)
    }

    /// A server that takes DATA although it refused every recipient gets `.` alone, never the
    /// content, and the connection carries the next message.
    func testEveryRecipientRefusedButDataTakenSendsOnlyTheDot() {
        var m = readyMachine()
        _ = m.send(message())
        _ = m.reply(r(250, "ok"))
        _ = m.reply(SMTPReply(550, EnhancedStatusCode(5, 1, 1), "no such user"))
        _ = m.reply(SMTPReply(450, EnhancedStatusCode(4, 2, 1), "mailbox busy"))
        XCTAssertEqual(m.reply(r(354, "go ahead")), .sendEmptyContent)
        XCTAssertEqual(m.currentStage, .endOfData)
        XCTAssertEqual(m.reply(r(250, "ok")), .messageDone([
            .bounced(status: EnhancedStatusCode(5, 1, 1), diagnostic: "smtp; 550 5.1.1 no such user"),
            .tryNextHost(.reply(SMTPReply(450, EnhancedStatusCode(4, 2, 1), "mailbox busy"))),
        ], reset: false), "a 250 to the empty message delivers nothing")
        XCTAssertTrue(m.isReady)
    }

    func testRefusedSenderWithPipeliningReadsEveryReplyThenResets() {
        var m = readyMachine()
        _ = m.send(message())
        let refused = SMTPReply(553, EnhancedStatusCode(5, 7, 1), "sender rejected")
        XCTAssertEqual(m.reply(refused), .wait)
        XCTAssertEqual(m.reply(SMTPReply(503, EnhancedStatusCode(5, 5, 1), "need MAIL")), .wait)
        XCTAssertEqual(m.reply(SMTPReply(250, nil, "odd but ignored")), .wait, "the sender's verdict stands for every recipient")
        let bounce = RecipientVerdict.bounced(status: EnhancedStatusCode(5, 7, 1), diagnostic: "smtp; 553 5.7.1 sender rejected")
        XCTAssertEqual(m.reply(SMTPReply(503, EnhancedStatusCode(5, 5, 1), "need RCPT")), .messageDone([bounce, bounce], reset: true))
    }

    func testGreetingFailureAndLostConnection() {
        var m = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none)
        XCTAssertEqual(m.reply(r(421, "busy")), .close(quit: false, verdicts: []))
        var n = SMTPClientStateMachine(heloName: "r", tlsPolicy: .none)
        _ = n.reply(r(220, "x"))
        _ = n.reply(r(250, "x"))
        _ = n.send(message(["a@example.org"]))
        XCTAssertEqual(
            n.connectionFailed(stage: .mail, .timeout("MAIL")),
            .close(quit: false, verdicts: [.tryNextHost(.timeout("MAIL"))]))
    }

    func testEHLOParsing() {
        let e = ServerExtensions(ehlo: ehloFull)
        XCTAssertTrue(e.pipelining && e.startTLS && e.eightBitMIME && e.smtpUTF8 && e.dsn)
        XCTAssertEqual(e.size, 1000)
        XCTAssertEqual(e.authMechanisms, ["PLAIN", "LOGIN"])
        XCTAssertNil(ServerExtensions(ehlo: r(250, "x", "SIZE")).size)
        XCTAssertNil(ServerExtensions(ehlo: r(250, "x", "SIZE 0")).size, "SIZE 0 means no fixed limit")
    }
    // MARK: - What each command may get (RFC 5321 §4.3.2)

    private func readyMachine() -> SMTPClientStateMachine {
        var m = SMTPClientStateMachine(heloName: "relay.test", tlsPolicy: .none)
        _ = m.reply(r(220, "mx.test ESMTP"))
        _ = m.reply(SMTPReply(250, nil, ["mx.test", "PIPELINING"]))
        return m
    }

    private func assertDeferredAsProtocolError(_ action: SMTPClientStateMachine.Action, count: Int = 2, file: StaticString = #filePath, line: UInt = #line) {
        guard case .close(let quit, let verdicts) = action else { return XCTFail("\(action)", file: file, line: line) }
        XCTAssertFalse(quit, file: file, line: line)
        XCTAssertEqual(verdicts.count, count, file: file, line: line)
        for v in verdicts {
            guard case .tryNextHost(let outcome) = v, case .deferred(let status, let diagnostic) = DeliveryPolicy.exhausted(outcome, note: nil)
            else { return XCTFail("\(v)", file: file, line: line) }
            XCTAssertEqual(status, EnhancedStatusCode(4, 5, 0), file: file, line: line)
            XCTAssertTrue(diagnostic.contains("protocol error"), diagnostic, file: file, line: line)
        }
    }

    /// The reply to DATA must be 354 before any content goes out: a 250 there is a lie or an
    /// off-by-one, never a delivery.
    func test250ToDataIsAProtocolError() {
        var m = readyMachine()
        _ = m.send(message())
        XCTAssertEqual(m.reply(r(250, "ok")), .wait)
        XCTAssertEqual(m.reply(r(250, "ok")), .wait)
        XCTAssertEqual(m.reply(r(250, "ok")), .wait)
        assertDeferredAsProtocolError(m.reply(r(250, "got it")))
        XCTAssertFalse(m.isReady)
    }

    func testOnlyA250AfterTheDotDelivers() {
        for code in [220, 221, 235, 251, 334, 354] {
            var m = readyMachine()
            _ = m.send(message())
            _ = m.reply(r(250, "ok"))
            _ = m.reply(r(250, "ok"))
            _ = m.reply(r(250, "ok"))
            XCTAssertEqual(m.reply(r(354, "go")), .sendContent)
            assertDeferredAsProtocolError(m.reply(r(code, "odd")))
        }
    }

    func testPositiveCodesThatAnswerNothingSentAreProtocolErrors() {
        var greeting = SMTPClientStateMachine(heloName: "relay.test", tlsPolicy: .none)
        guard case .close(false, _) = greeting.reply(r(250, "not a greeting")) else { return XCTFail() }
        XCTAssertEqual(greeting.closingOutcome.map { "\($0)" }?.contains("unexpected reply 250 to greeting"), true)

        var mail = readyMachine()
        _ = mail.send(message())
        assertDeferredAsProtocolError(mail.reply(r(354, "to MAIL")))

        var rcpt = readyMachine()
        _ = rcpt.send(message(["a@example.org"]))
        _ = rcpt.reply(r(250, "ok"))
        XCTAssertEqual(rcpt.reply(r(251, "will forward")), .wait, "251 is a success for RCPT")
        XCTAssertEqual(rcpt.reply(r(354, "go")), .sendContent)
    }
}

final class MXResolverPureTests: XCTestCase {
    func testParsesMXRdataAndNullMX() {
        let rdata: [UInt8] = [0, 10, 3] + Array("mx1".utf8) + [7] + Array("example".utf8) + [0]
        XCTAssertEqual(MXResolver.parseMX(rdata)?.0, 10)
        XCTAssertEqual(MXResolver.parseMX(rdata)?.1, "mx1.example")
        XCTAssertEqual(MXResolver.parseMX([0, 0, 0])?.1, "", "RFC 7505 null MX: the root name")
        XCTAssertNil(MXResolver.parseMX([0, 10, 5, 0x61]), "a truncated name")
        XCTAssertNil(MXResolver.parseMX([0, 10, 0xC0, 0x0C]), "a compression pointer is not a label")
    }

    func testOrdersByPreferenceAndShufflesEqualOnes() {
        var random = SystemRandomNumberGenerator()
        var firstSeen = Set<String>()
        for _ in 0..<100 {
            let ordered = MXResolver.order([(20, "c"), (10, "a"), (10, "b"), (30, "d")], using: &random)
            XCTAssertEqual(ordered.map(\.0), [10, 10, 20, 30])
            XCTAssertEqual(Set(ordered.prefix(2).map(\.1)), ["a", "b"])
            firstSeen.insert(ordered[0].1)
        }
        XCTAssertEqual(firstSeen, ["a", "b"], "hosts of equal preference come in random order")
    }

    func testAddressLiterals() {
        XCTAssertEqual(MXResolver.addressLiteral("[192.0.2.1]"), "192.0.2.1")
        XCTAssertEqual(MXResolver.addressLiteral("[IPv6:2001:db8::1]"), "2001:db8::1")
        XCTAssertNil(MXResolver.addressLiteral("example.com"))
        XCTAssertEqual(MXResolver.addressText([127, 0, 0, 1]), "127.0.0.1")
    }

}

final class OperatorTextTests: XCTestCase {
    struct Fake: Error, CustomStringConvertible {
        var description: String
    }

    func testSourcePathsAreDropped() {
        let e = Fake(description: "handshakeFailed(sslError: [Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at /work/main/.build/checkouts/swift-nio-ssl/Sources/CNIOBoringSSL/ssl/handshake.cc:320])")
        XCTAssertEqual(
            SMTPClientConnection.operatorText(e),
            "handshakeFailed(sslError: [Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED])")
        XCTAssertEqual(SMTPClientConnection.operatorText(Fake(description: "plain")), "plain")
    }
}
