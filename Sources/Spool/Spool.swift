#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TernCore

/// The durable queue. The states, the files in each, and the one rename that moves a message
/// between them are in `README.md` beside this file.
///
/// A message is written to `queue/<id>`, its fixed-length trailer last; the file is fsync'd,
/// then `queue/` is fsync'd; only then does the client hear 250. A file without a valid
/// trailer is half-written and recovery removes it. Files of finished messages are kept in
/// `free/` and renamed back into `queue/` for new messages: creating a file on ext4 costs
/// up to half a millisecond of kernel time while recently deleted inodes are around (the
/// allocator skips each one), and a relay deletes a file for every message it delivers. Directory syncs are grouped: every
/// commit whose file existed before a sync began is covered by it, so a burst of sessions
/// costs one directory sync, not one each, while file syncs run in parallel on the pool.
public final class Spool: Sendable {
    public let root: String
    let queue: String
    let pool: NIOThreadPool
    let ids = QueueIDGenerator()
    let queueSync: DirectorySyncer
    let logger: Logger
    let removals = NIOLockedValueBox(Removals())
    let free: String
    /// Names in `free/`, ready to be renamed into `queue/` for a new message.
    let freeFiles = NIOLockedValueBox([String]())
    /// More finished files than this are deleted, not kept.
    static let freeLimit = 4096

    struct Removals {
        var pending: [(QueueID, Bool)] = []
        var running = false
    }

    /// Data is written to disk in pieces of this size while a message streams in.
    public static let writeChunk = 64 * 1024

    private init(root: String, pool: NIOThreadPool, queueFD: CInt, logger: Logger) {
        self.root = root
        self.queue = root + "/queue"
        self.free = root + "/free"
        self.pool = pool
        self.queueSync = DirectorySyncer(fd: queueFD, path: root + "/queue")
        self.logger = logger
    }

    public struct RecoveryReport: Sendable, Equatable {
        /// Complete messages found in the queue.
        public var queued: Int
        /// Half-written messages from an interrupted session or a crash, removed.
        public var removedIncomplete: Int
        /// Files in the queue that are not valid spool files, moved to `corrupt/`.
        public var corrupt: Int
    }

    /// Opens the spool, creating its directories, and recovers from whatever a crash left.
    public static func open(root: String, threadPool: NIOThreadPool, logger: Logger) async throws -> (Spool, RecoveryReport) {
        try await threadPool.runIfActive {
            for dir in [root, root + "/queue", root + "/corrupt", root + "/meta", root + "/free"] {
                try SpoolFiles.makeDirectory(dir)
            }
            let fd = Glibc.open(root + "/queue", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw SpoolError("open", root + "/queue", errno: errno) }
            let spool = Spool(root: root, pool: threadPool, queueFD: fd, logger: logger)
            let report = try spool.recoverSync()
            return (spool, report)
        }
    }

    private func recoverSync() throws -> RecoveryReport {
        var report = RecoveryReport(queued: 0, removedIncomplete: 0, corrupt: 0)
        let names = try SpoolFiles.list(queue)
        // Notes of messages that are gone, and replacements a crash interrupted.
        let kept = Set(names)
        for name in try SpoolFiles.list(metaDirectory) where !kept.contains(name) {
            unlink(metaDirectory + "/" + name)
        }
        // Finished files kept for reuse (before the loop below adds more).
        var pooled = 0
        for name in try SpoolFiles.list(free) {
            // Files parked before this fix, or by a crash between truncate and rename, may
            // still hold a message: none stays readable, none keeps its blocks.
            if pooled < Self.freeLimit, QueueID(name) != nil, truncate(free + "/" + name, 0) == 0 {
                freeFiles.withLockedValue { $0.append(name) }
                pooled += 1
            } else {
                unlink(free + "/" + name)
            }
        }
        for name in names {
            let path = queue + "/" + name
            switch QueueID(name) == nil ? .corrupt : SpoolFiles.check(path) {
            case .complete:
                report.queued += 1
            case .incomplete:
                // No trailer: the commit never finished, so the client never heard 250.
                recycle(path, name: name)
                report.removedIncomplete += 1
                logger.notice("\(name): removed half-written message")
            case .corrupt:
                rename(path, root + "/corrupt/" + name)
                report.corrupt += 1
                logger.error("\(name): not a valid spool file, moved to corrupt/")
            }
        }
        if report.removedIncomplete + report.corrupt > 0 { try SpoolFiles.syncDirectory(queue) }
        if report.corrupt > 0 { try SpoolFiles.syncDirectory(root + "/corrupt") }
        return report
    }

    /// A file for a new message at `path`: a finished one from `free/` when there is one
    /// (then `reused`: it may be longer than what is written now), else a new one.
    func createFile(_ path: String) throws -> (fd: CInt, reused: Bool) {
        while let name = freeFiles.withLockedValue({ $0.popLast() }) {
            guard rename(free + "/" + name, path) == 0 else { continue }
            let fd = Glibc.open(path, O_WRONLY | O_CLOEXEC)
            if fd >= 0 { return (fd, true) }
            unlink(path)
        }
        return (try SpoolFiles.create(path), false)
    }

    /// Takes a file out of `queue/`: into `free/` for reuse, or deleted when enough are kept.
    /// It is emptied first: delivered, bounced and deleted mail gives its blocks back at once
    /// and leaves nothing readable behind; reuse saves only the file's creation.
    func recycle(_ path: String, name: String) {
        let keep = freeFiles.withLockedValue { $0.count < Self.freeLimit }
        if keep, truncate(path, 0) == 0, rename(path, free + "/" + name) == 0 {
            freeFiles.withLockedValue { $0.append(name) }
        } else {
            unlink(path)
        }
    }

    /// Bytes free for Tern on the spool's file system (what an unprivileged user may use).
    public func freeBytes() -> Int {
        var st = statvfs()
        guard statvfs(root, &st) == 0 else { return Int.max }
        let (bytes, overflow) = Int(st.f_bavail).multipliedReportingOverflow(by: Int(st.f_frsize))
        return overflow ? Int.max : bytes
    }

    /// Starts a message. Nothing touches the disk until the first chunk or the commit.
    public func begin() -> SpoolWriter {
        SpoolWriter(spool: self, id: ids.next())
    }

    /// The messages in the queue, oldest first.
    public func list() throws -> [QueuedMessage] { try Self.list(root: root) }

    /// Reads the queue without opening the spool for writing (for `tern queue list`). Files
    /// without a valid trailer (still arriving) are skipped.
    public static func list(root: String) throws -> [QueuedMessage] {
        // A spool that was never opened holds no mail.
        if access(root + "/queue", F_OK) != 0, errno == ENOENT { return [] }
        return try SpoolFiles.list(root + "/queue").compactMap { name -> QueuedMessage? in
            guard let id = QueueID(name), let (envelope, size) = try? SpoolFiles.readEnvelope(root + "/queue/" + name) else {
                return nil
            }
            return QueuedMessage(id: id, size: size, envelope: envelope)
        }.sorted { $0.id < $1.id }
    }
}

/// A message in the queue, as `tern queue list` shows it.
public struct QueuedMessage: Sendable, Codable, Hashable {
    public var id: QueueID
    /// Size of the message content in bytes (with Tern's `Received:` header).
    public var size: Int
    public var envelope: Envelope
}

extension QueueID: Codable {
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let id = QueueID(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "bad queue id"))
        }
        self = id
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(rawValue)
    }
}

/// Writes one message into `queue/`; the commit writes the envelope and the trailer, and
/// makes file and name durable.
///
/// Owned by one session at a time; its methods are called one after another.
public final class SpoolWriter: @unchecked Sendable {
    public let id: QueueID
    private let spool: Spool
    private var fd: CInt = -1
    /// The file came from `free/` and may hold older, longer content past what we write.
    private var reused = false
    private var pending: [UInt8] = []
    public private(set) var size = 0

    init(spool: Spool, id: QueueID) {
        self.spool = spool
        self.id = id
        pending.reserveCapacity(Spool.writeChunk)
    }

    private var path: String { spool.queue + "/" + id.rawValue }

    /// Adds message bytes; they reach the disk in chunks of `Spool.writeChunk`. A large
    /// piece goes to the disk as it is, not copied into the pending buffer first.
    public func append(_ bytes: [UInt8]) async throws {
        size += bytes.count
        if pending.isEmpty, bytes.count >= Spool.writeChunk {
            try await write(bytes)
            return
        }
        pending.append(contentsOf: bytes)
        if pending.count >= Spool.writeChunk { try await flush() }
    }

    private func flush() async throws {
        let data = pending
        pending.removeAll(keepingCapacity: true)
        try await write(data)
    }

    private func write(_ data: [UInt8]) async throws {
        let path = self.path
        let current = fd
        let spool = self.spool
        let name = id.rawValue
        fd = -1
        let (f, reused) = try await spool.pool.runIfActive { () throws -> (CInt, Bool) in
            let (f, reused) = current >= 0 ? (current, false) : try spool.createFile(path)
            do {
                try SpoolFiles.writeAll(f, data, path: path)
            } catch {
                // A full disk mid-message: no descriptor and no partial file stay behind.
                close(f)
                spool.recycle(path, name: name)
                throw error
            }
            return (f, reused)
        }
        fd = f
        self.reused = self.reused || reused
    }

    /// Writes the envelope and the trailer, syncs the file, then the queue directory. When
    /// this returns the message survives a crash.
    public func commit(_ envelope: Envelope) async throws {
        let record = SpoolFiles.envelopeRecord(envelope, contentSize: size, id: id)
        pending.append(contentsOf: record)
        let data = pending
        pending = []
        let path = self.path
        let current = fd
        let length = size + record.count
        let wasReused = reused
        fd = -1
        let spool = self.spool
        let directory = spool.queueSync
        do {
            try await spool.pool.runIfActive {
                let (f, reused) = current >= 0 ? (current, wasReused) : try spool.createFile(path)
                defer { close(f) }
                try SpoolFiles.writeAll(f, data, path: path)
                // A recycled file may be longer: the trailer must be the last bytes.
                if reused, ftruncate(f, off_t(length)) != 0 { throw SpoolError("truncate", path, errno: errno) }
                guard fsync(f) == 0 else { throw SpoolError("fsync", path, errno: errno) }
                try directory.sync()
            }
        } catch {
            // Never leave a complete-looking file behind for a message the client was refused.
            _ = try? await spool.pool.runIfActive { unlink(path) }
            throw error
        }
    }

    /// Drops the message: nothing of it stays on disk.
    public func abort() async {
        pending = []
        guard fd >= 0 else { return }
        let f = fd
        fd = -1
        let path = self.path
        let spool = self.spool
        let name = id.rawValue
        _ = try? await spool.pool.runIfActive {
            close(f)
            spool.recycle(path, name: name)
        }
    }
}

/// Group commit for one directory, called from the spool's pool threads: a caller needs a
/// sync that *starts* after its file was created; callers that arrive while one runs wait
/// for the next, which one of them runs for all. Waiting threads sleep on a condition
/// variable, so a burst of commits costs one directory sync and no extra thread hops.
final class DirectorySyncer: @unchecked Sendable {
    private let fd: CInt
    private let path: String
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var started = 0
    private var completed = 0
    private var running = false
    private var lastError: Int32 = 0

    init(fd: CInt, path: String) {
        self.fd = fd
        self.path = path
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }

    deinit {
        pthread_cond_destroy(&condition)
        pthread_mutex_destroy(&mutex)
    }

    /// Blocks until a directory sync that began after this call has finished.
    func sync() throws {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        let target = started + 1
        while completed < target {
            if running {
                pthread_cond_wait(&condition, &mutex)
                continue
            }
            running = true
            started += 1
            let generation = started
            pthread_mutex_unlock(&mutex)
            let result = fsync(fd) == 0 ? 0 : errno
            pthread_mutex_lock(&mutex)
            lastError = result
            completed = generation
            running = false
            pthread_cond_broadcast(&condition)
        }
        if lastError != 0 { throw SpoolError("fsync", path, errno: lastError) }
    }
}
