import CMilter
import SMTPProtocol
import TernCore

/// The MTA side of the milter protocol, version 6: packets, option negotiation, replies.
/// The numbers come from libmilter's `mfdef.h`/`mfapi.h` (through `CMilter`); the protocol
/// code is ours (libmilter implements only the filter side).
///
/// A packet is a 32-bit big-endian length (command byte included), a command byte, data.
enum Milter {
    static let version: UInt32 = 6
    /// Every modification Tern can apply at end of message.
    static let actions = UInt32(
        SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS | SMFIF_QUARANTINE | SMFIF_CHGFROM
            | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)
    /// Steps Tern can leave out or take without a reply when a milter asks.
    static let protocolFlags = UInt32(
        SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR
            | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_SKIP | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT
            | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC)
    static let chunkSize = Int(MILTER_CHUNK_SIZE)

    struct Packet: Equatable {
        var command: UInt8
        var data: [UInt8]

        var encoded: [UInt8] {
            let length = UInt32(data.count + 1)
            return [UInt8(length >> 24), UInt8((length >> 16) & 0xFF), UInt8((length >> 8) & 0xFF), UInt8(length & 0xFF), command] + data
        }

        /// `name\0value\0…`
        static func strings(_ command: UInt8, _ values: [String]) -> Packet {
            var data: [UInt8] = []
            for v in values {
                data += Array(v.utf8)
                data.append(0)
            }
            return Packet(command: command, data: data)
        }
    }

    static func u32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)] }

    static func readU32(_ bytes: ArraySlice<UInt8>) -> UInt32? {
        guard bytes.count >= 4 else { return nil }
        let b = Array(bytes.prefix(4))
        return UInt32(b[0]) << 24 | UInt32(b[1]) << 16 | UInt32(b[2]) << 8 | UInt32(b[3])
    }

    /// NUL-terminated strings in a packet's data.
    static func cStrings(_ data: ArraySlice<UInt8>) -> [String] {
        data.split(separator: 0, omittingEmptySubsequences: false).dropLast(data.last == 0 ? 1 : 0).map { String(decoding: $0, as: UTF8.self) }
    }

    /// What the milter agreed to in its answer to SMFIC_OPTNEG.
    struct Negotiated: Equatable {
        var version: UInt32
        var actions: UInt32
        var flags: UInt32
        /// Macro names the milter asked for, by stage (SMFIM_*); stages it did not name get
        /// Tern's full set.
        var macroLists: [Int: Set<String>] = [:]

        func has(_ flag: Int) -> Bool { flags & UInt32(flag) != 0 }
        func may(_ action: Int) -> Bool { actions & UInt32(action) != 0 }
    }

    struct ProtocolError: Error, CustomStringConvertible {
        var description: String
    }

    static func negotiated(_ packet: Packet) throws -> Negotiated {
        guard packet.command == TERN_SMFIC_OPTNEG, let version = readU32(packet.data[...]),
            let actions = readU32(packet.data.dropFirst(4)), let flags = readU32(packet.data.dropFirst(8))
        else { throw ProtocolError(description: "bad option negotiation reply") }
        guard version >= 2 else { throw ProtocolError(description: "milter protocol version \(version) is too old") }
        // A milter may ask for no more than we offered.
        var result = Negotiated(version: min(version, Self.version), actions: actions & Self.actions, flags: flags & Self.protocolFlags)
        // After the three words, optionally: (stage, "space-separated names\0") pairs.
        var rest = packet.data.dropFirst(12)
        while let stage = readU32(rest) {
            rest = rest.dropFirst(4)
            let end = rest.firstIndex(of: 0) ?? rest.endIndex
            let names = String(decoding: rest[rest.startIndex..<end], as: UTF8.self).split(separator: " ").map(String.init)
            result.macroLists[Int(stage)] = Set(names)
            rest = end < rest.endIndex ? rest[(end + 1)...] : rest[end...]
        }
        return result
    }

    /// A milter's answer to a command.
    enum Reply: Equatable {
        case `continue`, accept, reject, tempfail, discard, skip, progress, connectionFailure
        case replyCode(SMTPReply)
        case quarantine(String)
        case modification(Modification)
    }

    enum Modification: Equatable {
        case addHeader(name: String, value: String)
        case insertHeader(index: Int, name: String, value: String)
        /// Change the `index`th (1-based) header of that name; an empty value deletes it.
        case changeHeader(index: Int, name: String, value: String)
        case addRecipient(String, parameters: String?)
        case deleteRecipient(String)
        case changeSender(String, parameters: String?)
        case replaceBody([UInt8])
    }

    static func reply(_ p: Packet) throws -> Reply {
        let strings = { cStrings(p.data[...]) }
        switch p.command {
        case TERN_SMFIR_CONTINUE: return .continue
        case TERN_SMFIR_ACCEPT: return .accept
        case TERN_SMFIR_REJECT: return .reject
        case TERN_SMFIR_TEMPFAIL: return .tempfail
        case TERN_SMFIR_DISCARD: return .discard
        case TERN_SMFIR_SKIP: return .skip
        case TERN_SMFIR_PROGRESS: return .progress
        case TERN_SMFIR_CONN_FAIL, TERN_SMFIR_SHUTDOWN: return .connectionFailure
        case TERN_SMFIR_REPLYCODE:
            let text = strings().first ?? ""
            guard let code = Int(text.prefix(3)), (400...599).contains(code) else {
                throw ProtocolError(description: "bad reply code '\(LogEscape.escape(text.prefix(60)))'")
            }
            var rest = Substring(text.dropFirst(3)).drop(while: { $0 == " " || $0 == "-" })
            var enhanced: EnhancedStatusCode?
            if let space = rest.firstIndex(of: " "), let esc = EnhancedStatusCode(parsing: rest[..<space]) {
                enhanced = esc
                rest = rest[rest.index(after: space)...]
            }
            // Multi-line replies arrive with CRLFs inside; keep each line.
            let lines = rest.split(separator: "\r\n", omittingEmptySubsequences: false).map { line -> String in
                let l = String(line)
                // continuation lines repeat "550-5.7.1 "; keep their text only
                if l.count > 4, Int(l.prefix(3)) != nil { return String(l.dropFirst(4)).drop(while: { $0 != " " }).drop(while: { $0 == " " }).description }
                return l
            }.map { LogEscape.escape($0) }  // the milter's text reaches the client and the log
            return .replyCode(SMTPReply(code, enhanced, lines.isEmpty ? [""] : lines))
        case TERN_SMFIR_QUARANTINE: return .quarantine(LogEscape.escape(strings().first ?? ""))
        case TERN_SMFIR_ADDHEADER:
            let s = strings()
            guard s.count >= 2 else { throw ProtocolError(description: "bad add-header") }
            return .modification(.addHeader(name: s[0], value: s[1]))
        case TERN_SMFIR_INSHEADER, TERN_SMFIR_CHGHEADER:
            guard let index = readU32(p.data[...]) else { throw ProtocolError(description: "bad header index") }
            let s = cStrings(p.data.dropFirst(4))
            guard s.count >= 2 else { throw ProtocolError(description: "bad header change") }
            return .modification(
                p.command == TERN_SMFIR_INSHEADER
                    ? .insertHeader(index: Int(index), name: s[0], value: s[1]) : .changeHeader(index: Int(index), name: s[0], value: s[1]))
        case TERN_SMFIR_ADDRCPT: return .modification(.addRecipient(strings().first ?? "", parameters: nil))
        case TERN_SMFIR_ADDRCPT_PAR:
            let s = strings()
            return .modification(.addRecipient(s.first ?? "", parameters: s.count > 1 && !s[1].isEmpty ? s[1] : nil))
        case TERN_SMFIR_DELRCPT: return .modification(.deleteRecipient(strings().first ?? ""))
        case TERN_SMFIR_CHGFROM:
            let s = strings()
            return .modification(.changeSender(s.first ?? "", parameters: s.count > 1 && !s[1].isEmpty ? s[1] : nil))
        case TERN_SMFIR_REPLBODY: return .modification(.replaceBody(p.data))
        default:
            throw ProtocolError(description: "unknown milter reply '\(Character(Unicode.Scalar(p.command)))'")
        }
    }

    /// `<a@b>` → `a@b`.
    static func bare(_ address: String) -> String {
        var a = Substring(address.trimmingCharacters(in: " "))
        if a.hasPrefix("<") { a = a.dropFirst() }
        if a.hasSuffix(">") { a = a.dropLast() }
        return String(a)
    }

    /// Applies end-of-message modifications to the message, in the order they came.
    static func apply(_ modifications: [Modification], to message: inout FilterMessage) {
        var newBody: [UInt8]?
        for m in modifications {
            switch m {
            case .addHeader(let name, let value):
                message.headers.fields.append(HeaderBlock.Field(name: name, value: headerValue(value)))
            case .insertHeader(let index, let name, let value):
                let at = min(max(0, index), message.headers.fields.count)
                message.headers.fields.insert(HeaderBlock.Field(name: name, value: headerValue(value)), at: at)
            case .changeHeader(let index, let name, let value):
                let matching = message.headers.fields.indices.filter { message.headers.fields[$0].isNamed(name) }
                let occurrence = max(1, index)
                if occurrence <= matching.count {
                    let i = matching[occurrence - 1]
                    if value.isEmpty {
                        message.headers.fields.remove(at: i)
                    } else {
                        message.headers.fields[i] = HeaderBlock.Field(name: name, value: headerValue(value))
                    }
                } else if !value.isEmpty {
                    // Changing a header that is not there adds it (as sendmail does).
                    message.headers.fields.append(HeaderBlock.Field(name: name, value: headerValue(value)))
                }
            case .addRecipient(let address, _):
                let bare = Self.bare(address)
                if !message.recipients.contains(where: { $0.address.lowercased() == bare.lowercased() }) {
                    message.recipients.append(EnvelopeRecipient(address: bare))
                }
            case .deleteRecipient(let address):
                let bare = Self.bare(address).lowercased()
                message.recipients.removeAll { $0.address.lowercased() == bare }
            case .changeSender(let address, _):
                message.sender = Self.bare(address)
            case .replaceBody(let chunk):
                newBody = (newBody ?? []) + chunk
            }
        }
        if let newBody {
            // A milter's body may use bare LF; the queue holds CRLF.
            var body: [UInt8] = []
            body.reserveCapacity(newBody.count + newBody.count / 40)
            for b in newBody {
                if b == 0x0A, body.last != 0x0D { body.append(0x0D) }
                body.append(b)
            }
            message.body = body
        }
    }

    /// Header values from milters fold with LF (or CRLF); written back with CRLF.
    static func headerValue(_ value: String) -> String {
        var v = value.replacingCRLF()
        while v.hasPrefix(" ") { v.removeFirst() }
        return v
    }
}

extension String {
    func replacingCRLF() -> String {
        var out = ""
        var previousCR = false
        for scalar in unicodeScalars {
            if scalar == "\n", !previousCR { out += "\r" }
            previousCR = scalar == "\r"
            out.unicodeScalars.append(scalar)
        }
        return out
    }

    func trimmingCharacters(in character: Character) -> String {
        var s = Substring(self)
        while s.first == character { s = s.dropFirst() }
        while s.last == character { s = s.dropLast() }
        return String(s)
    }
}
