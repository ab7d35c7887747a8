import SMTPProtocol

/// Where in a delivery attempt something went wrong.
public enum DeliveryStage: String, Sendable, Equatable {
    case connect, greeting, hello, startTLS, auth, mail, rcpt, data, endOfData
}

/// How one step of an attempt ended: a reply from the server (good or bad), or no usable
/// reply at all.
public enum AttemptOutcome: Sendable, Equatable {
    case reply(SMTPReply)
    /// Refused, unreachable, reset.
    case connection(String)
    case timeout(String)
    /// The handshake failed or the certificate did not verify.
    case tls(String)
    /// The server broke the protocol (an unparseable reply, a wrong code).
    case protocolError(String)
    /// The next hop is this relay itself (its address is one of ours, or it greets with our
    /// own hostname): delivering would only send the mail round again.
    case loop(String)
}

/// The fate of one recipient after one attempt at one host.
public enum RecipientVerdict: Sendable, Equatable {
    case delivered(SMTPReply)
    /// Try the next MX host in this same attempt; only if there is none, defer.
    case tryNextHost(AttemptOutcome)
    /// Keep it queued and try again later.
    case deferred(status: EnhancedStatusCode, diagnostic: String)
    /// Give up and tell the sender.
    case bounced(status: EnhancedStatusCode, diagnostic: String)
}

/// The one place that decides what a delivery failure means, after Postfix's
/// `smtp_trouble.c`:
///
/// | what | verdict |
/// |---|---|
/// | 2xx | delivered |
/// | 4xx, connection, timeout, TLS or protocol failure | the next MX host if there is one, else deferred |
/// | 5xx to MAIL, RCPT, DATA or the end of data | bounced (RCPT: that recipient only) |
/// | 5xx in the greeting, HELO/EHLO, STARTTLS or AUTH | as 4xx: a host that will not talk to us, or our own TLS/AUTH setup, says nothing final about the recipient |
/// | deferred past the queue lifetime | bounced, with the last reason |
///
/// Only connection and greeting failures say the destination itself is in trouble, so
/// only they close a lane's concurrency window (`throttlesLane`).
public enum DeliveryPolicy {
    /// One host's answer. A soft failure is `.tryNextHost`: whoever walks the hosts
    /// (`Transports/NextHopDelivery`) tries the next, and defers (`exhausted`) when none is left.
    public static func verdict(stage: DeliveryStage, outcome failure: AttemptOutcome) -> RecipientVerdict {
        if case .reply(let reply) = failure, reply.isPositive {
            return .delivered(reply)
        }
        if case .loop = failure {
            // As Postfix: final, whatever the stage; no other host of the lane is better.
            return .bounced(status: status(of: failure, stage: stage), diagnostic: diagnostic(failure))
        }
        if case .reply(let reply) = failure, reply.isPermanentFailure, permanentAt(stage) {
            return .bounced(status: status(of: failure, stage: stage), diagnostic: diagnostic(failure))
        }
        return .tryNextHost(failure)
    }

    /// A recipient deferred past the queue lifetime is bounced with the last reason.
    public static func expire(_ verdict: RecipientVerdict) -> RecipientVerdict {
        guard case .deferred(let status, let diagnostic) = verdict else { return verdict }
        let expired = EnhancedStatusCode(5, status.subject, status.detail)
        return .bounced(status: expired, diagnostic: diagnostic + " (gave up: queue lifetime exceeded)")
    }

    /// A soft failure with no host left to try: deferred, with the failure's status. The
    /// note says why no host was left when that is not the failure itself.
    public static func exhausted(_ failure: AttemptOutcome, note: String?) -> RecipientVerdict {
        let stage: DeliveryStage
        if case .reply = failure { stage = .rcpt } else { stage = .connect }
        let text = diagnostic(failure)
        let esc = status(of: failure, stage: stage)
        // A deferral is temporary whatever the server's own class said.
        return .deferred(status: EnhancedStatusCode(4, esc.subject, esc.detail), diagnostic: note.map { "\(text) (\($0))" } ?? text)
    }

    public static func throttlesLane(stage: DeliveryStage, outcome: AttemptOutcome) -> Bool {
        if case .reply(let reply) = outcome, reply.isPositive { return false }
        return stage == .connect || stage == .greeting
    }

    private static func permanentAt(_ stage: DeliveryStage) -> Bool {
        switch stage {
        case .mail, .rcpt, .data, .endOfData: return true
        case .connect, .greeting, .hello, .startTLS, .auth: return false
        }
    }

    /// The enhanced status for the DSN: the server's own when it gave one.
    static func status(of failure: AttemptOutcome, stage: DeliveryStage) -> EnhancedStatusCode {
        switch failure {
        case .reply(let reply):
            if let esc = reply.enhanced { return esc }
            return EnhancedStatusCode(reply.isPermanentFailure && permanentAt(stage) ? 5 : 4, 0, 0)
        case .connection: return EnhancedStatusCode(4, 4, 1)  // no answer from host
        case .timeout: return EnhancedStatusCode(4, 4, 2)  // bad connection
        case .tls: return EnhancedStatusCode(4, 7, 5)  // cryptographic failure
        case .protocolError: return EnhancedStatusCode(4, 5, 0)  // other protocol status
        case .loop: return EnhancedStatusCode(5, 4, 6)  // routing loop detected
        }
    }

    /// The Diagnostic-Code text: `smtp; 550 5.1.1 …` for replies (RFC 3464 §2.3.6).
    static func diagnostic(_ failure: AttemptOutcome) -> String {
        switch failure {
        case .reply(let reply): return "smtp; \(reply)"
        case .connection(let text): return "X-Tern; connection failed: \(text)"
        case .timeout(let text): return "X-Tern; timed out: \(text)"
        case .tls(let text): return "X-Tern; TLS failed: \(text)"
        case .protocolError(let text): return "X-Tern; protocol error: \(text)"
        case .loop(let text): return "X-Tern; \(text)"
        }
    }
}

extension AttemptOutcome: CustomStringConvertible {
    /// For log lines: the reply, or what went wrong instead.
    public var description: String {
        switch self {
        case .reply(let reply): return reply.description
        case .connection(let text): return text
        case .timeout(let text): return "timed out: \(text)"
        case .tls(let text): return "TLS failed: \(text)"
        case .protocolError(let text): return "protocol error: \(text)"
        case .loop(let text): return text
        }
    }
}
