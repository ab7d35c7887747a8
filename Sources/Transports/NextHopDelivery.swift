import Delivery
import Logging
import NIOCore
import NIOPosix
import SMTPProtocol
import TernCore

/// What one attempt borrows from its lane: the rate permits, and the lane's health. The lane
/// decides when and how many; the attempt only tells it what happened.
public protocol AttemptLane: Sendable {
    /// Waits, when the lane has a connection rate, until one more connection may open.
    func permitConnection() async
    /// Waits, when the lane has a message rate, until the next message may go.
    func permit() async
    /// A connection reached the server's greeting (and TLS and AUTH when asked for).
    func connectionSucceeded() async
    /// A connection failed at `stage`.
    func connectionFailed(_ outcome: AttemptOutcome, stage: DeliveryStage) async
    /// The smarthost login of a route, as the last reload left it.
    func credentials(route: String) async -> ClientCredentials?
}

/// What the relay sets for every attempt.
public struct NextHopSettings: Sendable {
    public var resolver: MXResolver?
    public var heloName: String
    public var mxPort: Int
    public var connectTimeout: Duration
    public var commandTimeout: Duration
    public var dataTimeout: Duration
    /// This relay's own listener addresses (`ip:port`): a next hop there is a mail loop.
    public var ownAddresses: Set<String>
    public var messagesPerConnection: Int
    public var sourceAddress: String?
    public var logger: Logger
    public var now: @Sendable () -> Int64
    /// Where connections are opened (the worker's own loop); any of the group's when nil.
    public var eventLoop: (any EventLoop)?

    public init(
        resolver: MXResolver?, heloName: String, mxPort: Int, connectTimeout: Duration, commandTimeout: Duration, dataTimeout: Duration,
        ownAddresses: Set<String>, messagesPerConnection: Int, sourceAddress: String?, logger: Logger, now: @escaping @Sendable () -> Int64,
        eventLoop: (any EventLoop)? = nil
    ) {
        self.eventLoop = eventLoop
        self.resolver = resolver
        self.heloName = heloName
        self.mxPort = mxPort
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout
        self.ownAddresses = ownAddresses
        self.messagesPerConnection = messagesPerConnection
        self.sourceAddress = sourceAddress
        self.logger = logger
        self.now = now
    }
}

/// An open connection kept between attempts, and what it was set up with.
public final class HeldConnection: @unchecked Sendable {
    public let connection: SMTPClientConnection
    let address: String
    /// Route, TLS policy and CA: a job from another route that shares the lane never rides a
    /// connection set up with a weaker policy or another login.
    let setup: String
    var messages = 0

    init(_ connection: SMTPClientConnection, address: String, setup: String) {
        self.connection = connection
        self.address = address
        self.setup = setup
    }
}

/// The tokens a lane took for a worker when it started: the connection rate's for its first
/// connection, the message rate's for its first message.
public final class AttemptPermits: @unchecked Sendable {
    var firstTaken = true
    var messageTaken: Bool

    public init(messageTaken: Bool) { self.messageTaken = messageTaken }
}

/// Some recipients of one message for one next hop.
public struct NextHopAttempt: Sendable {
    /// The queue id, for the log.
    public var id: String
    public var route: Route
    public var envelope: Envelope
    /// Indexes into `envelope.recipients`.
    public var recipients: [Int]
    public var contentSize: Int

    public init(id: String, route: Route, envelope: Envelope, recipients: [Int], contentSize: Int) {
        self.id = id
        self.route = route
        self.envelope = envelope
        self.recipients = recipients
        self.contentSize = contentSize
    }
}

/// How an attempt went: one result per recipient, and the time spent setting up and sending.
public struct AttemptReport: Sendable {
    public var results: [RecipientResult] = []
    public var setupMillis: Int64 = 0
    public var transmissionMillis: Int64 = 0
}

/// Getting a message to its next hop: the smarthost, or the recipient domain's MX hosts in
/// order with each address in turn; the TLS policy; loop detection; connection reuse. A
/// recipient that gets a soft failure at one host goes on to the next, and is deferred only
/// when no host is left. Returns one typed result per recipient.
/// - SeeAlso: RFC 5321 §5.1 (MX order, trying each address), Postfix `smtp_connect.c`
public enum NextHopDelivery {
    public static func deliver(
        _ attempt: NextHopAttempt, content: some MessageContent, held: HeldConnection?, permits: AttemptPermits, lane: some AttemptLane,
        settings: NextHopSettings
    ) async -> (AttemptReport, HeldConnection?) {
        var report = AttemptReport()
        var held = held
        func finish(_ remaining: [Int], _ verdict: RecipientVerdict, relay: String = "none", reply: SMTPReply? = nil) {
            report.results += remaining.map { RecipientResult(index: $0, verdict: verdict, reply: reply, relay: relay) }
        }

        let hosts: [MXHost]
        let serverPort: Int
        let tls = attempt.route.tls
        switch attempt.route.nextHop {
        case .smarthost(let host, let port):
            serverPort = port
            // A smarthost's name goes through the same DNS server as MX lookups (the
            // configured one), and the log shows the address used: relay=host[IP]:port.
            guard let resolver = settings.resolver, !host.isIPAddress else {
                hosts = [MXHost(name: host, preference: 0, addresses: [host])]
                break
            }
            switch await resolver.addresses(of: host) {
            case .success(let addresses):
                hosts = [MXHost(name: host, preference: 0, addresses: addresses)]
            case .failure(.notFound(let why)), .failure(.temporary(let why)):
                // A smarthost that does not resolve is our configuration's trouble, never
                // the recipient's: defer, do not bounce.
                finish(attempt.recipients, .deferred(status: EnhancedStatusCode(4, 4, 3), diagnostic: "X-Tern; smarthost \(host): DNS lookup failed: \(why)"))
                return (report, held)
            }
        case .mx(let domain):
            serverPort = settings.mxPort
            guard let resolver = settings.resolver else {
                finish(attempt.recipients, .deferred(status: EnhancedStatusCode(4, 3, 5), diagnostic: "X-Tern; no DNS resolver for MX delivery"))
                return (report, held)
            }
            switch await resolver.lookup(domain: domain) {
            case .hosts(let found): hosts = found
            case .nullMX:
                finish(attempt.recipients, .bounced(status: EnhancedStatusCode(5, 1, 10), diagnostic: "X-Tern; \(domain) accepts no mail (null MX)"))
                return (report, held)
            case .notFound(let why):
                finish(attempt.recipients, .bounced(status: EnhancedStatusCode(5, 1, 2), diagnostic: "X-Tern; Host or domain name not found: \(why)"))
                return (report, held)
            case .temporaryFailure(let why):
                finish(attempt.recipients, .deferred(status: EnhancedStatusCode(4, 4, 3), diagnostic: "X-Tern; DNS lookup failed: \(why)"))
                return (report, held)
            }
        }

        let envelope = attempt.envelope
        var remaining = attempt.recipients
        var lastOutcome = AttemptOutcome.connection("no host tried")
        hostLoop: for host in hosts {
            for address in host.addresses where !remaining.isEmpty {
                let target = "\(address):\(serverPort)"
                if settings.ownAddresses.contains(target) {
                    // Delivering to our own listener would only accept the mail again.
                    let domain = envelope.recipients[remaining[0]].address.split(separator: "@").last.map(String.init) ?? ""
                    let loop = AttemptOutcome.loop("mail for \(domain) loops back to myself (\(host.name)[\(address)]:\(serverPort) is this relay)")
                    finish(remaining, DeliveryPolicy.verdict(stage: .connect, outcome: loop))
                    remaining = []
                    break hostLoop
                }
                let setup = "\(attempt.route.name) \(tls) \(attempt.route.caFile ?? "")"
                if let h = held, h.address != target || h.setup != setup || !h.connection.isReady || h.messages >= settings.messagesPerConnection {
                    await h.connection.quit()
                    held = nil
                }
                if held == nil {
                    // Every connection after the worker's first waits for the lane's connection rate.
                    if permits.firstTaken { permits.firstTaken = false } else { await lane.permitConnection() }
                    let setupStart = settings.now()
                    // Read now, not when the worker started: a reload may have brought a new password.
                    let credentials = await lane.credentials(route: attempt.route.name)
                    let configuration = SMTPClientConfiguration(
                        heloName: settings.heloName, tlsPolicy: tls, credentials: credentials,
                        serverName: host.name, caFile: attempt.route.caFile, connectTimeout: settings.connectTimeout,
                        commandTimeout: settings.commandTimeout, dataTimeout: settings.dataTimeout,
                        sourceAddress: settings.sourceAddress, ownHostname: settings.heloName)
                    do {
                        let connection = try await SMTPClientConnection.connect(
                            host: address, port: serverPort, configuration: configuration,
                            group: settings.eventLoop ?? MultiThreadedEventLoopGroup.singleton)
                        held = HeldConnection(connection, address: target, setup: setup)
                        await lane.connectionSucceeded()
                    } catch {
                        if case .loop = error.outcome {
                            settings.logger.info("\(attempt.id): \(host.name)[\(address)]:\(serverPort): \(error.outcome)")
                            finish(remaining, DeliveryPolicy.verdict(stage: error.stage, outcome: error.outcome),
                                   relay: "\(host.name)[\(address)]:\(serverPort)")
                            remaining = []
                            break hostLoop
                        }
                        // A server's own answer (a reply, a TLS failure) says more than a later
                        // address that refused the connection: keep it as the reason.
                        if case .connection = error.outcome, informative(lastOutcome) {} else { lastOutcome = error.outcome }
                        await lane.connectionFailed(error.outcome, stage: error.stage)
                        settings.logger.info(
                            "\(attempt.id): connect to \(host.name)[\(address)]:\(serverPort) failed at \(error.stage.rawValue): \(error.outcome)",
                            metadata: [LogSink.serviceKey: "smtp"])
                        report.setupMillis += settings.now() - setupStart
                        continue
                    }
                    report.setupMillis += settings.now() - setupStart
                }
                guard let h = held else { continue }
                let sendStart = settings.now()
                let message = OutboundMessage(
                    sender: envelope.sender, recipients: remaining.map { envelope.recipients[$0] }, size: attempt.contentSize,
                    eightBit: envelope.body?.uppercased() == "8BITMIME", needsSMTPUTF8: envelope.smtpUTF8,
                    ret: envelope.ret, envid: envelope.envid)
                if permits.messageTaken { permits.messageTaken = false } else { await lane.permit() }
                let verdicts = await h.connection.send(message, content: content)
                let replies = h.connection.lastReplies
                h.messages += 1
                report.transmissionMillis += settings.now() - sendStart
                var next: [Int] = []
                for (n, (index, verdict)) in zip(remaining, verdicts).enumerated() {
                    if case .tryNextHost(let outcome) = verdict {
                        next.append(index)
                        lastOutcome = outcome
                    } else {
                        report.results.append(
                            RecipientResult(
                                index: index, verdict: verdict, reply: n < replies.count ? replies[n] : nil, relay: h.connection.peer,
                                remoteMTA: "dns; \(host.name)", relayedWithoutDSN: !h.connection.extensions.dsn))
                    }
                }
                remaining = next
                if remaining.isEmpty { break hostLoop }
                if !h.connection.isReady {
                    held = nil
                }
            }
        }
        if !remaining.isEmpty {
            finish(
                remaining, DeliveryPolicy.exhausted(lastOutcome, note: nil), relay: held?.connection.peer ?? "none",
                reply: RecipientResult.reply(of: lastOutcome))
        }
        return (report, held)
    }

    /// An outcome that came from a server that answered, not from one that could not be reached.
    static func informative(_ outcome: AttemptOutcome) -> Bool {
        switch outcome {
        case .reply, .tls, .protocolError, .loop: return true
        case .connection, .timeout: return false
        }
    }
}
