import Logging
import NIOCore
import NIOPosix
import NIOSSL
import SMTPProtocol
import Spool
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What every session of a server shares.
struct SessionEnvironment: Sendable {
    var spool: Spool
    var users: UserDatabase?
    var tlsContext: NIOSSLContext?
    var threadPool: NIOThreadPool
    var authThrottle: AuthThrottle
    var logger: Logger
}

/// Drives one connection: reads frames, feeds them to the state machine, carries out its
/// actions. Protocol decisions live in `SessionStateMachine`; this type does only I/O.
struct SMTPSession {
    let channel: any Channel
    let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>
    var frames: NIOAsyncChannelInboundStream<SMTPFrame>.AsyncIterator
    var machine: SessionStateMachine
    let environment: SessionEnvironment
    let listener: ListenerConfig
    let clientAddress: String
    let clientPort: Int
    let logger: Logger

    private var client: String { "[\(clientAddress)]:\(clientPort)" }

    mutating func run() async throws {
        try await send(machine.greeting())
        while !machine.isClosed, let frame = try await frames.next() {
            let action: SessionStateMachine.Action?
            var pausedFraming = false
            switch frame {
            case .line(let line):
                pausedFraming = SMTPFramingHandler.pausesFraming(line)
                let isSASL = machine.awaitingSASLResponse
                action = machine.line(line)
                if case .reply(let r) = action, !r.isPositive { logReject(isSASL ? [] : line, r) }
            case .lineTooLong:
                action = machine.lineTooLong()
                logger.info("reject: line too long from \(client)")
            case .timeout:
                action = machine.timeout()
                logger.info("timeout after \(machine.transaction == nil ? "command" : "DATA") from \(client)")
            case .shutdown:
                action = machine.shutdown()
            case .data, .dataEnd:
                preconditionFailure("message data outside DATA")
            }
            if let action { try await perform(action, pausedFraming: pausedFraming) }
        }
    }

    private mutating func perform(_ action: SessionStateMachine.Action, pausedFraming: Bool) async throws {
        switch action {
        case .reply(let reply):
            try await send(reply)
            if pausedFraming { try await control(.readCommands) }
        case .close(let reply):
            try await send(reply)
            channel.close(promise: nil)
        case .replyThenClose(let reply, let final):
            try await send(reply)
            try await send(final)
            channel.close(promise: nil)
        case .startTLS(let reply):
            guard let context = environment.tlsContext else { preconditionFailure("STARTTLS offered without a context") }
            try await control(.startTLS(reply: ByteBuffer(string: reply.encoded), context: context))
            machine.tlsEstablished()
            logger.debug("STARTTLS from \(client)")
        case .beginData(let reply, let normalize):
            try await send(reply)
            try await control(.readData(normalizeBareLineEndings: normalize))
            let outcome = try await receiveMessage(normalize: normalize)
            try await perform(machine.dataEnded(outcome), pausedFraming: false)
        case .verifyCredentials(let user, let password):
            try await verify(user: user, password: password)
        }
    }

    // MARK: - AUTH

    private mutating func verify(user: String, password: String) async throws {
        let throttle = environment.authThrottle
        if throttle.isBlocked(clientAddress) {
            try await perform(.close(SMTPReply(421, .temporaryAuthFailure, "Error: too many failed authentications")), pausedFraming: false)
            return
        }
        let ok: Bool
        if let users = environment.users {
            ok = try await environment.threadPool.runIfActive { users.verify(user: user, password: password) }
        } else {
            ok = false
        }
        if ok {
            logger.info("\(client): sasl_username=\(user)")
        } else {
            let delay = throttle.recordFailure(clientAddress)
            logger.notice("warning: \(client): SASL authentication failed for user \(user)")
            try await Task.sleep(for: delay)
        }
        try await perform(machine.authChecked(user: user, success: ok), pausedFraming: false)
        if !ok, throttle.isBlocked(clientAddress), !machine.isClosed {
            try await perform(.close(SMTPReply(421, .temporaryAuthFailure, "Error: too many failed authentications")), pausedFraming: false)
        }
    }

    // MARK: - DATA

    /// Streams the message into the spool and reports how it ended. The client's bytes are
    /// read to the end of data whatever happens, so that the next command is read as one.
    private mutating func receiveMessage(normalize: Bool) async throws -> DataOutcome {
        guard let transaction = machine.transaction else { preconditionFailure("DATA without a transaction") }
        let writer = environment.spool.begin()
        let tlsVersion = await currentTLSVersion()
        let received = ReceivedHeader.make(
            helo: machine.helo, clientAddress: clientAddress, hostname: machine.policy.hostname,
            protocolName: machine.protocolName, queueID: writer.id.rawValue, tlsVersion: tlsVersion,
            recipients: transaction.recipients.map(\.address))
        let limit = machine.policy.maxMessageSize
        var received_ = 0
        var tooBig = false
        var writeFailed = false
        do {
            try await writer.append(Array(received.utf8))
        } catch {
            writeFailed = true
            logger.error("\(writer.id): spool write failed: \(error)")
        }
        var violations: DataDecoder.Violations = []
        var ended = false
        loop: while let frame = try await frames.next() {
            switch frame {
            case .data(let chunk):
                received_ += chunk.count
                if received_ > limit { tooBig = true }
                guard !tooBig, !writeFailed else { continue }
                do {
                    try await writer.append(chunk)
                } catch {
                    writeFailed = true
                    logger.error("\(writer.id): spool write failed: \(error)")
                }
            case .dataEnd(let v):
                violations = v
                ended = true
                break loop
            case .timeout:
                await writer.abort()
                try await perform(machine.timeout(), pausedFraming: false)
                throw CancellationError()
            case .shutdown:
                _ = machine.shutdown()
            case .line, .lineTooLong:
                preconditionFailure("command frame inside DATA")
            }
        }
        guard ended else {
            // The client went away before <CRLF>.<CRLF>: what arrived is not a message.
            await writer.abort()
            logger.info("lost connection after DATA from \(client): nothing queued")
            throw CancellationError()
        }
        let outcome: DataOutcome
        if tooBig {
            outcome = .tooBig
        } else if violations.contains(.nul) {
            outcome = .containsNUL
        } else if !normalize, !violations.isDisjoint(with: [.bareLF, .bareCR]) {
            outcome = .bareLineEnding
        } else if writeFailed {
            outcome = .spoolFailure
        } else {
            let envelope = Envelope(
                sender: transaction.sender.description,
                recipients: transaction.recipients,
                body: transaction.parameters.body?.rawValue,
                smtpUTF8: transaction.parameters.smtpUTF8,
                ret: transaction.parameters.ret,
                envid: transaction.parameters.envid,
                client: ClientInfo(
                    address: clientAddress, port: clientPort, helo: machine.helo, protocol: machine.protocolName,
                    tlsVersion: tlsVersion),
                authUser: machine.authUser,
                listener: listener.name,
                arrivalMillis: Self.nowMillis())
            do {
                try await writer.commit(envelope)
                logger.info(
                    "\(writer.id): from=<\(transaction.sender)>, size=\(writer.size), nrcpt=\(transaction.recipients.count), client=\(client)\(machine.authUser.map { ", sasl_username=\($0)" } ?? "")\(tlsVersion.map { ", tls=\($0)" } ?? "")"
                )
                return .queued(writer.id.rawValue)
            } catch {
                logger.error("\(writer.id): spool commit failed: \(error)")
                await writer.abort()
                return .spoolFailure
            }
        }
        await writer.abort()
        logger.info("reject: DATA from \(client): \(outcome); from=<\(transaction.sender)>")
        return outcome
    }

    static func nowMillis() -> Int64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Int64(now.tv_sec) * 1000 + Int64(now.tv_nsec) / 1_000_000
    }

    private func currentTLSVersion() async -> String? {
        guard machine.tlsActive else { return nil }
        let version = try? await channel.nioSSL_tlsVersion().get()
        switch version {
        case .tlsv13: return "TLSv1.3"
        case .tlsv12: return "TLSv1.2"
        case .tlsv11: return "TLSv1.1"
        case .tlsv1: return "TLSv1"
        default: return "TLS"
        }
    }

    // MARK: - I/O

    private func send(_ reply: SMTPReply) async throws {
        try await outbound.write(ByteBuffer(string: reply.encoded))
    }

    private func control(_ control: SMTPFramingControl) async throws {
        try await channel.triggerUserOutboundEvent(control).get()
    }

    private func logReject(_ line: [UInt8], _ reply: SMTPReply) {
        // A SASL response arrives here empty: it carries credentials and is never logged.
        let verbBytes = line.prefix(while: { $0 != 0x20 })
        let verb = String(decoding: verbBytes, as: UTF8.self).uppercased()
        let safeVerb = line.isEmpty ? "AUTH" : (1...10).contains(verb.count) && verb.allSatisfy({ $0.isLetter }) ? verb : "-"
        var detail = ""
        if let t = machine.transaction { detail = "; from=<\(t.sender)>" }
        if safeVerb == "RCPT" || safeVerb == "MAIL" {
            let text = String(decoding: line, as: UTF8.self)
            detail += "; \(text.prefix(300))"
        }
        logger.info("reject: \(safeVerb) from \(client): \(reply)\(detail)")
    }
}
