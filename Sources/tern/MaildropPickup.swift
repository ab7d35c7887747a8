import Ingress
import Logging
import NIOPosix
import SMTPProtocol
import ServiceLifecycle
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Opens the local submission socket and its directories for `tern serve`.
enum LocalSubmissionSetup {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func open(_ config: TernConfig, owner: (uid_t, gid_t)?) throws -> CInt {
        var group: gid_t?
        if let name = config.sendmail.group {
            guard let gr = getgrnam(name) else { throw Failure(description: "sendmail.group: no such group '\(name)'") }
            group = gr.pointee.gr_gid
        }
        let ids = owner.map { (uid: $0.0, gid: $0.1) }
        try LocalSubmission.prepare(spool: config.spool, owner: ids, group: group)
        return try LocalSubmission.listeningSocket(spool: config.spool, owner: ids)
    }
}

/// Picks up what `tern sendmail` left in the maildrop while no daemon ran: when the daemon
/// starts, and every few seconds after. Each file is replayed through the daemon's own local
/// socket, so it meets every check and filter an SMTP client's message meets; it is removed
/// only once the daemon answered `250` (queued, on stable storage), kept for the next round on
/// a temporary failure, and moved to `maildrop-rejected/` when refused or unreadable.
/// - SeeAlso: Postfix `pickup(8)`
final class MaildropPickup: Service, Sendable {
    let spool: String
    let maxSize: Int
    let interval: Duration
    let threadPool: NIOThreadPool
    let logger: Logger

    init(spool: String, maxSize: Int, interval: Duration = .seconds(5), threadPool: NIOThreadPool, logger: Logger) {
        self.spool = spool
        self.maxSize = maxSize
        self.interval = interval
        self.threadPool = threadPool
        self.logger = logger
    }

    func run() async throws {
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                // Blocking file and socket I/O: on the file threads, never the cooperative pool.
                _ = try? await self.threadPool.runIfActive { self.scan() }
                try await Task.sleep(for: self.interval)
            }
        }
    }

    /// One pass over the maildrop.
    func scan() {
        let dir = LocalSubmission.maildropPath(spool: spool)
        guard let handle = opendir(dir) else { return }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != ".", name != ".." { names.append(name) }
        }
        closedir(handle)
        for name in names.sorted() {
            if name.hasPrefix(".") {
                removeIfStale(dir + "/" + name)
            } else {
                pickUp(name, in: dir)
            }
        }
    }

    /// A hidden file is one `tern sendmail` is still writing; one a day old never will be.
    private func removeIfStale(_ path: String) {
        var st = stat()
        if lstat(path, &st) == 0, time(nil) - st.st_mtim.tv_sec > 86400 { unlink(path) }
    }

    private func pickUp(_ name: String, in dir: String) {
        let path = dir + "/" + name
        let shown = LogEscape.escape(name)
        // Group members write here: no links to files they could not read themselves, nothing
        // but regular files, nothing bigger than a message may be.
        let fd = Glibc.open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return reject(name, in: dir, "cannot open: \(LocalSMTPClient.errnoText())") }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_nlink == 1 else {
            Glibc.close(fd)
            return reject(name, in: dir, "not a regular file with one link")
        }
        guard Int(st.st_size) <= maxSize + (1 << 20) else {
            Glibc.close(fd)
            return reject(name, in: dir, "\(st.st_size) bytes: larger than limits.max_message_size")
        }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            offset += n
        }
        Glibc.close(fd)
        bytes.removeSubrange(offset...)
        let file: MaildropFile
        do {
            file = try MaildropFile(decoding: bytes)
        } catch {
            return reject(name, in: dir, "\(error)")
        }
        let from = LogEscape.escape(file.sender)
        do {
            var client = try LocalSMTPClient.connect(path: LocalSubmission.socketPath(spool: spool))
            defer { client.close() }
            let message = LocalSubmissionMessage(
                sender: file.sender, recipients: file.recipients, notify: file.notify, ret: file.ret, envid: file.envid,
                content: file.content)
            switch try client.submit(message) {
            case .queued(let reply, let refused):
                unlink(path)
                for (recipient, r) in refused {
                    logger.warning("pickup: \(shown): uid=\(st.st_uid) from=<\(from)>: recipient <\(LogEscape.escape(recipient))> refused: \(r.line)")
                }
                logger.info("pickup: \(shown): uid=\(st.st_uid) from=<\(from)>: \(LogEscape.escape(reply))")
            case .failed(let stage, let reply) where reply.code >= 500:
                reject(name, in: dir, "refused at \(stage): \(reply.line)")
            case .failed(let stage, let reply):
                logger.warning("pickup: \(shown): uid=\(st.st_uid) from=<\(from)>: deferred at \(stage): \(LogEscape.escape(reply.line))")
            }
        } catch {
            logger.warning("pickup: \(shown): deferred: \(error)")
        }
    }

    private func reject(_ name: String, in dir: String, _ reason: String) {
        let target = LocalSubmission.rejectedPath(spool: spool) + "/" + name
        let moved = rename(dir + "/" + name, target) == 0
        logger.error(
            "pickup: \(LogEscape.escape(name)): \(LogEscape.escape(reason)); \(moved ? "moved to \(target)" : "left in place: \(LocalSMTPClient.errnoText())")")
    }
}
