import SMTPProtocol
import TernCore

/// What a session needs to know from the config, fixed for its lifetime.
struct SessionPolicy: Sendable {
    var kind: ListenerKind
    var hostname: String
    /// A certificate is configured (STARTTLS can be offered).
    var tlsAvailable: Bool
    /// A users file is configured (AUTH can be offered, over TLS).
    var authAvailable: Bool
    var maxMessageSize: Int
    var maxRecipients: Int
    var maxErrors: Int
    /// `Received:` headers at which a message is refused as a loop.
    var maxHops = 50
    /// Below this many free bytes on the spool's file system, MAIL gets `452 4.3.1`.
    var minFreeSpace = 0
    /// The spool's free bytes now; injected, as a clock is, so tests can pass any figure.
    var freeSpace: @Sendable () -> Int = { .max }
    /// Filters (milters) answer HELO, MAIL and RCPT: each accepted one is checked with them
    /// before it takes effect.
    var commandFilters = false
    /// Senders refused at MAIL (addresses and `@domains`).
    var rejectSenders: [String] = []
    var allowedSenders: [String: [String]]
    var bareLineEndings: BareLineEndingPolicy
}

/// How a message's DATA ended, as the driver saw it.
enum DataOutcome: Equatable, Sendable {
    case queued(String)
    case tooBig
    case containsNUL
    case bareLineEnding
    /// The message already passed through `maxHops` relays: a mail loop.
    case tooManyHops
    case spoolFailure
    /// The spool's file system filled up while the message was written.
    case outOfSpace
    /// A filter refused the message (its own reply), or failed and its default refused it.
    case filtered(SMTPReply)
    /// A filter said to drop it: the client hears the usual 250, nothing is queued.
    case discarded(String)
}

/// The SMTP server session as a pure state machine: methods named after events, each
/// returning what the driver must do. No sockets, no clocks, no disk.
/// - SeeAlso: RFC 5321 §4.1.4 (order of commands), RFC 3207, RFC 4954, RFC 2920
struct SessionStateMachine {
    enum Action: Equatable, Sendable {
        case reply(SMTPReply)
        /// Reply, then close the connection.
        case close(SMTPReply)
        /// Reply, then send an unsolicited final reply (RFC 5321 §3.8) and close.
        case replyThenClose(SMTPReply, final: SMTPReply)
        /// Reply 220, then start the TLS handshake.
        case startTLS(SMTPReply)
        /// Reply 354, then read the message; `normalize` turns bare CR/LF into CRLF.
        case beginData(SMTPReply, normalize: Bool)
        /// Check these credentials and report with `authChecked`.
        case verifyCredentials(user: String, password: String)
        /// Read a BDAT chunk into the message (starting it if `first`), then report with
        /// `chunkReceived` or, after the last, `dataEnded`.
        case receiveChunk(size: Int, last: Bool, first: Bool, normalize: Bool)
        /// Read a refused BDAT chunk of `size` bytes off the wire and throw it away, then
        /// send the reply (RFC 3030 §2: the chunk follows whatever the answer).
        case discardChunk(SMTPReply, size: Int)
        /// The command is acceptable here; ask the filters, then report with `filterChecked`.
        case checkCommand(FilterStage)
    }

    /// A command the filters see before it takes effect.
    enum FilterStage: Equatable, Sendable {
        case helo(String)
        case mail(sender: String, parameters: [String])
        case rcpt(String, parameters: [String])
    }

    /// What an accepted command does once the filters agree.
    private enum Pending: Equatable {
        case helo(name: String, esmtp: Bool, reply: SMTPReply)
        case mail(Transaction, reply: SMTPReply)
        case rcpt(EnvelopeRecipient, reply: SMTPReply)
    }

    /// How the framing reads on after an action, when the line that led to it paused the
    /// framing. The machine is the one owner of this decision: the framing only stops after a
    /// line that might change how the next bytes are read, and the action says how they are.
    enum NextFraming: Equatable, Sendable {
        /// Command lines (also SASL responses, which are lines).
        case commands
        /// A DATA stream.
        case data(normalize: Bool)
        /// A BDAT chunk of this many bytes, accepted or refused.
        case chunk(size: Int)
        /// The TLS handshake, then command lines.
        case tls
        /// Nothing: the connection closes.
        case closed
    }

    private enum Phase: Equatable {
        /// Connected; no HELO/EHLO yet (also after STARTTLS).
        case start
        /// HELO/EHLO done, no transaction.
        case ready
        /// MAIL accepted.
        case mail
        /// Receiving DATA or a BDAT chunk.
        case data
        /// Between BDAT chunks of one message.
        case chunking
        /// Waiting for a SASL response line.
        case auth(AuthStep)
        /// Credentials are being checked.
        case verifying
        case closed
    }

    private enum AuthStep: Equatable {
        case plain
        case loginUser
        case loginPassword(user: String)
    }

    struct Transaction: Equatable, Sendable {
        var sender: ReversePath
        var parameters: MailParameters
        var recipients: [EnvelopeRecipient] = []
    }

    /// What the framing must read after `action`.
    static func framing(after action: Action) -> NextFraming {
        switch action {
        case .reply, .verifyCredentials, .checkCommand: return .commands
        case .close, .replyThenClose: return .closed
        case .startTLS: return .tls
        case .beginData(_, let normalize): return .data(normalize: normalize)
        case .receiveChunk(let size, _, _, _), .discardChunk(_, let size): return .chunk(size: size)
        }
    }

    let policy: SessionPolicy
    /// The client is in `mynetworks`.
    let trusted: Bool
    private var phase = Phase.start
    private(set) var tlsActive: Bool
    private(set) var authUser: String?
    private(set) var helo: String?
    private(set) var esmtp = false
    private(set) var transaction: Transaction?
    private var errors = 0
    private var closeWhenIdle = false
    private var pending: Pending?

    init(policy: SessionPolicy, trusted: Bool, tlsActive: Bool) {
        self.policy = policy
        self.trusted = trusted
        self.tlsActive = tlsActive
    }

    /// The protocol name for `Received:` (RFC 3848).
    var protocolName: String {
        guard esmtp else { return tlsActive ? "SMTPS" : "SMTP" }
        return "ESMTP" + (tlsActive ? "S" : "") + (authUser != nil ? "A" : "")
    }

    var isClosed: Bool { phase == .closed }

    /// A message is being received (DATA, or a BDAT sequence not yet ended).
    var isReceivingMessage: Bool { phase == .data || phase == .chunking }

    /// Bare CR/LF are turned into CRLF for this client rather than refused.
    private var normalizeBareLineEndings: Bool {
        switch policy.bareLineEndings {
        case .reject: return false
        case .normalize: return true
        case .normalizeTrusted: return trusted
        }
    }

    /// The next line is a SASL response, not a command (and must never be logged).
    var awaitingSASLResponse: Bool {
        if case .auth = phase { return true }
        return false
    }

    // MARK: - Events

    func greeting() -> SMTPReply {
        SMTPReply(220, nil, "\(policy.hostname) ESMTP Tern")
    }

    /// A line from the client: a command, or a SASL response while AUTH is under way.
    mutating func line(_ bytes: [UInt8]) -> Action {
        if case .auth(let step) = phase { return saslResponse(bytes, step: step) }
        let command: SMTPCommand
        do {
            command = try SMTPCommandParser.parse(bytes)
        } catch {
            return fail(error.reply)
        }
        return self.command(command)
    }

    mutating func lineTooLong() -> Action {
        if case .auth = phase { phase = helo == nil ? .start : .ready }
        return fail(.lineTooLong)
    }

    mutating func timeout() -> Action {
        phase = .closed
        return .close(SMTPReply(421, .timeout, "\(policy.hostname) Error: timeout exceeded"))
    }

    /// The server is going down: close now if idle, else once the transaction ends.
    mutating func shutdown() -> Action? {
        switch phase {
        case .mail, .data, .chunking, .verifying:
            closeWhenIdle = true
            return nil
        default:
            phase = .closed
            return .close(Self.shuttingDown(policy.hostname))
        }
    }

    mutating func tlsEstablished() {
        // RFC 3207 §4.2: forget everything learnt before TLS; the client must EHLO again.
        tlsActive = true
        helo = nil
        esmtp = false
        transaction = nil
        phase = .start
    }

    /// Ends the session when the driver reports an event that the phase does not allow: the
    /// byte stream and the machine no longer agree, and nothing after this can be trusted.
    private mutating func outOfSequence() -> Action {
        phase = .closed
        return .close(.protocolError)
    }

    /// A filter refused the connection before the greeting: the refusal is the greeting.
    mutating func refusedAtConnect(_ reply: SMTPReply) -> Action {
        phase = .closed
        return .close(reply)
    }

    /// The framing delivered message bytes, or the end of a message, where no DATA or BDAT
    /// transfer is under way.
    mutating func unexpectedFrame() -> Action { outOfSequence() }

    /// The filters' answer to a `checkCommand`: nil lets the command take effect with its own
    /// reply; a reply refuses it and leaves the session as it was.
    mutating func filterChecked(refusal: SMTPReply?) -> Action {
        guard let pending else { return outOfSequence() }
        self.pending = nil
        if let refusal { return .reply(refusal) }
        return commit(pending)
    }

    private mutating func commit(_ pending: Pending) -> Action {
        switch pending {
        case .helo(let name, let esmtp, let reply):
            helo = name
            transaction = nil
            phase = .ready
            self.esmtp = esmtp
            return .reply(reply)
        case .mail(let t, let reply):
            transaction = t
            phase = .mail
            return .reply(reply)
        case .rcpt(let r, let reply):
            transaction?.recipients.append(r)
            return .reply(reply)
        }
    }

    /// Commits at once, or asks the filters first when they answer commands.
    private mutating func checkOrCommit(_ pending: Pending, _ stage: FilterStage) -> Action {
        guard policy.commandFilters else { return commit(pending) }
        self.pending = pending
        return .checkCommand(stage)
    }

    mutating func authChecked(user: String, success: Bool) -> Action {
        guard phase == .verifying else { return outOfSequence() }
        phase = .ready
        if success {
            authUser = user
            return .reply(SMTPReply(235, .authOK, "Authentication successful"))
        }
        return fail(SMTPReply(535, .authFailed, "Authentication credentials invalid"))
    }

    /// A BDAT chunk that was not the last arrived whole.
    mutating func chunkReceived(size: Int) -> Action {
        guard phase == .data else { return outOfSequence() }
        phase = .chunking
        return .reply(SMTPReply(250, .ok, "\(size) octets received"))
    }

    mutating func dataEnded(_ outcome: DataOutcome) -> Action {
        guard phase == .data else { return outOfSequence() }
        transaction = nil
        phase = .ready
        let reply = Self.reply(for: outcome)
        if closeWhenIdle {
            phase = .closed
            return .replyThenClose(reply, final: Self.shuttingDown(policy.hostname))
        }
        return .reply(reply)
    }

    /// The reply that ends a message, for each way it can end.
    static func reply(for outcome: DataOutcome) -> SMTPReply {
        switch outcome {
        case .queued(let id): return SMTPReply(250, .ok, "Ok: queued as \(id)")
        case .tooBig: return SMTPReply(552, .messageTooBig, "Error: message file too big")
        case .containsNUL: return SMTPReply(550, .badContent, "Error: message contains NUL characters")
        case .bareLineEnding: return SMTPReply(550, .badLineEnding, "Error: bare <CR> or <LF> received; lines must end with <CR><LF>")
        case .tooManyHops: return SMTPReply(554, EnhancedStatusCode(5, 4, 6), "Error: too many hops")
        case .spoolFailure: return SMTPReply(451, .transientSystem, "Error: queue file write error")
        case .outOfSpace: return .insufficientStorage
        case .filtered(let filterReply): return filterReply
        case .discarded(let id): return SMTPReply(250, .ok, "Ok: queued as \(id)")
        }
    }

    static func shuttingDown(_ hostname: String) -> SMTPReply {
        SMTPReply(421, .serviceShuttingDown, "\(hostname) Service shutting down, closing connection")
    }

    // MARK: - Commands

    private mutating func command(_ command: SMTPCommand) -> Action {
        switch command {
        case .ehlo(let name), .helo(let name):
            guard phase == .start || phase == .ready || phase == .mail || phase == .chunking else { return fail(.badSequence) }
            if case .helo = command {
                return checkOrCommit(.helo(name: name, esmtp: false, reply: SMTPReply(250, nil, policy.hostname)), .helo(name))
            }
            return checkOrCommit(.helo(name: name, esmtp: true, reply: SMTPReply(250, nil, ehloLines())), .helo(name))

        case .startTLS:
            guard policy.tlsAvailable, policy.kind != .smtps else {
                return fail(SMTPReply(502, .invalidCommand, "Error: command not implemented"))
            }
            guard !tlsActive else { return fail(SMTPReply(554, .invalidCommand, "Error: TLS already active")) }
            guard phase == .start || phase == .ready else { return fail(.badSequence) }
            return .startTLS(SMTPReply(220, .ok, "Ready to start TLS"))

        case .auth(let mechanism, let initial):
            return auth(mechanism: mechanism, initial: initial)

        case .mail(let sender, let parameters):
            return mail(sender: sender, parameters: parameters)

        case .rcpt(let path, let parameters):
            return rcpt(path: path, parameters: parameters)

        case .data:
            if phase == .chunking { return fail(SMTPReply(503, .invalidCommand, "Error: BDAT in progress")) }
            guard phase == .mail, let transaction else {
                return fail(SMTPReply(503, .invalidCommand, "Error: need RCPT command"))
            }
            guard !transaction.recipients.isEmpty else {
                return fail(SMTPReply(554, .invalidCommand, "Error: no valid recipients"))
            }
            phase = .data
            return .beginData(SMTPReply(354, nil, "End data with <CR><LF>.<CR><LF>"), normalize: normalizeBareLineEndings)

        case .bdat(let size, let last):
            // RFC 3030 §2: the chunk follows whatever the answer, so a refusal still reads it.
            guard phase == .mail || phase == .chunking, let transaction else {
                return discardChunk(SMTPReply(503, .invalidCommand, "Error: need RCPT command"), size: size)
            }
            guard !transaction.recipients.isEmpty else {
                return discardChunk(SMTPReply(554, .invalidCommand, "Error: no valid recipients"), size: size)
            }
            let first = phase == .mail
            phase = .data
            return .receiveChunk(size: size, last: last, first: first, normalize: normalizeBareLineEndings)

        case .rset:
            transaction = nil
            if phase == .mail || phase == .chunking { phase = .ready }
            return .reply(SMTPReply(250, .ok, "Ok"))

        case .noop:
            return .reply(SMTPReply(250, .ok, "Ok"))

        case .quit:
            phase = .closed
            return .close(SMTPReply(221, .ok, "Bye"))

        case .vrfy:
            return .reply(SMTPReply(252, .cannotVerify, "Cannot VRFY user; try RCPT to attempt delivery"))

        case .expn:
            return fail(SMTPReply(502, .invalidCommand, "Error: command not implemented"))

        case .help:
            return .reply(SMTPReply(214, .ok, "Tern: see RFC 5321"))
        }
    }

    private func ehloLines() -> [String] {
        var lines = [policy.hostname, "PIPELINING", "SIZE \(policy.maxMessageSize)"]
        if policy.tlsAvailable, !tlsActive, policy.kind != .smtps { lines.append("STARTTLS") }
        if policy.authAvailable, tlsActive { lines.append("AUTH PLAIN LOGIN") }
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        return lines
    }

    /// The rules that hold before MAIL on a listener that demands TLS and AUTH.
    private func submissionGate() -> SMTPReply? {
        if policy.kind == .submission, !tlsActive { return .startTLSFirst }
        if policy.kind.requiresAuth, authUser == nil { return .authRequired }
        return nil
    }

    private mutating func auth(mechanism: String, initial: String?) -> Action {
        guard phase == .ready else {
            return fail(phase == .start ? SMTPReply(503, .invalidCommand, "Error: send HELO/EHLO first") : .badSequence)
        }
        guard esmtp else { return fail(.badSequence) }
        guard policy.authAvailable else {
            return fail(SMTPReply(503, .invalidCommand, "Error: authentication not enabled"))
        }
        guard tlsActive else {
            if policy.kind == .submission { return fail(.startTLSFirst) }
            return fail(SMTPReply(538, .encryptionRequired, "Encryption required for requested authentication mechanism"))
        }
        guard authUser == nil else { return fail(SMTPReply(503, .invalidCommand, "Error: already authenticated")) }
        switch mechanism {
        case "PLAIN":
            guard let initial else {
                phase = .auth(.plain)
                return .reply(SMTPReply(334, nil, ""))
            }
            return plain(initial)
        case "LOGIN":
            guard let initial else {
                phase = .auth(.loginUser)
                return .reply(SMTPReply(334, nil, SASLBase64.encode("Username:")))
            }
            guard let user = SASLBase64.decode(initial) else { return saslSyntaxError() }
            phase = .auth(.loginPassword(user: String(decoding: user, as: UTF8.self)))
            return .reply(SMTPReply(334, nil, SASLBase64.encode("Password:")))
        default:
            return fail(SMTPReply(504, .parameterSyntax, "Error: unsupported authentication mechanism"))
        }
    }

    private mutating func saslResponse(_ line: [UInt8], step: AuthStep) -> Action {
        let text = String(decoding: line, as: UTF8.self)
        if text == "*" {
            phase = .ready
            return fail(SMTPReply(501, EnhancedStatusCode(5, 0, 0), "Authentication cancelled"))
        }
        switch step {
        case .plain:
            return plain(text)
        case .loginUser:
            guard let user = SASLBase64.decode(text) else { return saslSyntaxError() }
            phase = .auth(.loginPassword(user: String(decoding: user, as: UTF8.self)))
            return .reply(SMTPReply(334, nil, SASLBase64.encode("Password:")))
        case .loginPassword(let user):
            guard let password = SASLBase64.decode(text) else { return saslSyntaxError() }
            phase = .verifying
            return .verifyCredentials(user: user, password: String(decoding: password, as: UTF8.self))
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    private mutating func plain(_ base64: String) -> Action {
        guard let decoded = SASLBase64.decode(base64) else { return saslSyntaxError() }
        let parts = decoded.split(separator: 0, omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[1].isEmpty else { return saslSyntaxError() }
        let authzid = String(decoding: parts[0], as: UTF8.self)
        let authcid = String(decoding: parts[1], as: UTF8.self)
        guard authzid.isEmpty || authzid == authcid else {
            phase = .ready
            return fail(SMTPReply(535, .authFailed, "Authentication credentials invalid"))
        }
        phase = .verifying
        return .verifyCredentials(user: authcid, password: String(decoding: parts[2], as: UTF8.self))
    }

    private mutating func saslSyntaxError() -> Action {
        phase = .ready
        return fail(SMTPReply(501, .syntaxError, "Error: malformed authentication response"))
    }

    private mutating func mail(sender: ReversePath, parameters: MailParameters) -> Action {
        guard phase != .start else { return fail(SMTPReply(503, .invalidCommand, "Error: send HELO/EHLO first")) }
        guard phase == .ready else {
            return fail(SMTPReply(503, .invalidCommand, phase == .start ? "Bad sequence of commands" : "Error: nested MAIL command"))
        }
        if let gate = submissionGate() { return fail(gate) }
        if !esmtp, parameters != MailParameters() {
            return fail(SMTPReply(555, .parameterSyntax, "Error: ESMTP parameters need EHLO"))
        }
        if parameters.body == .binaryMIME {
            return fail(SMTPReply(555, .parameterSyntax, "Unsupported option: BODY=BINARYMIME"))
        }
        if let size = parameters.size, size > policy.maxMessageSize {
            return .reply(SMTPReply(552, .messageTooBig, "Message size exceeds fixed limit"))
        }
        // RFC 1870 §6.1 and Postfix's queue_minfree: refuse now what could not be stored.
        let free = policy.freeSpace()
        if free < policy.minFreeSpace { return .reply(.insufficientStorage) }
        if let size = parameters.size, size > free - policy.minFreeSpace { return .reply(.insufficientStorage) }
        if let mailbox = sender.mailbox, mailbox.requiresSMTPUTF8, !parameters.smtpUTF8 {
            return .reply(SMTPReply(553, .utf8NotPermitted, "Non-ASCII sender address needs SMTPUTF8"))
        }
        if let mailbox = sender.mailbox, !policy.rejectSenders.isEmpty, Self.senderAllowed(mailbox, policy.rejectSenders) {
            return .reply(SMTPReply(553, .deliveryNotAuthorized, "<\(mailbox)>: Sender address rejected: Access denied"))
        }
        if let user = authUser, let mailbox = sender.mailbox, let allowed = policy.allowedSenders[user],
            !Self.senderAllowed(mailbox, allowed)
        {
            return .reply(SMTPReply(553, .deliveryNotAuthorized, "<\(mailbox)>: Sender address rejected: not owned by user \(user)"))
        }
        return checkOrCommit(
            .mail(Transaction(sender: sender, parameters: parameters), reply: SMTPReply(250, .senderOK, "Ok")),
            .mail(sender: sender.description, parameters: parameters.filterForm))
    }

    static func senderAllowed(_ sender: Mailbox, _ allowed: [String]) -> Bool {
        let address = sender.description.lowercased()
        let domain = "@" + sender.normalizedDomain
        return allowed.contains { rule in
            let r = rule.lowercased()
            return r.hasPrefix("@") ? r == domain : r == address
        }
    }

    private mutating func rcpt(path: ForwardPath, parameters: RcptParameters) -> Action {
        guard phase == .mail, let transaction else {
            return fail(SMTPReply(503, .invalidCommand, "Error: need MAIL command"))
        }
        guard let mailbox = path.mailbox else {
            return .reply(SMTPReply(550, EnhancedStatusCode(5, 1, 1), "<Postmaster>: this relay delivers no mail locally"))
        }
        guard transaction.recipients.count < policy.maxRecipients else {
            return .reply(SMTPReply(452, .tooManyRecipients, "Error: too many recipients"))
        }
        if mailbox.requiresSMTPUTF8, !transaction.parameters.smtpUTF8 {
            return .reply(SMTPReply(553, .utf8NotPermitted, "Non-ASCII recipient address needs SMTPUTF8"))
        }
        // Every recipient is remote: only trusted networks and authenticated users may relay.
        guard trusted || authUser != nil else {
            // Counted as an error: an outsider must not probe recipients without limit.
            return fail(SMTPReply(554, .deliveryNotAuthorized, "<\(mailbox)>: Relay access denied"))
        }
        let recipient = EnvelopeRecipient(address: mailbox.description, notify: parameters.notify, orcpt: parameters.orcpt)
        var filterParameters: [String] = []
        if let notify = parameters.notify { filterParameters.append("NOTIFY=\(notify)") }
        if let orcpt = parameters.orcpt { filterParameters.append("ORCPT=\(orcpt.addressType);\(XText.encode(orcpt.address))") }
        return checkOrCommit(.rcpt(recipient, reply: SMTPReply(250, .destinationOK, "Ok")), .rcpt(recipient.address, parameters: filterParameters))
    }

    private mutating func discardChunk(_ reply: SMTPReply, size: Int) -> Action {
        switch fail(reply) {
        case .reply(let r): return .discardChunk(r, size: size)
        case let other: return other
        }
    }

    /// A client error: counted, and past the limit the session ends.
    private mutating func fail(_ reply: SMTPReply) -> Action {
        errors += 1
        if errors >= policy.maxErrors {
            phase = .closed
            return .close(.tooManyErrors)
        }
        return .reply(reply)
    }
}

extension MailParameters {
    /// The parameters as a filter sees them on MAIL (`SIZE=…`, `BODY=…`), as the client gave them.
    var filterForm: [String] {
        var out: [String] = []
        if let size { out.append("SIZE=\(size)") }
        if let body { out.append("BODY=\(body.rawValue)") }
        if smtpUTF8 { out.append("SMTPUTF8") }
        if let ret { out.append("RET=\(ret.rawValue)") }
        if let envid { out.append("ENVID=\(XText.encode(envid))") }
        return out
    }
}
