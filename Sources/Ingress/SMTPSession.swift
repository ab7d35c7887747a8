import Logging
import Metrics
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
    /// Told of each committed message (the queue manager), after the commit.
    var onQueued: @Sendable (QueueID, _ slot: UInt32, Envelope, Int, _ held: Bool) -> Void
    /// Pre-queue filters; a message for a listener they apply to is held in memory until
    /// they have run.
    var filters = FilterChain([])
    /// Memory for messages held for filters, shared by every session.
    var memoryBudget = MessageMemoryBudget(limit: 512 << 20)
    /// Messages committed to the spool, and their bytes.
    var accepted = Counter(label: "tern_messages_accepted_total")
    var acceptedBytes = Counter(label: "tern_accepted_bytes_total")
}

/// Drives one connection: reads frames, feeds them to the state machine, carries out its
/// actions. Protocol decisions live in `SessionStateMachine`; this type does only I/O.
struct SMTPSession {
    let channel: any Channel
    /// The end of the channel's pipeline: frames in, replies out.
    let inbox: ChannelInbox<SMTPFrame>
    var machine: SessionStateMachine
    let environment: SessionEnvironment
    let listener: ListenerConfig
    let clientAddress: String
    let clientPort: Int
    let logger: Logger
    /// For local submission over the Unix socket: the submitting process's user id.
    var localUID: uid_t? = nil
    /// Adds `From:`, `Date:` and `Message-ID:` when the message has none (`MissingHeaders`).
    var completeHeaders = false

    private var client: String { localUID.map { "local (uid \($0))" } ?? "[\(clientAddress)]:\(clientPort)" }

    /// The framing stopped after a line and waits for this session to say how to read on.
    /// Exactly one `SMTPFramingControl` answers each such line: the machine's action decides
    /// which, so the framing never guesses what the next bytes are.
    var framingPaused = false

    /// The framing and the session disagree about what the bytes are: the stream cannot be
    /// read any further.
    struct UnexpectedFrame: Error {}

    /// The filters following this session (milters see each command), when any apply.
    var filterRun: FilterChainSession? = nil

    mutating func run() async throws {
        filterRun = environment.filters.session(listener: listener.name)
        do {
            try await serve()
        } catch is UnexpectedFrame {
            logger.warning("protocol error from \(client): data where a command was expected, or a command inside data")
            await dropChunkedMessage()
            try? await perform(machine.unexpectedFrame())
            await endFilters()
            return
        } catch {
            await dropChunkedMessage()
            await endFilters()
            throw error
        }
        await dropChunkedMessage()
        await endFilters()
    }

    private func endFilters() async {
        await filterRun?.abortIfOpen()
        await filterRun?.close()
    }

    /// What the filters know of the session now.
    private func filterSession() async -> FilterSession {
        var session = FilterSession(
            client: ClientInfo(
                address: clientAddress, port: clientPort, helo: machine.helo, protocol: machine.protocolName,
                tlsVersion: await currentTLSVersion()),
            listener: listener.name, listenerAddress: channel.localAddress?.ipAddress, authUser: machine.authUser,
            hostname: machine.policy.hostname)
        if let t = machine.transaction { session.mailParameters = t.parameters.filterForm }
        return session
    }

    /// The filters' answer to a command the machine would accept: nil, or the refusal.
    private mutating func checkWithFilters(_ stage: SessionStateMachine.FilterStage) async -> SMTPReply? {
        guard let run = filterRun else { return nil }
        let session = await filterSession()
        let outcome: FilterChain.Outcome
        let what: String
        switch stage {
        case .helo(let name):
            outcome = await run.helo(session, name: name)
            what = "HELO"
        case .mail(let sender, let parameters):
            var s = session
            s.mailParameters = parameters
            outcome = await run.mail(s, sender: sender, parameters: parameters)
            what = "MAIL"
        case .rcpt(let recipient, let parameters):
            outcome = await run.rcpt(session, recipient: recipient, parameters: parameters)
            what = "RCPT"
        }
        for failure in outcome.failures { logger.warning("\(client): filter \(failure)") }
        switch outcome.verdict {
        case .reject(let reply), .tempfail(let reply):
            var detail = ""
            if let t = machine.transaction { detail = "; from=<\(t.sender)>" }
            if case .rcpt(let r, _) = stage { detail += "; to=<\(r)>" }
            logger.info("reject: \(what) from \(client): \(reply) (filter \(outcome.filter ?? "-"))\(detail)")
            return reply
        default:
            return nil
        }
    }

    private mutating func dropChunkedMessage() async {
        guard let pending = chunked else { return }
        chunked = nil
        await pending.intake.writer.abort()
    }

    private mutating func serve() async throws {
        if let run = filterRun, run.usesCommandStages {
            // The connect stage answers before the greeting: a refusal is the greeting (554, or
            // 421 for a temporary one; RFC 5321 §3.1) and the session ends.
            let outcome = await run.connect(await filterSession())
            for failure in outcome.failures { logger.warning("\(client): filter \(failure)") }
            switch outcome.verdict {
            case .reject(let reply), .tempfail(let reply):
                let code = reply.code >= 500 ? 554 : 421
                let refusal = SMTPReply(code, reply.enhanced ?? EnhancedStatusCode(code / 100, 7, 1), reply.lines)
                logger.info("reject: CONNECT from \(client): \(refusal) (filter \(outcome.filter ?? "-"))")
                try await perform(machine.refusedAtConnect(refusal))
                return
            default:
                break
            }
        }
        try await send(machine.greeting())
        while !machine.isClosed, let frame = try await inbox.next() {
            let action: SessionStateMachine.Action?
            switch frame {
            case .line(let line, let paused):
                framingPaused = paused
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
            case .data, .dataEnd, .chunkEnd:
                throw UnexpectedFrame()
            }
            if let action { try await perform(action) }
            // A transaction that ended without its message: filters that saw MAIL forget it.
            if machine.transaction == nil { await filterRun?.abortIfOpen() }
            // A paused line whose answer was deferred (shutdown while idle never is) still
            // gets its control: the framing must never wait for one that does not come.
            if framingPaused, !machine.isClosed { control(.readCommands) }
        }
    }

    /// Tells a paused framing how to read on, as the machine decided with `action`. An action
    /// that changes the framing after a line that did not pause it means the two disagree.
    private mutating func resumeFraming(after action: SessionStateMachine.Action) throws {
        let next = SessionStateMachine.framing(after: action)
        guard framingPaused else {
            switch next {
            case .commands, .closed: return
            case .data, .chunk, .tls: throw UnexpectedFrame()
            }
        }
        switch next {
        case .commands: control(.readCommands)
        case .data(let normalize): control(.readData(normalizeBareLineEndings: normalize))
        case .chunk(let size): control(.readChunk(size: size))
        case .tls, .closed: break  // STARTTLS sends its own control, with its reply
        }
    }

    private mutating func perform(_ action: SessionStateMachine.Action) async throws {
        if case .startTLS = action {} else { try resumeFraming(after: action) }
        switch action {
        case .reply(let reply):
            // More commands already in: their replies go out together (RFC 2920 §3.2).
            try await send(reply, flush: !inbox.framesWaiting)
        case .close(let reply):
            try await send(reply)
            channel.close(promise: nil)
        case .replyThenClose(let reply, let final):
            try await send(reply)
            try await send(final)
            channel.close(promise: nil)
        case .startTLS(let reply):
            guard framingPaused, let context = environment.tlsContext else { throw UnexpectedFrame() }
            control(.startTLS(reply: ByteBuffer(bytes: reply.encodedBytes), context: context))
            machine.tlsEstablished()
            logger.debug("STARTTLS from \(client)")
        case .beginData(let reply, let normalize):
            try await send(reply)
            let outcome = try await receiveMessage(normalize: normalize)
            try await perform(machine.dataEnded(outcome))
        case .checkCommand(let stage):
            let refusal = await checkWithFilters(stage)
            try await perform(machine.filterChecked(refusal: refusal))
        case .verifyCredentials(let user, let password):
            try await verify(user: user, password: password)
        case .receiveChunk(let size, let last, let first, let normalize):
            try await receiveChunk(size: size, last: last, first: first, normalize: normalize)
        case .discardChunk(let reply, _):
            var none: Intake?
            var checker = LineEndingChecker()
            guard try await readChunk(into: &none, checker: &checker) else { throw CancellationError() }
            try await send(reply)
        }
        await abandonChunkedMessage()
    }

    // MARK: - AUTH

    private mutating func verify(user: String, password: String) async throws {
        let throttle = environment.authThrottle
        if throttle.isBlocked(clientAddress) {
            try await perform(.close(SMTPReply(421, .temporaryAuthFailure, "Error: too many failed authentications")))
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
            Counter(label: "tern_auth_failures_total", dimensions: [("listener", listener.name)]).increment()
            logger.notice("warning: \(client): SASL authentication failed for user \(user)")
            try await Task.sleep(for: delay)
        }
        try await perform(machine.authChecked(user: user, success: ok))
        if !ok, throttle.isBlocked(clientAddress), !machine.isClosed {
            try await perform(.close(SMTPReply(421, .temporaryAuthFailure, "Error: too many failed authentications")))
        }
    }

    // MARK: - DATA and BDAT

    /// A message on its way into the spool: the writer, and what was seen so far.
    struct Intake {
        let writer: SpoolWriter
        let tlsVersion: String?
        /// The whole message, when filters must see it before anything is written.
        var buffer: [UInt8]?
        /// The buffer's share of the memory budget.
        var reservation: MessageMemoryBudget.Reservation?
        /// The budget had no room for this message: refused with 452 4.3.1 at the end.
        var overBudget = false
        var size = 0
        /// The client's `Received:` headers (Tern's own is not fed to it).
        var hops = HopCounter()
        var tooBig = false
        var writeFailed = false
        /// The write failed because the file system is full.
        var outOfSpace = false
    }

    /// Opens a spool file and writes Tern's `Received:` header into it.
    private func startMessage() async throws -> Intake {
        guard let transaction = machine.transaction else { throw UnexpectedFrame() }
        let writer = environment.spool.begin()
        var intake = Intake(writer: writer, tlsVersion: await currentTLSVersion())
        if environment.filters.applies(to: listener.name) || completeHeaders {
            intake.buffer = []
            intake.reservation = environment.memoryBudget.reserve()
        }
        let received = ReceivedHeader.make(
            helo: machine.helo, clientAddress: clientAddress, hostname: machine.policy.hostname,
            protocolName: machine.protocolName, queueID: writer.id.rawValue, tlsVersion: intake.tlsVersion,
            recipients: transaction.recipients.map(\.address), localUID: localUID)
        await append(Array(received.utf8), to: &intake, counted: false)
        return intake
    }

    /// Adds client bytes to the message, unless it is already too big or the spool failed;
    /// the client's bytes are read to the end either way.
    private func append(_ bytes: [UInt8], to intake: inout Intake, counted: Bool = true) async {
        if counted {
            intake.size += bytes.count
            intake.hops.feed(bytes)
            if intake.size > machine.policy.maxMessageSize { intake.tooBig = true }
        }
        guard !intake.tooBig, !intake.writeFailed, !intake.overBudget else { return }
        if intake.buffer != nil, let reservation = intake.reservation {
            guard environment.memoryBudget.grow(reservation, by: bytes.count) else {
                // No room: stop holding this message (its bytes are still read to the end).
                intake.overBudget = true
                intake.buffer = nil
                intake.reservation = nil
                logger.warning("\(intake.writer.id): message memory budget of \(environment.memoryBudget.limit) bytes exhausted")
                return
            }
            intake.buffer?.append(contentsOf: bytes)
            return
        }
        do {
            try await intake.writer.append(bytes)
        } catch {
            intake.writeFailed = true
            intake.outOfSpace = (error as? SpoolError)?.isOutOfSpace == true
            logger.error("\(intake.writer.id): spool write failed: \(error)")
        }
    }

    /// Decides how a fully received message ends, and commits it if it is acceptable.
    private func finishMessage(_ intake: consuming Intake, violations: DataDecoder.Violations, normalized: Bool) async throws -> DataOutcome {
        guard let transaction = machine.transaction else {
            await intake.writer.abort()
            throw UnexpectedFrame()
        }
        let writer = intake.writer
        let outcome: DataOutcome
        if intake.tooBig {
            outcome = .tooBig
        } else if intake.hops.received >= machine.policy.maxHops {
            outcome = .tooManyHops
        } else if violations.contains(.nul) {
            outcome = .containsNUL
        } else if !normalized, !violations.isDisjoint(with: [.bareLF, .bareCR]) {
            outcome = .bareLineEnding
        } else if intake.writeFailed {
            outcome = intake.outOfSpace ? .outOfSpace : .spoolFailure
        } else if intake.overBudget {
            outcome = .outOfSpace
        } else {
            var envelope = Envelope(
                sender: transaction.sender.description,
                recipients: transaction.recipients,
                body: transaction.parameters.body?.rawValue,
                smtpUTF8: transaction.parameters.smtpUTF8,
                ret: transaction.parameters.ret,
                envid: transaction.parameters.envid,
                client: ClientInfo(
                    address: clientAddress, port: clientPort, helo: machine.helo, protocol: machine.protocolName,
                    tlsVersion: intake.tlsVersion),
                authUser: machine.authUser,
                listener: listener.name,
                arrivalMillis: Self.nowMillis())
            var held = false
            if var buffer = intake.buffer {
                // The buffer moves into the filter message: the intake must not keep a second
                // reference, or the body would be copied on its first change.
                intake.buffer = nil
                let result = await runFilters(&buffer, envelope: &envelope, writer: writer)
                switch result {
                case .proceed(let hold): held = hold
                case .stop(let outcome):
                    await writer.abort()
                    return outcome
                }
            }
            do {
                if held { try await environment.spool.writeMeta(writer.id, { var m = DeliveryMeta(); m.held = true; return m }()) }
                try await writer.commit(envelope)
                // As Postfix logs a message's arrival: smtpd's (or pickup's) line, then qmgr's.
                if let localUID {
                    logger.info("\(writer.id): uid=\(localUID) from=<\(transaction.sender)>", metadata: [LogSink.serviceKey: "pickup"])
                } else {
                    logger.info(
                        "\(writer.id): client=\(postfixClient)\(machine.authUser.map { ", sasl_username=\($0)" } ?? "")")
                }
                logger.info(
                    "\(writer.id): from=<\(transaction.sender)>, size=\(writer.size), nrcpt=\(transaction.recipients.count), client=\(client)\(machine.authUser.map { ", sasl_username=\($0)" } ?? "")\(intake.tlsVersion.map { ", tls=\($0)" } ?? "")",
                    metadata: [LogSink.serviceKey: "qmgr"])
                environment.accepted.increment()
                environment.acceptedBytes.increment(by: writer.size)
                environment.onQueued(writer.id, writer.slot, envelope, writer.size, held)
                return .queued(writer.id.rawValue)
            } catch {
                logger.error("\(writer.id): spool commit failed: \(error)")
                await writer.abort()
                return (error as? SpoolError)?.isOutOfSpace == true ? .outOfSpace : .spoolFailure
            }
        }
        await writer.abort()
        Self.countReject(stage: "END-OF-MESSAGE", SessionStateMachine.reply(for: outcome))
        // As Postfix logs it, with the reply the client got (pflogsumm counts these).
        let to = transaction.recipients.first?.address ?? ""
        logger.info(
            "\(writer.id): reject: END-OF-MESSAGE from \(postfixClient): \(SessionStateMachine.reply(for: outcome)); from=<\(transaction.sender)> to=<\(to)> proto=\(machine.protocolName) helo=<\(machine.helo ?? "")>")
        return outcome
    }

    enum FilterResult {
        case proceed(hold: Bool)
        case stop(DataOutcome)
    }

    /// Runs the chain over a buffered message; writes what they leave (edited headers, body,
    /// envelope) to the spool writer, or says how the message ends instead.
    private func runFilters(_ buffer: inout [UInt8], envelope: inout Envelope, writer: SpoolWriter) async -> FilterResult {
        var (headers, bodyOffset) = HeaderBlock.parse(buffer)
        if completeHeaders {
            let added = MissingHeaders.add(
                to: &headers, sender: envelope.sender, queueID: writer.id.rawValue, hostname: machine.policy.hostname)
            if !added.isEmpty { logger.info("\(writer.id): added \(added.joined(separator: ", ")) (missing)") }
        }
        // The body is the buffer itself, its header bytes moved out in place: one copy of the
        // message in memory, not two.
        buffer.removeSubrange(0..<bodyOffset)
        var message = FilterMessage(
            queueID: writer.id.rawValue, sender: envelope.sender, recipients: envelope.recipients, headers: headers,
            body: buffer)
        buffer = []
        var session = FilterSession(
            client: envelope.client, listener: listener.name, listenerAddress: channel.localAddress?.ipAddress,
            authUser: machine.authUser, hostname: machine.policy.hostname)
        if let t = machine.transaction { session.mailParameters = t.parameters.filterForm }
        let outcome = await filterRun?.endOfMessage(session, &message)
            ?? FilterChain.Outcome(verdict: .continue, filter: nil, failures: [])
        for failure in outcome.failures { logger.warning("\(writer.id): filter \(failure)") }
        let filter = outcome.filter ?? "-"
        var hold = false
        switch outcome.verdict {
        case .continue, .accept: break
        case .reject(let reply), .tempfail(let reply):
            Self.countReject(stage: "filter", reply)
            logger.info("\(writer.id): reject by filter \(filter): \(reply); from=<\(envelope.sender)>")
            return .stop(.filtered(reply))
        case .discard:
            logger.info("\(writer.id): discarded by filter \(filter); from=<\(envelope.sender)>")
            return .stop(.discarded(writer.id.rawValue))
        case .quarantine(let reason):
            logger.info("\(writer.id): held by filter \(filter): \(reason)")
            hold = true
        }
        guard !message.recipients.isEmpty else {
            logger.info("\(writer.id): discarded: the filters removed every recipient")
            return .stop(.discarded(writer.id.rawValue))
        }
        envelope.sender = message.sender
        envelope.recipients = message.recipients
        do {
            // Headers and body separately: `content` would be a third copy.
            try await writer.append(message.headers.serialized)
            try await writer.append(message.body)
        } catch {
            logger.error("\(writer.id): spool write failed: \(error)")
            return .stop((error as? SpoolError)?.isOutOfSpace == true ? .outOfSpace : .spoolFailure)
        }
        return .proceed(hold: hold)
    }

    /// Streams a DATA message into the spool and reports how it ended.
    private mutating func receiveMessage(normalize: Bool) async throws -> DataOutcome {
        var intake = try await startMessage()
        var violations: DataDecoder.Violations = []
        var ended = false
        loop: while let frame = try await inbox.next() {
            switch frame {
            case .data(let chunk):
                await append(chunk, to: &intake)
            case .dataEnd(let v):
                violations = v
                ended = true
                break loop
            case .timeout:
                await intake.writer.abort()
                try await perform(machine.timeout())
                throw CancellationError()
            case .shutdown:
                _ = machine.shutdown()
            case .line, .lineTooLong, .chunkEnd:
                await intake.writer.abort()
                throw UnexpectedFrame()
            }
        }
        guard ended else {
            // The client went away before <CRLF>.<CRLF>: what arrived is not a message.
            await intake.writer.abort()
            logger.info("lost connection after DATA from \(client): nothing queued")
            throw CancellationError()
        }
        return try await finishMessage(consume intake, violations: violations, normalized: normalize)
    }

    /// Reads one BDAT chunk into the message under way (or into nowhere, when `discard`).
    /// Returns false when the connection ended or timed out inside the chunk.
    private mutating func readChunk(into intake: inout Intake?, checker: inout LineEndingChecker) async throws -> Bool {
        while let frame = try await inbox.next() {
            switch frame {
            case .data(let bytes):
                guard intake != nil else { continue }
                var out: [UInt8] = []
                out.reserveCapacity(bytes.count)
                bytes.withUnsafeBytes { checker.feed($0, into: &out) }
                await append(out, to: &intake!)
            case .chunkEnd:
                return true
            case .timeout:
                try await perform(machine.timeout())
                return false
            case .shutdown:
                _ = machine.shutdown()
            case .line, .lineTooLong, .dataEnd:
                if let intake { await intake.writer.abort() }
                intake = nil
                throw UnexpectedFrame()
            }
        }
        return false
    }

    /// The message a BDAT sequence is building, between its chunks.
    var chunked: (intake: Intake, checker: LineEndingChecker)? = nil

    private mutating func receiveChunk(size: Int, last: Bool, first: Bool, normalize: Bool) async throws {
        var intake: Intake?
        var checker = LineEndingChecker(normalizeBareLineEndings: normalize)
        if first {
            intake = try await startMessage()
        } else if let pending = chunked {
            intake = pending.intake
            checker = pending.checker
        }
        chunked = nil
        guard try await readChunk(into: &intake, checker: &checker), var current = intake else {
            if let intake { await intake.writer.abort() }
            throw CancellationError()
        }
        intake = nil  // `current` is the one reference to the message's buffer
        if last || current.tooBig {
            var tail: [UInt8] = []
            checker.finish(into: &tail)
            if !tail.isEmpty { await append(tail, to: &current) }
            let outcome = try await finishMessage(consume current, violations: checker.violations, normalized: normalize)
            try await perform(machine.dataEnded(outcome))
        } else {
            chunked = (current, checker)
            try await perform(machine.chunkReceived(size: size))
        }
    }

    /// Drops a BDAT message that the session abandoned (RSET, EHLO, QUIT).
    private mutating func abandonChunkedMessage() async {
        guard !machine.isReceivingMessage else { return }
        await dropChunkedMessage()
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

    private func send(_ reply: SMTPReply, flush: Bool = true) async throws {
        try await inbox.write(ByteBuffer(bytes: reply.encodedBytes), flush: flush)
    }

    /// Tells the framing how to read on. Not awaited: it reaches the event loop after every
    /// reply written before it, and the session's next step is to read, which waits anyway.
    private mutating func control(_ control: SMTPFramingControl) {
        framingPaused = false
        channel.triggerUserOutboundEvent(control, promise: nil)
    }

    /// The client as Postfix names it in its logs (no reverse lookup: `unknown[IP]`).
    private var postfixClient: String { localUID == nil ? "unknown[\(clientAddress)]" : "local" }

    /// A refused command, as Postfix logs it:
    /// `NOQUEUE: reject: RCPT from unknown[IP]: 554 5.7.1 …; from=<…> to=<…> proto=ESMTP helo=<…>`.
    private func logReject(_ line: [UInt8], _ reply: SMTPReply) {
        // A SASL response arrives here empty: it carries credentials and is never logged.
        let verbBytes = line.prefix(while: { $0 != 0x20 })
        let verb = String(decoding: verbBytes, as: UTF8.self).uppercased()
        let safeVerb = line.isEmpty ? "AUTH" : (1...10).contains(verb.count) && verb.allSatisfy({ $0.isLetter }) ? verb : "-"
        var from = machine.transaction.map { "\($0.sender)" }
        var to: String?
        switch try? SMTPCommandParser.parse(line) {
        case .mail(let sender, _): from = "\(sender)"
        case .rcpt(let path, _): to = path.mailbox.map { "\($0)" } ?? "postmaster"
        default: break
        }
        var detail = ""
        if let from { detail += " from=<\(from)>" }
        if let to { detail += " to=<\(to)>" }
        detail += " proto=\(machine.protocolName)"
        if let helo = machine.helo { detail += " helo=<\(helo)>" }
        logger.info("NOQUEUE: reject: \(safeVerb) from \(postfixClient): \(reply);\(detail)")
        Self.countReject(stage: Self.countedVerbs.contains(safeVerb) ? safeVerb : "other", reply)
    }

    /// Verbs that get their own `stage` in `tern_rejects_total`; anything a client makes up
    /// is `other`, so no client can add series.
    static let countedVerbs: Set<String> = [
        "CONNECT", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "END-OF-MESSAGE", "RSET", "VRFY", "EXPN", "NOOP", "QUIT",
    ]

    /// `tern_rejects_total{stage, code}`: refusals by where and why (reply code and enhanced code).
    static func countReject(stage: String, _ reply: SMTPReply) {
        let code = "\(reply.code)" + (reply.enhanced.map { " \($0)" } ?? "")
        Counter(label: "tern_rejects_total", dimensions: [("stage", stage), ("code", code)]).increment()
    }
}
