import Delivery
import SMTPProtocol
import TernCore

/// One message as the client sends it: the envelope and what the content needs.
public struct OutboundMessage: Sendable, Equatable {
    /// A recipient with its DSN parameters, as the spool keeps it.
    public typealias Recipient = EnvelopeRecipient

    public var sender: String
    public var recipients: [Recipient]
    public var size: Int
    /// The content has 8-bit bytes (BODY=8BITMIME is sent when the server offers it).
    public var eightBit: Bool
    /// An address or the content needs SMTPUTF8.
    public var needsSMTPUTF8: Bool
    public var ret: DSNReturn?
    public var envid: String?

    public init(
        sender: String, recipients: [Recipient], size: Int, eightBit: Bool = false, needsSMTPUTF8: Bool = false,
        ret: DSNReturn? = nil, envid: String? = nil
    ) {
        self.sender = sender
        self.recipients = recipients
        self.size = size
        self.eightBit = eightBit
        self.needsSMTPUTF8 = needsSMTPUTF8
        self.ret = ret
        self.envid = envid
    }
}

/// What the server offered in its EHLO reply.
public struct ServerExtensions: Sendable, Equatable {
    public var pipelining = false
    public var startTLS = false
    public var eightBitMIME = false
    public var smtpUTF8 = false
    public var dsn = false
    public var size: Int?
    public var authMechanisms: Set<String> = []

    public init() {}

    /// RFC 5321 §4.1.1.1: the first line is the greeting, each further one a keyword with
    /// optional parameters.
    public init(ehlo reply: SMTPReply) {
        for line in reply.lines.dropFirst() {
            let words = line.split(separator: " ").map { $0.uppercased() }
            guard let keyword = words.first else { continue }
            switch keyword {
            case "PIPELINING": pipelining = true
            case "STARTTLS": startTLS = true
            case "8BITMIME": eightBitMIME = true
            case "SMTPUTF8": smtpUTF8 = true
            case "DSN": dsn = true
            case "SIZE": size = words.count > 1 ? Int(words[1]).flatMap { $0 > 0 ? $0 : nil } : nil
            case "AUTH": authMechanisms.formUnion(words.dropFirst())
            default: continue
            }
        }
    }
}

/// Credentials for a smarthost.
public struct ClientCredentials: Sendable, Equatable {
    public var user: String
    public var password: String
    /// AUTH without TLS, only when a route says so explicitly.
    public var allowPlaintext: Bool

    public init(user: String, password: String, allowPlaintext: Bool = false) {
        self.user = user
        self.password = password
        self.allowPlaintext = allowPlaintext
    }
}

/// The SMTP client as a pure state machine: events in (replies, TLS up), actions out.
/// The driver owns the socket, the TLS handler and the message content; this type decides
/// what to send next and what each recipient's fate is.
/// - SeeAlso: RFC 5321 §3.3, RFC 2920 (pipelining), RFC 3207, RFC 4954, RFC 1870, RFC 3461
public struct SMTPClientStateMachine: Sendable {
    public enum Action: Sendable, Equatable {
        /// Send these commands at once (several only with PIPELINING), then feed each reply.
        case send([SMTPCommand])
        /// Start the TLS handshake now; report with `tlsEstablished` (or fail the connection).
        case startTLS
        /// Send the message content, dot-stuffed, and `.`; then feed the reply.
        case sendContent
        /// Send `.` alone and feed its reply: the server took a pipelined DATA although it
        /// accepted no recipient, and must not get the content (RFC 2920 §3.1).
        case sendEmptyContent
        /// The message is done: each recipient's verdict, in the message's order. With
        /// `reset`, send RSET first and feed its reply: the transaction ended without content.
        case messageDone([RecipientVerdict], reset: Bool)
        /// Send this SASL response line (not a command).
        case sendSASL(String)
        /// Nothing more on this connection: send QUIT (if `quit`) and close. Recipients of the
        /// message under way, if any, get `verdicts`.
        case close(quit: Bool, verdicts: [RecipientVerdict])
        /// Waiting for more replies.
        case wait
    }

    private enum State: Equatable {
        case greeting
        case ehlo
        case helo
        case startTLS
        case ehloAfterTLS
        case auth(step: Int)
        case ready
        /// MAIL and RCPTs sent; `pending` replies still to come.
        case envelope(pending: Int)
        case data
        case content
        /// `.` sent after a DATA that was taken with no recipient accepted.
        case emptyContent
        /// RSET sent after a transaction without content.
        case resetting
        case closed
    }

    public let heloName: String
    public let tlsPolicy: TLSPolicy
    public let credentials: ClientCredentials?

    private var state = State.greeting
    public private(set) var extensions = ServerExtensions()
    public private(set) var tlsActive = false
    private var message: OutboundMessage?
    private var verdicts: [RecipientVerdict?] = []
    /// The server's reply behind each recipient's verdict, when one was.
    private var replies: [SMTPReply?] = []
    /// The replies behind the verdicts of the last message reported: what reply rules
    /// match on, typed, rather than the verdict's diagnostic text.
    public private(set) var lastReplies: [SMTPReply?] = []
    private var acceptedRecipients = 0
    private var sentRecipients: [Int] = []
    /// DATA went out with MAIL and the RCPTs, so its reply follows theirs.
    private var dataPipelined = false

    /// This relay's own hostname, when the greeting and EHLO reply must be checked against it.
    public let ownHostname: String?

    public init(
        heloName: String, tlsPolicy: TLSPolicy, credentials: ClientCredentials? = nil,
        ownHostname: String? = nil
    ) {
        self.ownHostname = ownHostname
        self.heloName = heloName
        self.tlsPolicy = tlsPolicy
        self.credentials = credentials
    }

    /// True between sessions' transactions: a message can be offered.
    public var isReady: Bool { state == .ready }

    // MARK: - Events

    /// Why the connection is closing, when a reply or a violation closed it.
    public private(set) var closingOutcome: AttemptOutcome?
    /// The stage that reason belongs to, when it is not the last command's.
    public private(set) var closingStage: DeliveryStage?

    /// A reply from the server.
    public mutating func reply(_ reply: SMTPReply) -> Action {
        if reply.isPositive, let expected = expectedPositiveCodes(), !expected.contains(reply.code) {
            return protocolViolation(reply)
        }
        switch state {
        case .greeting:
            guard reply.code == 220 else { return failConnection(.greeting, reply) }
            if let loop = loopsBack(reply, stage: .greeting) { return loop }
            state = .ehlo
            return .send([.ehlo(heloName)])
        case .ehlo, .ehloAfterTLS:
            let afterTLS = state == .ehloAfterTLS
            guard reply.code == 250 else {
                // RFC 5321 §3.2: a server that does not know EHLO gets HELO, but not after
                // TLS, where EHLO is required to learn the extensions again.
                if !afterTLS, reply.isPermanentFailure, !tlsPolicy.requiresTLS, credentials == nil {
                    state = .helo
                    return .send([.helo(heloName)])
                }
                return failConnection(.hello, reply)
            }
            if let loop = loopsBack(reply, stage: .hello) { return loop }
            extensions = ServerExtensions(ehlo: reply)
            return afterHello()
        case .helo:
            guard reply.code == 250 else { return failConnection(.hello, reply) }
            extensions = ServerExtensions()
            state = .ready
            return .wait
        case .startTLS:
            guard reply.code == 220 else {
                if tlsPolicy.requiresTLS { return failConnection(.startTLS, reply) }
                // `may`: the server offered and then refused; go on in plaintext.
                return afterTLSDecision(skipTLS: true)
            }
            return .startTLS
        case .auth(let step):
            return authReply(reply, step: step)
        case .envelope(let pending):
            return envelopeReply(reply, pending: pending)
        case .data:
            guard reply.code == 354 else { return finishMessage(stage: .data, outcome: .reply(reply)) }
            guard acceptedRecipients > 0 else {
                // Every recipient was refused, yet the pipelined DATA was taken.
                state = .emptyContent
                return .sendEmptyContent
            }
            state = .content
            return .sendContent
        case .content:
            return finishMessage(stage: .endOfData, outcome: .reply(reply))
        case .emptyContent:
            // Whatever the server says to an empty message for nobody, the transaction is
            // over, and every recipient already has its verdict.
            return report()
        case .resetting:
            guard reply.isPositive else { return failConnection(.mail, reply) }
            state = .ready
            return .wait
        case .ready, .closed:
            // An unsolicited reply (typically 421 before closing).
            return failConnection(.greeting, reply)
        }
    }

    public mutating func tlsEstablished() -> Action {
        guard state == .startTLS else { preconditionFailure("TLS outside STARTTLS") }
        tlsActive = true
        state = .ehloAfterTLS
        extensions = ServerExtensions()
        return .send([.ehlo(heloName)])
    }

    /// The connection failed or timed out: the message under way, if any, gets the verdicts.
    public mutating func connectionFailed(stage: DeliveryStage, _ outcome: AttemptOutcome) -> Action {
        state = .closed
        return .close(quit: false, verdicts: remainingVerdicts(stage: stage, outcome: outcome))
    }

    /// Offers a message on a ready connection.
    public mutating func send(_ message: OutboundMessage) -> Action {
        guard state == .ready else { preconditionFailure("a message offered on a busy connection") }
        self.message = message
        verdicts = Array(repeating: nil, count: message.recipients.count)
        replies = Array(repeating: nil, count: message.recipients.count)
        acceptedRecipients = 0
        sentRecipients = []
        // Refuse here what the server has said it cannot take (RFC 1870 §6, RFC 6531 §3.4).
        if let limit = extensions.size, message.size > limit {
            return finishAll(.bounced(status: .messageTooBig, diagnostic: "X-Tern; message size \(message.size) exceeds the server's limit of \(limit)"))
        }
        if message.needsSMTPUTF8, !extensions.smtpUTF8 {
            return finishAll(.bounced(status: .utf8NotPermitted, diagnostic: "X-Tern; the message needs SMTPUTF8, which the server does not offer"))
        }
        var params = MailParameters()
        if extensions.size != nil { params.size = message.size }
        if message.eightBit, extensions.eightBitMIME { params.body = .eightBitMIME }
        if message.needsSMTPUTF8 { params.smtpUTF8 = true }
        if extensions.dsn {
            params.ret = message.ret
            params.envid = message.envid
        }
        var commands: [SMTPCommand] = [.mail(Self.reversePath(message.sender), params)]
        for (index, r) in message.recipients.enumerated() {
            var rp = RcptParameters()
            if extensions.dsn {
                rp.notify = r.notify
                rp.orcpt = r.orcpt
            }
            commands.append(.rcpt(.mailbox(Self.mailbox(r.address)), rp))
            sentRecipients.append(index)
        }
        state = .envelope(pending: commands.count)
        dataPipelined = extensions.pipelining
        if extensions.pipelining {
            // DATA ends the group (RFC 2920 §3.1): one write and one round trip for the
            // whole envelope. Its reply is read even when every recipient is refused.
            return .send(commands + [.data])
        }
        // Without PIPELINING, one command at a time: keep the rest for later replies.
        queued = Array(commands.dropFirst())
        return .send([commands[0]])
    }

    /// Ends the connection politely.
    public mutating func quit() -> Action {
        state = .closed
        return .close(quit: true, verdicts: [])
    }

    // MARK: - Mail loops

    /// A server whose greeting or EHLO reply names this relay's own hostname is this relay:
    /// Postfix's "host greeted me with my own hostname". The connection ends; the lane
    /// bounces its mail (5.4.6) instead of sending it round again.
    private mutating func loopsBack(_ reply: SMTPReply, stage: DeliveryStage) -> Action? {
        guard let own = ownHostname?.lowercased(), !own.isEmpty,
            let first = reply.lines.first?.split(separator: " ", maxSplits: 1).first,
            first.lowercased() == own
        else { return nil }
        let outcome = AttemptOutcome.loop("mail loops back to myself: \(stage == .greeting ? "the greeting" : "the EHLO reply") names \(own)")
        let verdicts = remainingVerdicts(stage: stage, outcome: outcome)
        state = .closed
        closingOutcome = outcome
        return .close(quit: true, verdicts: verdicts)
    }

    // MARK: - What each command may get

    /// RFC 5321 §4.3.2: the success and intermediate codes that the command in flight may
    /// get. A 4xx or 5xx is a refusal, handled where the state is; a positive code outside
    /// this set is a protocol error. Nil where any reply is unsolicited.
    private func expectedPositiveCodes() -> Set<Int>? {
        switch state {
        case .greeting, .startTLS: return [220]
        case .ehlo, .ehloAfterTLS, .helo, .resetting, .content, .emptyContent: return [250]
        case .auth(let step): return step == 1 || step == 2 ? [334] : [235]
        case .envelope(let pending):
            let total = (message?.recipients.count ?? 0) + 1
            return total - pending == 0 ? [250] : [250, 251]
        case .data: return [354]
        case .ready, .closed: return nil
        }
    }

    /// The stage the next reply answers.
    public var currentStage: DeliveryStage {
        switch state {
        case .greeting: return .greeting
        case .ehlo, .ehloAfterTLS, .helo: return .hello
        case .startTLS: return .startTLS
        case .auth: return .auth
        case .envelope(let pending): return (message?.recipients.count ?? 0) + 1 - pending == 0 ? .mail : .rcpt
        case .data: return .data
        case .content, .emptyContent: return .endOfData
        case .resetting, .ready, .closed: return .mail
        }
    }

    /// A positive reply the command cannot get (250 to DATA, 354 after the dot, 220 to MAIL):
    /// the server and Tern no longer agree on which reply answers which command, so nothing
    /// more it says can be trusted. Whatever has no verdict yet is not final (the next host, else deferred 4.5.0), never
    /// delivered; the connection is dropped without QUIT.
    private mutating func protocolViolation(_ reply: SMTPReply) -> Action {
        let outcome = AttemptOutcome.protocolError(
            "unexpected reply \(reply.code) to \(currentStage.rawValue): \(reply.lines.joined(separator: " ").prefix(200))")
        let verdicts = remainingVerdicts(stage: currentStage, outcome: outcome)
        state = .closed
        closingOutcome = outcome
        message = nil
        return .close(quit: false, verdicts: verdicts)
    }

    // MARK: - Steps

    private var queued: [SMTPCommand] = []

    private mutating func afterHello() -> Action {
        if tlsActive { return afterTLSDecision(skipTLS: true) }
        switch tlsPolicy {
        case .none:
            return afterTLSDecision(skipTLS: true)
        case .may:
            return extensions.startTLS ? beginTLS() : afterTLSDecision(skipTLS: true)
        case .encrypt, .verify:
            guard extensions.startTLS else {
                return closeSetup(.startTLS, .tls("TLS is required (\(tlsPolicy)), but the server does not offer STARTTLS"))
            }
            return beginTLS()
        }
    }

    private mutating func beginTLS() -> Action {
        state = .startTLS
        return .send([.startTLS])
    }

    private mutating func afterTLSDecision(skipTLS: Bool) -> Action {
        guard let credentials else {
            state = .ready
            return .wait
        }
        guard tlsActive || credentials.allowPlaintext else {
            return closeSetup(.auth, .tls("AUTH needs TLS, which this connection does not have"))
        }
        if extensions.authMechanisms.contains("PLAIN") {
            state = .auth(step: 0)
            let blob = SASLBase64.encode(Array("\0\(credentials.user)\0\(credentials.password)".utf8))
            return .send([.auth(mechanism: "PLAIN", initialResponse: blob)])
        }
        if extensions.authMechanisms.contains("LOGIN") {
            state = .auth(step: 1)
            return .send([.auth(mechanism: "LOGIN", initialResponse: nil)])
        }
        return closeSetup(.auth, .protocolError("the server offers no AUTH mechanism Tern can use (PLAIN, LOGIN)"))
    }

    /// Ends the connection during its setup for a reason of Tern's own (not a reply), and
    /// keeps the reason and the stage for the log: "TLS is required, but …", not "closed".
    private mutating func closeSetup(_ stage: DeliveryStage, _ outcome: AttemptOutcome) -> Action {
        let verdicts = remainingVerdicts(stage: stage, outcome: outcome)
        state = .closed
        closingOutcome = outcome
        closingStage = stage
        return .close(quit: true, verdicts: verdicts)
    }

    /// step 0: PLAIN sent; 1: LOGIN sent, expecting the user prompt; 2: user sent.
    private mutating func authReply(_ reply: SMTPReply, step: Int) -> Action {
        guard let credentials else { preconditionFailure("AUTH without credentials") }
        if reply.code == 235 {
            state = .ready
            return .wait
        }
        if reply.code == 334, step == 1 {
            state = .auth(step: 2)
            return .sendSASL(SASLBase64.encode(Array(credentials.user.utf8)))
        }
        if reply.code == 334, step == 2 {
            state = .auth(step: 3)
            return .sendSASL(SASLBase64.encode(Array(credentials.password.utf8)))
        }
        return failConnection(.auth, reply)
    }

    private mutating func envelopeReply(_ reply: SMTPReply, pending: Int) -> Action {
        guard let message else { preconditionFailure("envelope replies without a message") }
        let total = message.recipients.count + 1
        let index = total - pending  // 0 is MAIL, then each RCPT in order
        if index == 0 {
            if !reply.isPositive {
                // The sender refused: every recipient shares the verdict. With PIPELINING the
                // RCPT replies still come and are read, then ignored; without, none are sent.
                let verdict = DeliveryPolicy.verdict(stage: .mail, outcome: .reply(reply))
                for i in verdicts.indices { verdicts[i] = verdict }
                for i in replies.indices { replies[i] = reply }
                if !queued.isEmpty {
                    queued = []
                    return resetAndReport()
                }
            }
        } else {
            let r = index - 1
            if verdicts[r] == nil {
                if reply.isPositive {
                    acceptedRecipients += 1
                } else {
                    verdicts[r] = DeliveryPolicy.verdict(stage: .rcpt, outcome: .reply(reply))
                    replies[r] = reply
                }
            }
        }
        let remaining = pending - 1
        if remaining > 0 {
            state = .envelope(pending: remaining)
            if !queued.isEmpty {
                let next = queued.removeFirst()
                return .send([next])
            }
            return .wait
        }
        if dataPipelined {
            state = .data
            return .wait
        }
        guard acceptedRecipients > 0 else {
            // Nothing to send: end the transaction and report.
            return resetAndReport()
        }
        state = .data
        return .send([.data])
    }

    private mutating func finishMessage(stage: DeliveryStage, outcome: AttemptOutcome) -> Action {
        let verdict = DeliveryPolicy.verdict(stage: stage, outcome: outcome)
        for i in verdicts.indices where verdicts[i] == nil {
            verdicts[i] = verdict
            replies[i] = RecipientResult.reply(of: outcome)
        }
        if stage == .data, !verdictIsDelivered(verdict) {
            return resetAndReport()
        }
        return report()
    }

    private func verdictIsDelivered(_ v: RecipientVerdict) -> Bool {
        if case .delivered = v { return true }
        return false
    }

    /// After a transaction that ended without content: RSET, so the connection can be reused.
    private mutating func resetAndReport() -> Action {
        for i in verdicts.indices where verdicts[i] == nil {
            verdicts[i] = .deferred(status: EnhancedStatusCode(4, 0, 0), diagnostic: "X-Tern; transaction reset")
        }
        state = .resetting
        lastReplies = replies
        let done = verdicts.map { $0 ?? Self.unanswered }
        message = nil
        return .messageDone(done, reset: true)
    }

    private mutating func report() -> Action {
        state = .ready
        lastReplies = replies
        let done = verdicts.map { $0 ?? Self.unanswered }
        message = nil
        return .messageDone(done, reset: false)
    }

    /// A recipient that no reply decided by the end of its transaction (none should be).
    private static let unanswered = RecipientVerdict.deferred(
        status: EnhancedStatusCode(4, 0, 0), diagnostic: "X-Tern; no verdict for this recipient")

    private mutating func finishAll(_ verdict: RecipientVerdict) -> Action {
        for i in verdicts.indices { verdicts[i] = verdict }
        return report()
    }

    private mutating func failConnection(_ stage: DeliveryStage, _ reply: SMTPReply) -> Action {
        for i in replies.indices where i < verdicts.count && verdicts[i] == nil { replies[i] = reply }
        lastReplies = message == nil ? [] : replies
        state = .closed
        closingOutcome = .reply(reply)
        return .close(quit: reply.code != 421, verdicts: remainingVerdicts(stage: stage, outcome: .reply(reply)))
    }

    private func remainingVerdicts(stage: DeliveryStage, outcome: AttemptOutcome) -> [RecipientVerdict] {
        guard message != nil else { return [] }
        let verdict = DeliveryPolicy.verdict(stage: stage, outcome: outcome)
        return verdicts.map { $0 ?? verdict }
    }

    static func reversePath(_ sender: String) -> ReversePath {
        sender.isEmpty ? .null : .mailbox(mailbox(sender))
    }

    static func mailbox(_ address: String) -> Mailbox {
        guard let at = address.lastIndex(of: "@") else { return Mailbox(localPart: address, domain: "") }
        return Mailbox(localPart: String(address[..<at]), domain: String(address[address.index(after: at)...]))
    }
}

