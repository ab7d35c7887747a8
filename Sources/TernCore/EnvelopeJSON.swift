import SMTPProtocol

/// The envelope as the one line of JSON the spool stores, written by hand: the same bytes as
/// `JSONEncoder` with `.sortedKeys` (keys in order, absent optionals left out, `/` escaped as
/// `\/`), which reads it back. `JSONEncoder` took 4% of the relay's CPU at 20 sessions, a
/// tenth of it per message in boxing and key sorting; this is one pass over the strings.
extension Envelope {
    public var jsonBytes: [UInt8] {
        var w = JSONWriter()
        w.open("{")
        w.key("arrivalMillis")
        w.integer(arrivalMillis)
        if let authUser { w.key("authUser"); w.string(authUser) }
        if let body { w.key("body"); w.string(body) }
        w.key("client")
        w.open("{")
        w.key("address"); w.string(client.address)
        if let helo = client.helo { w.key("helo"); w.string(helo) }
        w.key("port"); w.integer(Int64(client.port))
        w.key("protocol"); w.string(client.protocol)
        if let tls = client.tlsVersion { w.key("tlsVersion"); w.string(tls) }
        w.close("}")
        if let envid { w.key("envid"); w.string(envid) }
        w.key("listener"); w.string(listener)
        w.key("recipients")
        w.open("[")
        for recipient in recipients {
            w.element()
            w.open("{")
            w.key("address"); w.string(recipient.address)
            if let notify = recipient.notify { w.key("notify"); w.integer(Int64(notify.rawValue)) }
            if let orcpt = recipient.orcpt {
                w.key("orcpt")
                w.open("{")
                w.key("address"); w.string(orcpt.address)
                w.key("addressType"); w.string(orcpt.addressType)
                w.close("}")
            }
            w.close("}")
        }
        w.close("]")
        if let ret { w.key("ret"); w.string(ret.rawValue) }
        w.key("sender"); w.string(sender)
        w.key("smtpUTF8"); w.bool(smtpUTF8)
        w.close("}")
        return w.bytes
    }
}

/// A compact JSON writer for values whose shape the caller knows; keys are written in the
/// order given, so a caller that wants sorted keys gives them sorted.
struct JSONWriter {
    var bytes: [UInt8] = []

    init() { bytes.reserveCapacity(512) }

    mutating func open(_ bracket: Unicode.Scalar) { bytes.append(UInt8(ascii: bracket)) }

    mutating func close(_ bracket: Unicode.Scalar) { bytes.append(UInt8(ascii: bracket)) }

    /// Before an array element: a comma unless it is the first.
    mutating func element() {
        if let last = bytes.last, last != UInt8(ascii: "["), last != UInt8(ascii: "{") { bytes.append(UInt8(ascii: ",")) }
    }

    /// An object member's name and colon, after a comma unless it is the first.
    mutating func key(_ name: String) {
        element()
        string(name)
        bytes.append(UInt8(ascii: ":"))
    }

    mutating func integer(_ value: Int64) {
        bytes.append(contentsOf: String(value).utf8)
    }

    mutating func bool(_ value: Bool) {
        bytes.append(contentsOf: (value ? "true" : "false").utf8)
    }

    /// A string, escaped as `JSONEncoder` escapes it: `"`, `\` and `/` with a backslash,
    /// the usual control characters by their short forms, the others as `\u00XX`.
    mutating func string(_ value: String) {
        bytes.append(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): bytes.append(contentsOf: [0x5C, 0x22])
            case UInt8(ascii: "\\"): bytes.append(contentsOf: [0x5C, 0x5C])
            case UInt8(ascii: "/"): bytes.append(contentsOf: [0x5C, 0x2F])
            case 0x0A: bytes.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: bytes.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: bytes.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0x08: bytes.append(contentsOf: [0x5C, UInt8(ascii: "b")])
            case 0x0C: bytes.append(contentsOf: [0x5C, UInt8(ascii: "f")])
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, hex[Int(byte >> 4)], hex[Int(byte & 0xF)]])
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}
