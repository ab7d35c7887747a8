import Ingress
import SMTPProtocol
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A blocking SMTP client over the spool's Unix socket: how `tern sendmail` hands a message to
/// the daemon, and how the daemon's maildrop pickup replays a file through its own session.
/// The other end is Tern itself, but a reply is still read with caps (line length, lines per
/// reply) and a deadline, as every reply is.
struct LocalSMTPClient {
    private let fd: CInt
    private var buffer: [UInt8] = []
    var transcript: ((String) -> Void)?

    struct Failure: Error, CustomStringConvertible {
        var description: String
        /// The connect() errno, when the daemon could not be reached at all.
        var connectErrno: CInt?
    }

    struct Reply {
        var code: Int
        var text: String
        var line: String { "\(code) \(text)" }
        var isPositive: Bool { code >= 200 && code < 400 }
    }

    /// Connects to the daemon's socket; `timeout` bounds each read and write.
    static func connect(path: String, timeout: Int = 600) throws(Failure) -> LocalSMTPClient {
        guard let address = UnixSocketAddress(path: path) else {
            throw Failure(description: "\(path): path too long", connectErrno: ENAMETOOLONG)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(errnoText())", connectErrno: errno) }
        guard address.connect(fd) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw Failure(description: "cannot connect to \(path): \(errnoText(code))", connectErrno: code)
        }
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return LocalSMTPClient(fd: fd)
    }

    func close() { _ = Glibc.close(fd) }

    var descriptor: CInt { fd }

    /// One reply, multi-line replies joined; at most 100 lines of 4,096 bytes.
    mutating func reply() throws(Failure) -> Reply {
        var lines: [String] = []
        while lines.count < 100 {
            let line = try readLine()
            transcript?("<<< " + line)
            let bytes = Array(line.utf8)
            guard bytes.count >= 3, let code = Int(String(decoding: bytes[0..<3], as: UTF8.self)) else {
                throw Failure(description: "malformed reply: \(LogEscape.escape(line))")
            }
            lines.append(bytes.count > 4 ? String(decoding: bytes[4...], as: UTF8.self) : "")
            if bytes.count == 3 || bytes[3] == UInt8(ascii: " ") { return Reply(code: code, text: lines.joined(separator: " / ")) }
        }
        throw Failure(description: "reply of more than 100 lines")
    }

    private mutating func readLine() throws(Failure) -> String {
        while true {
            if let lf = buffer.firstIndex(of: 0x0A) {
                var line = buffer[..<lf]
                if line.last == 0x0D { line = line.dropLast() }
                let text = String(decoding: line, as: UTF8.self)
                buffer.removeSubrange(...lf)
                return text
            }
            guard buffer.count < 4096 else { throw Failure(description: "reply line longer than 4096 bytes") }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &chunk, chunk.count)
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                throw Failure(description: n == 0 ? "the daemon closed the connection" : "read: \(Self.errnoText())")
            }
            buffer += chunk[..<n]
        }
    }

    func send(_ command: String) throws(Failure) {
        transcript?(">>> " + command)
        try write(Array((command + "\r\n").utf8))
    }

    /// Sends with MSG_NOSIGNAL: the daemon may close first, and a write must fail, not kill us.
    func write(_ bytes: [UInt8]) throws(Failure) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw Failure(description: "write: \(Self.errnoText())") }
            offset += n
        }
    }

    static func errnoText(_ code: CInt = errno) -> String { String(cString: strerror(code)).lowercased() }
}

// MARK: - One transaction

/// The envelope and message of one local submission.
struct LocalSubmissionMessage {
    var sender: String
    var recipients: [String]
    var notify: String?
    var ret: String?
    var envid: String?
    /// The message; lines end in LF or CRLF.
    var content: [UInt8]
}

/// How one submission ended.
enum SubmissionOutcome {
    /// `250` after the message: queued. `refused` lists recipients the daemon refused.
    case queued(reply: String, refused: [(String, LocalSMTPClient.Reply)])
    /// Refused or failed at `stage` (greeting, EHLO, MAIL, RCPT, DATA, end of data).
    case failed(stage: String, LocalSMTPClient.Reply)
}

extension LocalSMTPClient {
    /// Runs one SMTP transaction for `message` and says goodbye.
    mutating func submit(_ message: LocalSubmissionMessage) throws(Failure) -> SubmissionOutcome {
        let greeting = try reply()
        guard greeting.code == 220 else { return .failed(stage: "greeting", greeting) }
        try send("EHLO localhost")
        let ehlo = try reply()
        guard ehlo.code == 250 else { return .failed(stage: "EHLO", ehlo) }
        var mail = "MAIL FROM:<\(message.sender)>"
        if message.content.contains(where: { $0 >= 0x80 }) { mail += " BODY=8BITMIME" }
        let addresses = [message.sender] + message.recipients
        if addresses.contains(where: { $0.utf8.contains(where: { $0 >= 0x80 }) }) { mail += " SMTPUTF8" }
        if let ret = message.ret { mail += " RET=\(ret.uppercased())" }
        if let envid = message.envid { mail += " ENVID=\(Self.xtext(envid))" }
        try send(mail)
        let mailReply = try reply()
        guard mailReply.code == 250 else { return .failed(stage: "MAIL", mailReply) }
        var refused: [(String, Reply)] = []
        for recipient in message.recipients {
            try send("RCPT TO:<\(recipient)>" + (message.notify.map { " NOTIFY=\($0.uppercased())" } ?? ""))
            let r = try reply()
            if r.code != 250 && r.code != 251 { refused.append((recipient, r)) }
        }
        if refused.count == message.recipients.count, let first = refused.first {
            try? send("QUIT")
            return .failed(stage: "RCPT", first.1)
        }
        try send("DATA")
        let data = try reply()
        guard data.code == 354 else { return .failed(stage: "DATA", data) }
        try write(Self.dotStuffed(message.content))
        let end = try reply()
        try? send("QUIT")
        guard end.code == 250 else { return .failed(stage: "end of data", end) }
        return .queued(reply: end.text, refused: refused)
    }

    /// The message as DATA sends it: each line (split at LF) ends in CRLF, a leading dot is
    /// doubled, and the final `.` line follows. - SeeAlso: RFC 5321 §4.5.2
    static func dotStuffed(_ content: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(content.count + content.count / 32 + 8)
        var start = 0
        while start < content.count {
            let end = content[start...].firstIndex(of: 0x0A) ?? content.count
            var line = content[start..<end]
            if line.last == 0x0D { line = line.dropLast() }
            if line.first == UInt8(ascii: ".") { out.append(UInt8(ascii: ".")) }
            out += line
            out += [0x0D, 0x0A]
            start = end + 1
        }
        out += Array(".\r\n".utf8)
        return out
    }

    /// RFC 3461 §4 xtext: `+`, `=`, controls and non-ASCII as `+HH`.
    static func xtext(_ text: String) -> String {
        var out = ""
        for b in text.utf8 {
            if b < 0x21 || b > 0x7E || b == UInt8(ascii: "+") || b == UInt8(ascii: "=") {
                let hex = String(b, radix: 16, uppercase: true)
                out += "+" + (hex.count == 1 ? "0" + hex : hex)
            } else {
                out.append(Character(Unicode.Scalar(b)))
            }
        }
        return out
    }
}
