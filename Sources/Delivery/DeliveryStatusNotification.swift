import SMTPProtocol

/// A delivery status notification: the bounce (or delay warning) sent from `<>` to the
/// envelope sender.
/// - SeeAlso: RFC 3464 (message/delivery-status), RFC 6522 (multipart/report),
///   RFC 3461 §6 (RET, ENVID, ORCPT), RFC 3834 (Auto-Submitted)
public struct DeliveryStatusNotification: Sendable {
    public enum Action: String, Sendable {
        case failed, delayed, delivered, relayed, expanded
    }

    public struct Recipient: Sendable {
        public var finalRecipient: String
        public var originalRecipient: OriginalRecipient?
        public var action: Action
        public var status: EnhancedStatusCode
        /// `dns; host` of the server that answered, when one did.
        public var remoteMTA: String?
        /// `smtp; 550 5.1.1 …` or `X-Tern; …`.
        public var diagnostic: String?

        public init(
            finalRecipient: String, originalRecipient: OriginalRecipient? = nil, action: Action,
            status: EnhancedStatusCode, remoteMTA: String? = nil, diagnostic: String? = nil
        ) {
            self.finalRecipient = finalRecipient
            self.originalRecipient = originalRecipient
            self.action = action
            self.status = status
            self.remoteMTA = remoteMTA
            self.diagnostic = diagnostic
        }
    }

    public var reportingMTA: String
    public var queueID: String
    public var envelopeSender: String
    public var envid: String?
    public var arrivalDate: String
    public var date: String
    public var recipients: [Recipient]
    /// RET=HDRS asks for the headers only; otherwise the whole message is returned when it
    /// is no larger than `returnLimit`, else its headers.
    public var returnHeadersOnly: Bool
    public var returnLimit: Int

    public init(
        reportingMTA: String, queueID: String, envelopeSender: String, envid: String?, arrivalDate: String,
        date: String, recipients: [Recipient], returnHeadersOnly: Bool, returnLimit: Int = 50_000
    ) {
        self.reportingMTA = reportingMTA
        self.queueID = queueID
        self.envelopeSender = envelopeSender
        self.envid = envid
        self.arrivalDate = arrivalDate
        self.date = date
        self.recipients = recipients
        self.returnHeadersOnly = returnHeadersOnly
        self.returnLimit = returnLimit
    }

    /// The notification as a complete message (CRLF line endings), ready to be queued with
    /// the null sender. `boundary` must not occur in the original message; callers derive it
    /// from the queue id and a random part.
    public func render(original: [UInt8], boundary: String, messageID: String) -> [UInt8] {
        let delayed = recipients.allSatisfy { $0.action == .delayed }
        let success = recipients.allSatisfy { $0.action == .relayed || $0.action == .delivered }
        var out = ""
        out += "From: MAILER-DAEMON@\(reportingMTA) (Mail Delivery System)\r\n"
        out += "To: <\(envelopeSender)>\r\n"
        let subject =
            success ? "Successful Mail Delivery Report" : delayed ? "Delayed Mail (still being retried)" : "Undelivered Mail Returned to Sender"
        out += "Subject: \(subject)\r\n"
        out += "Date: \(date)\r\n"
        out += "Message-ID: <\(messageID)>\r\n"
        out += "Auto-Submitted: auto-replied\r\n"
        out += "MIME-Version: 1.0\r\n"
        out += "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"\(boundary)\"\r\n"
        out += "\r\nThis is a MIME-encapsulated message.\r\n\r\n"

        let human = humanText(delayed: delayed, success: success)
        out += "--\(boundary)\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n"
        if !human.utf8.allSatisfy({ $0 < 0x80 }) { out += "Content-Transfer-Encoding: 8bit\r\n" }
        out += "\r\n" + human

        out += "\r\n--\(boundary)\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        out += "Reporting-MTA: dns; \(reportingMTA)\r\n"
        out += "X-Tern-Queue-ID: \(queueID)\r\n"
        if let envid { out += "Original-Envelope-Id: \(Self.clean(envid))\r\n" }
        out += "Arrival-Date: \(arrivalDate)\r\n"
        for r in recipients {
            out += "\r\n"
            out += "Final-Recipient: \(Self.typedAddress(r.finalRecipient))\r\n"
            if let o = r.originalRecipient { out += "Original-Recipient: \(o.addressType); \(Self.clean(o.address))\r\n" }
            out += "Action: \(r.action.rawValue)\r\n"
            out += "Status: \(r.status)\r\n"
            if let m = r.remoteMTA { out += "Remote-MTA: \(Self.clean(m))\r\n" }
            if let d = r.diagnostic { out += "Diagnostic-Code: \(Self.clean(d))\r\n" }
        }

        // A success report returns the headers only, as Postfix does: the sender has the rest.
        let headersOnly = returnHeadersOnly || success || original.count > returnLimit
        out += "\r\n--\(boundary)\r\n"
        out += headersOnly
            ? "Content-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            : "Content-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n\r\n"
        var bytes = Array(out.utf8)
        let returned = headersOnly ? Self.headerBlock(of: original) : original
        bytes += returned
        if returned.suffix(2) != [0x0D, 0x0A] { bytes += [0x0D, 0x0A] }
        bytes += Array("\r\n--\(boundary)--\r\n".utf8)
        return bytes
    }

    private func humanText(delayed: Bool, success: Bool) -> String {
        var t = "This is the mail system at host \(reportingMTA).\r\n\r\n"
        if success {
            t += "Your message was delivered to the destination's mail server. It does not offer\r\n"
            t += "delivery status notifications, so this is the last report you will get.\r\n"
        } else if delayed {
            t += "Your message could not be delivered yet. It is still in the queue and will be\r\n"
            t += "tried again; you do not need to send it again.\r\n"
        } else {
            t += "I'm sorry to have to inform you that your message could not be delivered to one\r\n"
            t += "or more recipients. The report below says why.\r\n"
        }
        t += "\r\n"
        for r in recipients where r.action != .expanded {
            t += "<\(r.finalRecipient)>: \(Self.clean(r.diagnostic ?? r.status.description))\r\n"
        }
        return t
    }

    /// `rfc822; a@b` for ASCII addresses; for others RFC 6533's `utf-8` type in its
    /// utf-8-addr-xtext form, which keeps the (ASCII-only) message/delivery-status part valid:
    /// each non-ASCII character and each of `+`, `=`, `\\` becomes `\\x{HEX}`.
    static func typedAddress(_ address: String) -> String {
        if address.utf8.allSatisfy({ $0 < 0x80 }) { return "rfc822; \(address)" }
        var out = "utf-8; "
        for scalar in address.unicodeScalars {
            if scalar.value > 0x20, scalar.value < 0x7F, scalar != "+", scalar != "=", scalar != "\\" {
                out.unicodeScalars.append(scalar)
            } else {
                out += "\\x{" + String(scalar.value, radix: 16, uppercase: true) + "}"
            }
        }
        return out
    }

    /// A field value on one line: no CR or LF, and short enough for the 998-octet limit.
    static func clean(_ text: String) -> String {
        let flat = String(String.UnicodeScalarView(text.unicodeScalars.map { $0 == "\r" || $0 == "\n" ? " " : $0 }))
        return flat.utf8.count <= 900 ? flat : String(decoding: Array(flat.utf8.prefix(900)), as: UTF8.self)
    }

    /// The header block of a message: everything before the first empty line, and that line.
    static func headerBlock(of message: [UInt8]) -> [UInt8] {
        let separator: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A]
        var i = 0
        while i + 4 <= message.count {
            if Array(message[i..<i + 4]) == separator { return Array(message[..<(i + 2)]) }
            i += 1
        }
        return message
    }
}
