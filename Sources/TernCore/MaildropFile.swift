/// A message `tern sendmail` left in the maildrop while the daemon was down.
///
/// ```
/// tern-maildrop 1
/// sender alice@example.com        (empty after "sender " for the null sender)
/// recipient bob@example.org       (one line each, at least one)
/// notify success,failure          (optional: -N, -R, -V)
/// ret hdrs
/// envid abc123
///                                 (an empty line)
/// the message, lines ending in LF
/// ```
/// Anyone in `sendmail.group` can write a maildrop file, so the daemon trusts none of it: it
/// decodes the envelope here, then replays the file through its own SMTP session, which
/// checks addresses, size, hops and line endings as it checks every client's.
public struct MaildropFile: Equatable, Sendable {
    public var sender: String
    public var recipients: [String]
    public var notify: String?
    public var ret: String?
    public var envid: String?
    /// The message, LF line endings.
    public var content: [UInt8]

    public init(sender: String, recipients: [String], notify: String? = nil, ret: String? = nil, envid: String? = nil, content: [UInt8]) {
        self.sender = sender
        self.recipients = recipients
        self.notify = notify
        self.ret = ret
        self.envid = envid
        self.content = content
    }

    static let magic = "tern-maildrop 1"
    /// The envelope part is small; a longer one is not a maildrop file.
    static let maxEnvelope = 1 << 20

    public struct DecodeError: Error, Equatable, CustomStringConvertible {
        public var description: String
    }

    public var encoded: [UInt8] {
        var text = Self.magic + "\nsender \(sender)\n"
        for r in recipients { text += "recipient \(r)\n" }
        if let notify { text += "notify \(notify)\n" }
        if let ret { text += "ret \(ret)\n" }
        if let envid { text += "envid \(envid)\n" }
        return Array((text + "\n").utf8) + content
    }

    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var lines: [String] = []
        var i = 0
        while true {
            guard let end = bytes[i...].prefix(Self.maxEnvelope).firstIndex(of: 0x0A) else {
                throw DecodeError(description: "the envelope does not end")
            }
            let line = bytes[i..<end]
            i = end + 1
            if line.isEmpty { break }
            guard line.allSatisfy({ $0 >= 0x20 && $0 != 0x7F || $0 >= 0x80 }), let text = String(validating: line, as: UTF8.self) else {
                throw DecodeError(description: "control characters or invalid UTF-8 in the envelope")
            }
            lines.append(text)
        }
        guard lines.first == Self.magic else { throw DecodeError(description: "not a maildrop file") }
        var sender: String?
        var recipients: [String] = []
        var notify: String?, ret: String?, envid: String?
        for line in lines.dropFirst() {
            let (key, value) = line.firstIndex(of: " ").map { (line[..<$0], String(line[line.index(after: $0)...])) } ?? (line[...], "")
            switch key {
            case "sender" where sender == nil: sender = value
            case "recipient" where !value.isEmpty: recipients.append(value)
            case "notify" where notify == nil: notify = value
            case "ret" where ret == nil: ret = value
            case "envid" where envid == nil: envid = value
            default: throw DecodeError(description: "unexpected envelope line '\(key)'")
            }
        }
        guard let sender else { throw DecodeError(description: "no sender") }
        guard !recipients.isEmpty else { throw DecodeError(description: "no recipients") }
        // An address is replayed inside `<…>` on a command line: nothing in it may close the
        // brackets or start a parameter.
        for address in [sender] + recipients where address.contains(where: { $0 == " " || $0 == "<" || $0 == ">" }) {
            throw DecodeError(description: "a space or an angle bracket in an address")
        }
        self.init(sender: sender, recipients: recipients, notify: notify, ret: ret, envid: envid, content: Array(bytes[i...]))
    }
}
