#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The daily summary an operator gets from pflogsumm, read from Tern's own log in any of its
/// forms: `log.style: tern` (`2026-11-27T19:50:01.123Z tern[pid]: info: …`), `postfix`
/// (`Nov 27 19:50:01 host tern/smtpd[pid]: …`), and what syslog daemons write to
/// /var/log/mail.log (either timestamp). Lines of other programs are skipped.
public struct LogReport: Codable, Equatable, Sendable {
    public struct Count: Codable, Equatable, Sendable {
        public var name: String
        public var count: Int
    }

    public struct Deliveries: Codable, Equatable, Sendable {
        public var name: String
        public var sent = 0
        public var deferred = 0
        public var bounced = 0
        /// Seconds from arrival to delivery, over the `sent` ones.
        public var averageDelay: Double = 0
        public var maxDelay: Double = 0
        var delaySum: Double = 0

        enum CodingKeys: String, CodingKey { case name, sent, deferred, bounced, averageDelay, maxDelay }
    }

    public var from: Int64
    public var to: Int64
    public var received = 0
    public var receivedBytes = 0
    /// Recipient deliveries (one per recipient), as pflogsumm counts them.
    public var delivered = 0
    /// Messages with at least one deferral, and deferral lines.
    public var deferredMessages = 0
    public var deferrals = 0
    public var bounced = 0
    public var rejected = 0
    public var notifications = 0
    public var rejectReasons: [Count] = []
    public var deferralReasons: [Count] = []
    public var bounceReasons: [Count] = []
    public var byDomain: [Deliveries] = []
    public var byLane: [Deliveries] = []
    public var topSenders: [Count] = []
    public var topRecipients: [Count] = []
    /// Next hops that refused TLS or Tern's login, with counts.
    public var upstreamTLSFailures: [Count] = []
    public var upstreamAuthFailures: [Count] = []
    public var clientAuthFailures = 0
    public var clientTLSFailures = 0
    /// Filled by the command from the spool: messages queued now, and the oldest one's age.
    public var queued: Int?
    public var oldestQueuedSeconds: Int64?

    // MARK: - Reading

    /// One line's time (seconds since 1970), service and text, or nil for another program's.
    static func split(_ line: Substring, year: Int32) -> (time: Int64, text: Substring)? {
        var rest = line
        let time: Int64
        if let first = rest.first, first.isNumber {
            // 2026-11-27T19:50:01.123Z or 2026-11-27T19:50:01.123456+01:00
            guard let space = rest.firstIndex(of: " ") else { return nil }
            guard let t = parseISO(rest[..<space]) else { return nil }
            time = t
            rest = rest[rest.index(after: space)...]
        } else {
            // Nov 27 19:50:01 (local time)
            guard rest.count > 16, let t = parseSyslog(rest.prefix(15), year: year) else { return nil }
            time = t
            rest = rest.dropFirst(16)
        }
        // [host] tern[pid]: or tern/service[pid]:
        var words = rest.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard !words.isEmpty else { return nil }
        if !words[0].hasPrefix("tern[") && !words[0].hasPrefix("tern/"), words.count > 1 { words.removeFirst() }
        guard let program = words.first, program.hasPrefix("tern[") || program.hasPrefix("tern/"), program.hasSuffix(":"),
            let colon = rest.firstRange(of: String(program))
        else { return nil }
        var text = rest[colon.upperBound...]
        if text.first == " " { text = text.dropFirst() }
        // The tern style's level.
        for level in ["trace: ", "debug: ", "info: ", "notice: ", "warning: ", "error: ", "critical: "] where text.hasPrefix(level) {
            if level != "warning: " && level != "error: " || program.hasPrefix("tern[") { text = text.dropFirst(level.count) }
            break
        }
        return (time, text)
    }

    static func parseISO(_ s: Substring) -> Int64? {
        let b = Array(s.utf8)
        guard b.count >= 20, b[4] == UInt8(ascii: "-"), b[7] == UInt8(ascii: "-"), b[10] == UInt8(ascii: "T") else { return nil }
        func num(_ r: Range<Int>) -> Int32? { Int32(String(decoding: b[r], as: UTF8.self)) }
        guard let y = num(0..<4), let mo = num(5..<7), let d = num(8..<10), let h = num(11..<13), let mi = num(14..<16),
            let se = num(17..<19)
        else { return nil }
        var parts = tm()
        parts.tm_year = y - 1900
        parts.tm_mon = mo - 1
        parts.tm_mday = d
        parts.tm_hour = h
        parts.tm_min = mi
        parts.tm_sec = se
        var seconds = Int64(timegm(&parts))
        // The zone: Z, or ±hh:mm after the fraction.
        if let sign = b[19...].firstIndex(where: { $0 == UInt8(ascii: "+") || $0 == UInt8(ascii: "-") }), sign + 6 <= b.count,
            let zh = num((sign + 1)..<(sign + 3)), let zm = num((sign + 4)..<(sign + 6))
        {
            let offset = Int64(zh) * 3600 + Int64(zm) * 60
            seconds += b[sign] == UInt8(ascii: "+") ? -offset : offset
        }
        return seconds
    }

    static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    static func parseSyslog(_ s: Substring, year: Int32) -> Int64? {
        let parts = s.split(separator: " ", omittingEmptySubsequences: true)
        guard parts.count == 3, let month = months.firstIndex(of: String(parts[0])), let day = Int32(parts[1]) else { return nil }
        let hms = parts[2].split(separator: ":")
        guard hms.count == 3, let h = Int32(hms[0]), let m = Int32(hms[1]), let sec = Int32(hms[2]) else { return nil }
        var t = tm()
        t.tm_year = year - 1900
        t.tm_mon = Int32(month)
        t.tm_mday = day
        t.tm_hour = h
        t.tm_min = m
        t.tm_sec = sec
        t.tm_isdst = -1
        return Int64(mktime(&t))
    }

    // MARK: - Counting

    /// Reads `lines`, counting what happened between `from` and `to` (seconds since 1970).
    /// Lines with syslog timestamps carry no year: they are taken to be within a year before `to`.
    public init<Lines: Sequence>(lines: Lines, from: Int64, to: Int64) where Lines.Element: StringProtocol {
        self.from = from
        self.to = to
        var now = time_t(to)
        var parts = tm()
        localtime_r(&now, &parts)
        let thisYear = parts.tm_year + 1900
        var rejects: [String: Int] = [:], deferrals: [String: Int] = [:], bounces: [String: Int] = [:]
        var senders: [String: Int] = [:], recipients: [String: Int] = [:]
        var domains: [String: Deliveries] = [:], lanes: [String: Deliveries] = [:]
        var tlsFailures: [String: Int] = [:], authFailures: [String: Int] = [:]
        var deferredIDs: Set<Substring> = []
        for raw in lines {
            let line = Substring(raw)
            guard var (time, text) = Self.split(line, year: thisYear) else { continue }
            if time > to + 86400 {
                // A syslog date later than the end: last year's.
                guard let earlier = Self.split(line, year: thisYear - 1) else { continue }
                (time, text) = earlier
            }
            guard time >= from, time < to else { continue }
            if let r = text.firstRange(of: "NOQUEUE: reject: ") ?? text.firstRange(of: ": reject: END-OF-MESSAGE") {
                rejected += 1
                rejects[Self.rejectReason(text[r.lowerBound...]), default: 0] += 1
            } else if let r = text.firstRange(of: ": reject by filter ") {
                rejected += 1
                rejects[Self.rejectReason(text[r.lowerBound...]), default: 0] += 1
            } else if text.contains(": to=<"), let d = Self.delivery(text) {
                let domain = d.recipient.split(separator: "@").last.map { String($0).lowercased() } ?? d.recipient
                var dom = domains[domain] ?? Deliveries(name: domain)
                var lane = lanes[d.lane ?? d.relay] ?? Deliveries(name: d.lane ?? d.relay)
                switch d.status {
                case "sent":
                    delivered += 1
                    recipients[d.recipient.lowercased(), default: 0] += 1
                    for i in 0..<2 {
                        var row = i == 0 ? dom : lane
                        row.sent += 1
                        row.delaySum += d.delay
                        row.maxDelay = max(row.maxDelay, d.delay)
                        if i == 0 { dom = row } else { lane = row }
                    }
                case "deferred":
                    deferrals[Self.grouped(d.reason), default: 0] += 1
                    self.deferrals += 1
                    if deferredIDs.insert(d.id).inserted { deferredMessages += 1 }
                    dom.deferred += 1
                    lane.deferred += 1
                case "bounced":
                    bounced += 1
                    bounces[Self.grouped(d.reason), default: 0] += 1
                    dom.bounced += 1
                    lane.bounced += 1
                default:
                    break
                }
                domains[domain] = dom
                lanes[lane.name] = lane
            } else if let r = text.firstRange(of: ": from=<") {
                let rest = text[r.upperBound...]
                guard let close = rest.firstIndex(of: ">") else { continue }
                if text.contains("client=") {
                    received += 1
                    let sender = rest[..<close].lowercased()
                    senders[sender.isEmpty ? "<>" : sender, default: 0] += 1
                    if let s = rest.firstRange(of: "size=") {
                        receivedBytes += Int(rest[s.upperBound...].prefix { $0.isNumber }) ?? 0
                    }
                } else if rest[..<close].isEmpty {
                    notifications += 1
                }
            } else if let r = text.firstRange(of: "connect to "), text.contains(" failed at startTLS: ") || text.contains(" failed at auth: ") {
                let host = String(text[r.upperBound...].prefix { $0 != " " })
                if text.contains(" failed at auth: ") { authFailures[host, default: 0] += 1 } else { tlsFailures[host, default: 0] += 1 }
            } else if text.contains("SASL authentication failed") {
                clientAuthFailures += 1
            } else if text.hasPrefix("TLS error from ") {
                clientTLSFailures += 1
            }
        }
        func sorted(_ d: [String: Int], limit: Int = 20) -> [Count] {
            d.map { Count(name: $0.key, count: $0.value) }.sorted { ($0.count, $1.name) > ($1.count, $0.name) }.prefix(limit).map { $0 }
        }
        func rows(_ d: [String: Deliveries]) -> [Deliveries] {
            d.values.map { r in
                var r = r
                r.averageDelay = r.sent > 0 ? (r.delaySum / Double(r.sent) * 100).rounded() / 100 : 0
                return r
            }.sorted { ($0.sent + $0.deferred + $0.bounced, $1.name) > ($1.sent + $1.deferred + $1.bounced, $0.name) }
        }
        rejectReasons = sorted(rejects)
        deferralReasons = sorted(deferrals)
        bounceReasons = sorted(bounces)
        topSenders = sorted(senders)
        topRecipients = sorted(recipients)
        byDomain = rows(domains)
        byLane = rows(lanes)
        upstreamTLSFailures = sorted(tlsFailures)
        upstreamAuthFailures = sorted(authFailures)
    }

    struct DeliveryLine {
        var id: Substring
        var recipient: String
        var relay: String
        var delay: Double
        var status: String
        var reason: String
        var lane: String?
    }

    /// `ID: to=<r>, relay=R, delay=D, delays=…, dsn=X, status=S (reason) lane=L`
    static func delivery(_ text: Substring) -> DeliveryLine? {
        guard let colon = text.firstRange(of: ": to=<") else { return nil }
        let id = text[..<colon.lowerBound]
        let rest = text[colon.upperBound...]
        guard let close = rest.firstIndex(of: ">"), let relayStart = rest.firstRange(of: ", relay="),
            let delayStart = rest.firstRange(of: ", delay="), let statusStart = rest.firstRange(of: ", status=")
        else { return nil }
        let relay = String(rest[relayStart.upperBound..<delayStart.lowerBound])
        let delay = Double(rest[delayStart.upperBound...].prefix { $0 != "," }) ?? 0
        let afterStatus = rest[statusStart.upperBound...]
        let status = String(afterStatus.prefix { $0 != " " })
        var reason = ""
        var lane: String?
        if let open = afterStatus.firstIndex(of: "(") {
            var body = afterStatus[afterStatus.index(after: open)...]
            if let l = body.ranges(of: ") lane=").last {
                lane = String(body[l.upperBound...])
                body = body[..<l.lowerBound]
            } else if body.hasSuffix(")") {
                body = body.dropLast()
            }
            reason = String(body)
        }
        return DeliveryLine(id: id, recipient: String(rest[..<close]), relay: relay, delay: delay, status: status, reason: reason, lane: lane)
    }

    /// `NOQUEUE: reject: RCPT from unknown[IP]: 554 5.7.1 <x@y>: Relay access denied; from=…`
    /// → `RCPT 554 5.7.1 Relay access denied`.
    static func rejectReason(_ text: Substring) -> String {
        var stage = "END-OF-MESSAGE"
        var rest = text
        if let r = text.firstRange(of: "reject: ") {
            rest = text[r.upperBound...]
            stage = String(rest.prefix { $0 != " " })
        } else if let r = text.firstRange(of: "reject by filter ") {
            rest = text[r.upperBound...]
            stage = "filter " + rest.prefix { $0 != ":" }
        }
        // The reply: after "from CLIENT: " (or the filter's name), up to "; from=".
        if let r = rest.firstRange(of: ": ") { rest = rest[r.upperBound...] }
        if let end = rest.firstRange(of: "; from=") { rest = rest[..<end.lowerBound] }
        return stage + " " + grouped(String(rest))
    }

    /// A reason with what varies per message taken out, so that alike reasons add up:
    /// `<addresses>`, `[addresses]` and queue ids.
    static func grouped(_ text: String) -> String {
        var out = ""
        var skipping: Character?
        for c in text {
            if let s = skipping {
                if c == s { skipping = nil }
                continue
            }
            if c == "<" {
                skipping = ">"
                out += "<…>"
                continue
            }
            out.append(c)
        }
        let cleaned = out.replacingOccurrences(of: "<…>: ", with: "")
        return cleaned.count > 120 ? String(cleaned.prefix(117)) + "…" : cleaned
    }
}

extension String {
    fileprivate func replacingOccurrences(of target: String, with replacement: String) -> String {
        var out = ""
        var rest = Substring(self)
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound] + replacement
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
}

// MARK: - Text

extension LogReport {
    /// The report as a mail message: a Subject line, then the body (`tern report | tern
    /// sendmail admin@example.com`).
    public func text(hostname: String) -> String {
        var out = "Subject: Tern report for \(hostname): \(MailDate.utc(time_t(from))) to \(MailDate.utc(time_t(to)))\n"
        out += "Content-Type: text/plain; charset=utf-8\n\n"
        func line(_ n: Int, _ label: String) { out += pad(String(n), 8) + "  " + label + "\n" }
        out += "Grand totals\n------------\n"
        line(received, "received (\(receivedBytes) bytes)")
        line(delivered, "delivered (recipients)")
        line(deferredMessages, "deferred (\(deferrals) deferrals)")
        line(bounced, "bounced")
        line(rejected, "rejected")
        line(notifications, "notifications to senders (bounces, delays)")
        if let queued {
            out += pad(String(queued), 8) + "  queued now" + (oldestQueuedSeconds.map { ", the oldest for \(Self.duration($0))" } ?? "") + "\n"
        }
        func table(_ title: String, _ rows: [Deliveries]) {
            guard !rows.isEmpty else { return }
            out += "\n\(title)\n" + String(repeating: "-", count: title.count) + "\n"
            out += "    sent  deferred   bounced  avg delay  max delay  name\n"
            for r in rows.prefix(30) {
                out += pad(String(r.sent), 8) + pad(String(r.deferred), 10) + pad(String(r.bounced), 10)
                    + pad(Self.seconds(r.averageDelay), 11) + pad(Self.seconds(r.maxDelay), 11) + "  " + r.name + "\n"
            }
        }
        func counts(_ title: String, _ rows: [Count]) {
            guard !rows.isEmpty else { return }
            out += "\n\(title)\n" + String(repeating: "-", count: title.count) + "\n"
            for r in rows { out += pad(String(r.count), 8) + "  " + r.name + "\n" }
        }
        table("By recipient domain", byDomain)
        table("By lane", byLane)
        counts("Top senders", topSenders)
        counts("Top recipients", topRecipients)
        counts("Rejects", rejectReasons)
        counts("Deferral reasons", deferralReasons)
        counts("Bounce reasons", bounceReasons)
        counts("TLS failures with next hops", upstreamTLSFailures)
        counts("AUTH refused by next hops", upstreamAuthFailures)
        if clientAuthFailures + clientTLSFailures > 0 {
            out += "\nClients\n-------\n"
            line(clientAuthFailures, "failed AUTH attempts")
            line(clientTLSFailures, "failed TLS handshakes")
        }
        return out
    }

    func pad(_ s: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - s.count)) + s }

    static func seconds(_ s: Double) -> String {
        s < 10 ? String(Double(Int(s * 10)) / 10) + " s" : "\(Int(s)) s"
    }

    static func duration(_ s: Int64) -> String {
        s >= 86400 ? "\(s / 86400)d \(s % 86400 / 3600)h" : s >= 3600 ? "\(s / 3600)h \(s % 3600 / 60)m" : "\(s / 60)m \(s % 60)s"
    }
}
