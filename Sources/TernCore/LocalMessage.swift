import SMTPProtocol

/// A message read from `sendmail`'s standard input, made ready for SMTP: lines end in CRLF,
/// a lone `.` ends it unless `-i`, `-t` takes the recipients from its headers, and `Bcc:` is
/// never sent on (the point of a blind copy).
public struct LocalMessage: Equatable, Sendable {
    /// The message with CRLF line endings, not yet dot-stuffed.
    public var content: [UInt8]
    /// The addresses of `To:`, `Cc:` and `Bcc:`, when asked for.
    public var headerRecipients: [String] = []

    /// - Parameters:
    ///   - fromLine: a `From:` value to add when the message has none (`-F`), or nil.
    public init(input: [UInt8], ignoreDots: Bool, extractRecipients: Bool, fromLine: String? = nil) {
        var lines: [ArraySlice<UInt8>] = []
        var start = 0
        while start < input.count {
            let end = input[start...].firstIndex(of: 0x0A) ?? input.count
            var line = input[start..<end]
            if line.last == 0x0D { line = line.dropLast() }
            start = end + 1
            if !ignoreDots, line.count == 1, line.first == UInt8(ascii: ".") { break }
            lines.append(line)
        }
        // The header section: fields and their continuation lines, up to the first other line.
        var headerEnd = 0
        var fieldStarts: [Int] = []
        while headerEnd < lines.count {
            let line = lines[headerEnd]
            if let first = line.first, first == 0x20 || first == 0x09, !fieldStarts.isEmpty {
                headerEnd += 1
                continue
            }
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex,
                line[..<colon].allSatisfy({ $0 > 0x20 && $0 < 0x7F })
            else { break }
            fieldStarts.append(headerEnd)
            headerEnd += 1
        }
        var kept: [ArraySlice<UInt8>] = []
        var recipients: [String] = []
        var hasFrom = false
        for (n, fieldStart) in fieldStarts.enumerated() {
            let fieldEnd = n + 1 < fieldStarts.count ? fieldStarts[n + 1] : headerEnd
            let field = lines[fieldStart..<fieldEnd]
            guard let first = field.first, let colon = first.firstIndex(of: UInt8(ascii: ":")) else { continue }
            let name = String(decoding: first[..<colon], as: UTF8.self).lowercased()
            if name == "from" { hasFrom = true }
            if extractRecipients, ["to", "cc", "bcc"].contains(name) {
                var value = String(decoding: first[(colon + 1)...], as: UTF8.self)
                for more in field.dropFirst() { value += String(decoding: more, as: UTF8.self) }
                recipients += AddressList.addresses(in: value)
            }
            if name != "bcc" { kept.append(contentsOf: field) }
        }
        if !hasFrom, let fromLine { kept.insert(ArraySlice(("From: " + fromLine).utf8), at: 0) }
        var out: [UInt8] = []
        out.reserveCapacity(input.count + lines.count + 64)
        for line in kept + lines[headerEnd...] {
            out += line
            out += [0x0D, 0x0A]
        }
        content = out
        headerRecipients = recipients
    }

    /// `Full Name <address>`, the display name quoted when it needs to be.
    /// - SeeAlso: RFC 5322 §3.2.3 (specials), §3.4
    public static func fromLine(fullName: String, address: String) -> String {
        let specials = Set("()<>[]:;@\\,.\"")
        let clean = fullName.filter { $0 != "\r" && $0 != "\n" }
        let name = clean.contains(where: { specials.contains($0) })
            ? "\"" + clean.replacingAll("\\", "\\\\").replacingAll("\"", "\\\"") + "\"" : clean
        return "\(name) <\(address)>"
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, _ replacement: String) -> String {
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}
