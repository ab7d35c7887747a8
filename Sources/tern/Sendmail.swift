import ArgumentParser
import Ingress
import SMTPProtocol
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `tern sendmail` (and `tern` called as `sendmail`, `mailq` or `newaliases`): the command line
/// that `mail`, cron, PHP's `mail()` and logwatch call. Listed here for `tern --help`; `Main`
/// runs `SendmailCommand` before the argument parser, whose flag syntax is not sendmail's.
struct Sendmail: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Submit a message from standard input, as /usr/sbin/sendmail (Postfix-compatible options).",
        discussion: SendmailCommand.usage)

    @Argument(parsing: .captureForPassthrough) var arguments: [String] = []

    func run() async throws {
        throw ExitCode(await SendmailCommand.run(arguments, as: "sendmail"))
    }
}

enum SendmailCommand {
    static let usage = """
        usage: tern sendmail [options] [recipient ...]
          -t            recipients from To:, Cc: and Bcc: too (Bcc: is removed)
          -f, -r ADDR   envelope sender (default: your login name @ sendmail.origin)
          -F NAME       your full name, for a From: header the message lacks
          -i, -oi       a line with a single dot does not end the message
          -N DSN        never, or any of success,failure,delay;  -R full|hdrs;  -V ENVID
          -bm           read a message from standard input (the default)
          -bs           speak SMTP on standard input and output
          -bp           list the queue (as mailq);  -q  attempt delivery of the queue now
          -C FILE       Tern's configuration file;  -v  show the dialogue with the daemon
        Ignored, as Postfix's sendmail ignores them: -B -G -I -L -O -U -X -c -e -h -m -n -o… -p -x.
        The message goes to the running daemon over <spool>/public/sendmail, or to <spool>/maildrop
        when none runs (the daemon picks it up when it starts). Exit codes are sysexits(3): 0 sent,
        64 usage, 65 bad message, 67 recipient refused, 69 refused, 73/77 cannot write the maildrop,
        75 try again later, 78 bad configuration.
        """

    // sysexits(3)
    static let EX_USAGE: Int32 = 64, EX_DATAERR: Int32 = 65, EX_NOUSER: Int32 = 67, EX_UNAVAILABLE: Int32 = 69
    static let EX_SOFTWARE: Int32 = 70, EX_CANTCREAT: Int32 = 73, EX_TEMPFAIL: Int32 = 75, EX_NOPERM: Int32 = 77
    static let EX_CONFIG: Int32 = 78

    static func fail(_ code: Int32, _ text: String) -> Int32 {
        printError("sendmail: \(text)")
        return code
    }

    /// Runs the command; returns its exit status. `name` is what it was called as.
    static func run(_ arguments: [String], as name: String) async -> Int32 {
        if arguments.contains("--help") || arguments.contains("-h") && arguments.count == 1 {
            print(usage)
            return 0
        }
        var line: SendmailCommandLine
        do {
            line = try SendmailCommandLine(arguments)
        } catch {
            return fail(EX_USAGE, "\(error)\n\(usage)")
        }
        if name == "mailq" { line.mode = .listQueue }
        if name == "newaliases" { line.mode = .initAliases }
        let path = line.config ?? ConfigOption.defaultPath()
        let config: TernConfig
        do {
            config = try ConfigLoader.load(path: path, plugins: filterPlugins)
        } catch {
            return fail(EX_CONFIG, "\(error)")
        }
        switch line.mode {
        case .initAliases:
            return 0  // no local alias table: what newaliases would rebuild does not exist
        case .listQueue:
            return await runCommand(["queue", "list", "--config", path])
        case .flushQueue:
            return await runCommand(["queue", "flush", "--config", path])
        case .smtp:
            return smtpOnStandardIO(config)
        case .deliver:
            return deliver(line, config: config)
        }
    }

    /// Another `tern` command, as `mailq` and `sendmail -q` mean them.
    static func runCommand(_ arguments: [String]) async -> Int32 {
        do {
            var command = try Tern.parseAsRoot(arguments)
            if var async = command as? any AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
            return 0
        } catch {
            let code = Tern.exitCode(for: error)
            if code != .success { printError(Tern.fullMessage(for: error)) }
            return code.rawValue
        }
    }

    // MARK: - -bm

    static func deliver(_ line: SendmailCommandLine, config: TernConfig) -> Int32 {
        let origin = config.sendmail.origin ?? config.hostname
        let login = loginName()
        var sender = line.sender ?? login
        if sender.hasPrefix("<"), sender.hasSuffix(">") { sender = String(sender.dropFirst().dropLast()) }
        if !sender.isEmpty, !sender.contains("@") { sender += "@" + origin }
        // The message, read up to the size limit (and a little over, to tell it was over).
        let limit = config.limits.maxMessageSize.bytes
        guard let input = readStandardInput(limit: limit + 1) else {
            return fail(EX_DATAERR, "message too big: the limit (limits.max_message_size) is \(limit) bytes")
        }
        let fullName = line.fullName ?? environmentName() ?? gecosName()
        let message = LocalMessage(
            input: input, ignoreDots: line.ignoreDots, extractRecipients: line.extractRecipients,
            fromLine: fullName.flatMap { $0.isEmpty || sender.isEmpty ? nil : LocalMessage.fromLine(fullName: $0, address: sender) })
        var recipients: [String] = []
        for r in line.recipients + message.headerRecipients {
            let qualified = r.contains("@") ? r : r + "@" + origin
            if !recipients.contains(qualified) { recipients.append(qualified) }
        }
        guard !recipients.isEmpty else {
            return fail(EX_USAGE, line.extractRecipients ? "no recipients in the message's To:, Cc: or Bcc:" : "no recipients specified")
        }
        for r in recipients + (sender.isEmpty ? [] : [sender]) {
            guard r.utf8.allSatisfy({ $0 > 0x20 && $0 != 0x7F && $0 != UInt8(ascii: "<") && $0 != UInt8(ascii: ">") }) else {
                return fail(EX_NOUSER, "<\(LogEscape.escape(r))>: bad address syntax")
            }
        }
        let submission = LocalSubmissionMessage(
            sender: sender, recipients: recipients, notify: line.notify, ret: line.ret, envid: line.envid, content: message.content)
        let socketPath = LocalSubmission.socketPath(spool: config.spool)
        do {
            var client = try LocalSMTPClient.connect(path: socketPath)
            defer { client.close() }
            if line.verbose { client.transcript = { printError($0) } }
            switch try client.submit(submission) {
            case .queued(let reply, let refused):
                if line.verbose { printError("sendmail: queued: \(reply)") }
                for (recipient, r) in refused { printError("sendmail: <\(recipient)>: \(r.line)") }
                return refused.isEmpty ? 0 : EX_NOUSER
            case .failed(let stage, let reply):
                if stage == "greeting", reply.code == 421 { break }  // shutting down: the maildrop takes it
                printError("sendmail: refused at \(stage): \(reply.line)")
                if reply.code < 500 { return EX_TEMPFAIL }
                switch stage {
                case "RCPT": return EX_NOUSER
                case "end of data": return reply.code == 552 || reply.code == 554 ? EX_DATAERR : EX_UNAVAILABLE
                default: return EX_UNAVAILABLE
                }
            }
        } catch let failure where failure.connectErrno != nil {
            // No daemon (or none we may reach): the maildrop, as postdrop does.
            if line.verbose { printError("sendmail: \(failure); writing to the maildrop") }
        } catch {
            return fail(EX_TEMPFAIL, "\(error)")
        }
        return writeMaildrop(
            MaildropFile(
                sender: sender, recipients: recipients, notify: line.notify, ret: line.ret, envid: line.envid,
                content: message.content),
            config: config)
    }

    /// Writes the message into the maildrop: a hidden file first, synced, then renamed, so the
    /// pickup never sees half a message.
    static func writeMaildrop(_ file: MaildropFile, config: TernConfig) -> Int32 {
        let dir = LocalSubmission.maildropPath(spool: config.spool)
        var st = stat()
        if stat(dir, &st) != 0, geteuid() == 0 {
            // Root may set it up before the daemon ever ran.
            let owner = config.user.flatMap { getpwnam($0) }.map { (uid: $0.pointee.pw_uid, gid: $0.pointee.pw_gid) }
            let group = config.sendmail.group.flatMap { getgrnam($0) }.map { $0.pointee.gr_gid }
            var prefix = config.spool.hasPrefix("/") ? "" : "."
            for part in config.spool.split(separator: "/") {
                prefix += "/" + part
                _ = mkdir(prefix, 0o755)
            }
            try? LocalSubmission.prepare(spool: config.spool, owner: owner, group: group)
        }
        let random = UInt64.random(in: 0...UInt64.max)
        let name = "\(time(nil)).\(getpid()).\(String(random, radix: 36))"
        let temporary = dir + "/." + name
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let code = errno
            let group = config.sendmail.group.map { "; members of group \($0) may submit" } ?? " (set sendmail.group to let a group submit)"
            switch code {
            case EACCES, EPERM:
                return fail(EX_NOPERM, "cannot write to the maildrop \(dir): permission denied, and no daemon is running\(group)")
            default:
                let relative = dir.hasPrefix("/") ? "" : " (spool: is relative to the current directory)"
                return fail(EX_CANTCREAT, "cannot write to the maildrop \(dir)\(relative): \(LocalSMTPClient.errnoText(code))")
            }
        }
        let bytes = file.encoded
        var offset = 0
        var ok = true
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                ok = false
                break
            }
            offset += n
        }
        if ok, fsync(fd) != 0 { ok = false }
        let code = errno
        Glibc.close(fd)
        guard ok, rename(temporary, dir + "/" + name) == 0 else {
            unlink(temporary)
            return fail(EX_TEMPFAIL, "cannot write to the maildrop \(dir): \(LocalSMTPClient.errnoText(code))")
        }
        let d = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if d >= 0 {
            fsync(d)
            Glibc.close(d)
        }
        return 0
    }

    // MARK: - -bs

    /// SMTP on standard input and output, carried to the daemon's socket byte for byte.
    static func smtpOnStandardIO(_ config: TernConfig) -> Int32 {
        let client: LocalSMTPClient
        do {
            client = try LocalSMTPClient.connect(path: LocalSubmission.socketPath(spool: config.spool))
        } catch {
            let reply = "421 4.3.2 \(config.hostname) Tern is not running; try again later\r\n"
            _ = reply.withCString { Glibc.write(1, $0, strlen($0)) }
            return EX_TEMPFAIL
        }
        defer { client.close() }
        let socketFD = client.descriptor
        var fds = [pollfd(fd: 0, events: Int16(POLLIN), revents: 0), pollfd(fd: socketFD, events: Int16(POLLIN), revents: 0)]
        var inputOpen = true
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            fds[0].fd = inputOpen ? 0 : -1
            // After the input ends, the daemon still answers what was sent; once it has been
            // quiet for a second, our half of the connection closes.
            let ready = poll(&fds, 2, inputOpen ? -1 : 1000)
            guard ready >= 0 || errno == EINTR else { return EX_SOFTWARE }
            if ready == 0 {
                shutdown(socketFD, Int32(SHUT_WR))
                continue
            }
            if fds[1].revents != 0 {
                let n = read(socketFD, &chunk, chunk.count)
                if n <= 0 { return 0 }  // the daemon closed (after QUIT, or a timeout)
                var offset = 0
                while offset < n {
                    let w = chunk[offset..<n].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
                    if w <= 0 { return EX_SOFTWARE }
                    offset += w
                }
            }
            if inputOpen, fds[0].revents != 0 {
                let n = read(0, &chunk, chunk.count)
                if n <= 0 {
                    inputOpen = false
                    continue
                }
                do { try client.write(Array(chunk[..<n])) } catch { return 0 }
            }
        }
    }

    // MARK: - Who is sending

    static func loginName() -> String {
        if let pw = getpwuid(getuid()) { return String(cString: pw.pointee.pw_name) }
        return "uid\(getuid())"
    }

    /// `NAME`, as Postfix's sendmail reads it for the full name.
    static func environmentName() -> String? {
        getenv("NAME").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    }

    /// The first field of the password entry's GECOS (`Full Name,room,phone`).
    static func gecosName() -> String? {
        guard let pw = getpwuid(getuid()), let gecos = pw.pointee.pw_gecos else { return nil }
        let name = String(cString: gecos).split(separator: ",", omittingEmptySubsequences: false).first.map(String.init) ?? ""
        return name.isEmpty ? nil : name
    }

    /// Standard input, or nil when it is longer than `limit` bytes.
    static func readStandardInput(limit: Int) -> [UInt8]? {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(0, &chunk, chunk.count)
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return data }
            data += chunk[..<n]
            if data.count > limit { return nil }
        }
    }
}
