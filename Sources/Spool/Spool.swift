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

/// The durable queue. The states, the files in each, and what a commit and a removal do are
/// in `README.md` beside this file.
///
/// `queue/` holds slots: files whose names never change once made. A message is written
/// into a free slot, its fixed-length trailer (naming its queue id, with a checksum of what
/// comes before it) last, and the slot is `fdatasync`'d; only then does the client hear 250.
/// No name is created or renamed for a message, so no directory sync waits in front of the
/// 250: only a slot made new (when none is free) costs one, grouped with others. A finished
/// message's slot is overwritten with zeros (a large one is truncated) and taken again, at
/// the same size, so the next commit into it writes data blocks only. A slot without a
/// valid trailer holds no message; recovery frees it.
public final class Spool: Sendable {
    public let root: String
    let queue: String
    let pool: NIOThreadPool
    let ids = QueueIDGenerator()
    let queueSync: DirectorySyncer
    let logger: Logger
    let removals = NIOLockedValueBox(Removals())
    let slots = NIOLockedValueBox(Slots())
    /// Small messages just committed, for their first attempt.
    let recent = NIOLockedValueBox(RecentContent(budget: 1 << 20))
    /// More free slots than this are deleted, not kept.
    static let freeLimit = 4096

    struct Removals {
        var pending: [(QueueID, UInt32, Bool)] = []
        var running = false
    }

    /// Slots by number (`s000000042` is 42). Which slot holds which message is the
    /// scheduler's to know (4 bytes in its entry for the message), not a second index here.
    struct Slots {
        /// Free slots by size: [0] empty, [1] up to 4 KB, [2] up to 8 KB, … [5] up to 64 KB.
        var free: [[FreeSlot]] = Array(repeating: [], count: 6)
        var freeCount = 0
        /// The number of the next slot to make.
        var next: UInt32 = 0

        static func bucket(_ size: Int) -> Int {
            var bucket = 0
            var limit = 0
            while size > limit, bucket < 5 {
                bucket += 1
                limit = limit == 0 ? 4096 : limit * 2
            }
            return bucket
        }

        mutating func put(_ slot: FreeSlot) {
            free[Self.bucket(slot.size)].append(slot)
            freeCount += 1
        }

        /// A free slot for a message of `needed` bytes (nil: one that streams in, so at least
        /// `Spool.writeChunk`): one of its size when there is one, so the commit rewrites the
        /// slot in place; else a smaller one (it grows), an empty one, a larger one.
        mutating func take(needed: Int?) -> FreeSlot? {
            // Called under the lock for every message: no allocation here.
            let fit = needed.map { $0 <= SpoolFiles.inPlaceLimit ? Self.bucket($0) : 0 } ?? 0
            for step in 0..<free.count {
                // fit, fit-1, …, 1, then 0, then fit+1, …, 5 (a large message: 0, 5, 4, …, 1).
                let bucket = fit == 0 ? (step == 0 ? 0 : free.count - step) : (step < fit ? fit - step : (step == fit ? 0 : step))
                if let slot = free[bucket].popLast() {
                    freeCount -= 1
                    return slot
                }
            }
            return nil
        }

        /// Keeps a free slot, unless enough are kept already.
        mutating func keep(_ slot: FreeSlot) -> Bool {
            guard freeCount < Spool.freeLimit else { return false }
            put(slot)
            return true
        }
    }

    struct FreeSlot {
        var number: UInt32
        /// Its size on disk: a slot rewritten in place keeps it.
        var size: Int
    }

    /// Data is written to disk in pieces of this size while a message streams in.
    public static let writeChunk = 64 * 1024
    /// A message up to this size is held in memory and written at its commit, in one trip
    /// to the spool's threads, while `holdBudget` has room; past it, or without room, it
    /// goes to the disk in `writeChunk` pieces as it arrives.
    public static let holdLimit = 256 * 1024
    /// What every writer holding a message in memory beyond `writeChunk` may hold together.
    static let holdBudget = 16 << 20
    /// Bytes reserved from `holdBudget` now.
    let held = NIOLockedValueBox(0)

    /// Takes a writer's share of the hold budget (`holdLimit - writeChunk`), if there is room.
    func reserveHold() -> Bool {
        held.withLockedValue { held in
            guard held + Self.holdLimit - Self.writeChunk <= Self.holdBudget else { return false }
            held += Self.holdLimit - Self.writeChunk
            return true
        }
    }

    func releaseHold() {
        held.withLockedValue { $0 -= Self.holdLimit - Self.writeChunk }
    }

    private init(root: String, pool: NIOThreadPool, queueFD: CInt, logger: Logger) {
        self.root = root
        self.queue = root + "/queue"
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
            for dir in [root, root + "/queue", root + "/corrupt", root + "/meta"] {
                try SpoolFiles.makeDirectory(dir)
            }
            let fd = Glibc.open(root + "/queue", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw SpoolError("open", root + "/queue", errno: errno) }
            let spool = Spool(root: root, pool: threadPool, queueFD: fd, logger: logger)
            let report = try spool.recoverSync()
            return (spool, report)
        }
    }

    /// `s` and (at least) nine digits: never a queue id, so the files of the layout before
    /// slots, named by their queue id, are told apart (recovery renames them into slots).
    static func slotName(_ number: UInt32) -> String {
        let digits = String(number)
        return "s" + String(repeating: "0", count: max(0, 9 - digits.count)) + digits
    }

    static func slotNumber(_ name: String) -> UInt32? {
        guard name.utf8.count >= 10, name.hasPrefix("s"), name.utf8.dropFirst().allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
            return nil
        }
        return UInt32(name.dropFirst())
    }

    static func isSlot(_ name: String) -> Bool { slotNumber(name) != nil || QueueID(name) != nil }

    private func recoverSync() throws -> RecoveryReport {
        var report = RecoveryReport(queued: 0, removedIncomplete: 0, corrupt: 0)
        var held = Set<String>()
        let names = try SpoolFiles.list(queue)
        let highest = names.compactMap(Self.slotNumber).max()
        slots.withLockedValue { $0.next = highest.map { $0 &+ 1 } ?? 0 }
        var renamed = false
        for name in names {
            let path = queue + "/" + name
            let number = Self.slotNumber(name)
            switch Self.isSlot(name) ? SpoolFiles.check(path) : .corrupt(checksum: false) {
            case .complete(let id):
                report.queued += 1
                held.insert(id.rawValue)
                if number == nil {
                    // A file of the layout before slots: it becomes one.
                    // (The lock keeps everyone else out of queue/, so a free name stays free.)
                    var target: String
                    repeat { target = self.path(of: newSlotNumber()) } while access(target, F_OK) == 0
                    guard rename(path, target) == 0 else { throw SpoolError("rename", path, errno: errno) }
                    renamed = true
                }
            case .free(let size):
                let kept = number.map { number in slots.withLockedValue { $0.keep(FreeSlot(number: number, size: size)) } }
                if kept != true { unlink(path) }
            case .incomplete:
                // No trailer: the commit never finished, so the client never heard 250.
                if let number { release(number) } else { unlink(path) }
                report.removedIncomplete += 1
                logger.notice("\(name): removed half-written message")
            case .corrupt(let checksum):
                rename(path, root + "/corrupt/" + name)
                report.corrupt += 1
                if checksum {
                    logger.error("\(name): its content does not match its checksum (a commit cut short by a power loss, or damage), moved to corrupt/")
                } else {
                    logger.error("\(name): not a valid spool file, moved to corrupt/")
                }
            }
        }
        // Notes of messages that are gone, and replacements a crash interrupted.
        for name in try SpoolFiles.list(metaDirectory) where !held.contains(name) {
            unlink(metaDirectory + "/" + name)
        }
        // The layout before slots kept finished files in free/; they are empty.
        if let names = try? SpoolFiles.list(root + "/free") {
            for name in names { unlink(root + "/free/" + name) }
            rmdir(root + "/free")
        }
        if report.corrupt > 0 || renamed { try SpoolFiles.syncDirectory(queue) }
        if report.corrupt > 0 { try SpoolFiles.syncDirectory(root + "/corrupt") }
        return report
    }

    /// A slot for a new message of `needed` bytes (nil: one that streams in): a free one
    /// when there is one, else a new one (`made`: its name must be made durable by a
    /// directory sync before a message in it is).
    func openSlot(needed: Int?) throws -> SpoolWriter.OpenSlot {
        while let free = slots.withLockedValue({ $0.take(needed: needed) }) {
            let fd = Glibc.open(path(of: free.number), O_WRONLY | O_CLOEXEC)
            if fd >= 0 { return SpoolWriter.OpenSlot(fd: fd, number: free.number, size: free.size, made: false) }
            // Gone from under us (an operator's hand): the next one.
        }
        while true {
            let number = newSlotNumber()
            do {
                return SpoolWriter.OpenSlot(fd: try SpoolFiles.create(path(of: number)), number: number, size: 0, made: true)
            } catch let error as SpoolError where error.errno == EEXIST {
                continue
            }
        }
    }

    /// Frees a slot and keeps it for the next message (or deletes it when enough are kept).
    /// A slot of up to 64 KB is overwritten with zeros and keeps its size and its blocks, so
    /// the next commit into it writes data only: no block is allocated, no inode changes,
    /// nothing is discarded. A larger one (or one of the format before checksums) is
    /// truncated. Either way delivered, bounced and deleted mail leaves nothing readable
    /// behind. Not synced: if a crash undoes it, the message is there again and is delivered
    /// again (a duplicate, never a loss).
    func release(_ number: UInt32) {
        let path = self.path(of: number)
        let keep = slots.withLockedValue { $0.freeCount < Self.freeLimit }
        let fd = keep ? Glibc.open(path, O_RDWR | O_CLOEXEC) : -1
        guard fd >= 0 else {
            unlink(path)
            return
        }
        defer { close(fd) }
        if let size = SpoolFiles.free(fd, path: path) {
            slots.withLockedValue { $0.put(FreeSlot(number: number, size: size)) }
        } else {
            unlink(path)
        }
    }

    func path(of slot: UInt32) -> String { queue + "/" + Self.slotName(slot) }

    /// A number no slot had when the spool was opened, nor since.
    private func newSlotNumber() -> UInt32 {
        slots.withLockedValue { slots in
            defer { slots.next &+= 1 }
            return slots.next
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
    /// without a valid trailer (still arriving, or free) are skipped, and so is one whose
    /// checksum does not match (a torn commit that no recovery has moved aside yet).
    public static func list(root: String) throws -> [QueuedMessage] {
        // A spool that was never opened holds no mail.
        if access(root + "/queue", F_OK) != 0, errno == ENOENT { return [] }
        return try SpoolFiles.list(root + "/queue").compactMap { name -> QueuedMessage? in
            guard isSlot(name), let record = try? SpoolFiles.readRecord(root + "/queue/" + name, verify: true) else { return nil }
            return QueuedMessage(id: record.id, size: record.contentSize, envelope: record.envelope)
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

/// Writes one message into a slot in `queue/`; the commit writes the envelope and the
/// trailer, and makes the message durable.
///
/// Owned by one session at a time; its methods are called one after another.
public final class SpoolWriter: @unchecked Sendable {
    public let id: QueueID
    private let spool: Spool
    /// The slot, once the first chunk or the commit took one.
    private var file: OpenSlot?
    private var pending: [UInt8] = []
    public private(set) var size = 0
    /// The slot the message is in, once committed.
    public private(set) var slot: UInt32 = 0
    /// This writer holds a share of the spool's hold budget.
    private var holding = false
    /// Fed every byte that has gone to the disk.
    private var checksum = ContentChecksum()

    struct OpenSlot {
        var fd: CInt
        var number: UInt32
        /// Its size before this message.
        var size: Int
        /// Made for this message: its name is not durable until the directory is synced.
        var made: Bool
    }

    init(spool: Spool, id: QueueID) {
        self.spool = spool
        self.id = id
        // No capacity reserved: most messages are a few KB, and freeing a 64 KB block per
        // message reaches glibc's consolidation threshold (`malloc_consolidate` showed in
        // the profile).
    }

    deinit {
        if holding { spool.releaseHold() }
    }

    /// Adds message bytes. A message up to `Spool.holdLimit` stays in memory until its commit
    /// while the spool's hold budget allows; otherwise the bytes reach the disk in chunks of
    /// `Spool.writeChunk`. A large piece goes to the disk as it is, not copied into the
    /// pending buffer first.
    public func append(_ bytes: [UInt8]) async throws {
        size += bytes.count
        let limit = pendingLimit(adding: bytes.count)
        if pending.isEmpty, bytes.count >= limit {
            try await write(bytes)
            return
        }
        pending.append(contentsOf: bytes)
        if pending.count >= limit { try await flush() }
    }

    /// How many bytes may wait in memory before they go to the disk.
    private func pendingLimit(adding count: Int) -> Int {
        if holding { return Spool.holdLimit }
        // Only a message that has not touched the disk yet, and only once it needs more
        // than a chunk.
        guard file == nil, pending.count + count >= Spool.writeChunk, size < Spool.holdLimit else { return Spool.writeChunk }
        holding = spool.reserveHold()
        return holding ? Spool.holdLimit : Spool.writeChunk
    }

    private func stopHolding() {
        guard holding else { return }
        holding = false
        spool.releaseHold()
    }

    private func flush() async throws {
        let data = pending
        pending.removeAll(keepingCapacity: !holding)
        try await write(data)
    }

    private func write(_ data: [UInt8]) async throws {
        // The message is on its way to the disk: the rest of it goes in chunks.
        stopHolding()
        checksum.update(data)
        let current = file
        let spool = self.spool
        file = nil
        file = try await spool.pool.runIfActive { () throws -> OpenSlot in
            let slot = try current ?? spool.openSlot(needed: nil)
            do {
                try SpoolFiles.writeAll(slot.fd, data, path: spool.path(of: slot.number))
            } catch {
                // A full disk mid-message: no descriptor and no partial file stay behind.
                close(slot.fd)
                spool.release(slot.number)
                throw error
            }
            return slot
        }
    }

    /// Writes the envelope, the states and the trailer and syncs the slot (and `queue/`, only
    /// when the slot was made for this message). When this returns the message survives a
    /// crash.
    public func commit(_ envelope: Envelope) async throws {
        defer { stopHolding() }
        let contentSize = size
        var sum = checksum
        sum.update(pending)
        let (records, trailer) = SpoolFiles.records(envelope, contentSize: contentSize, id: id, checksum: sum)
        pending.append(contentsOf: records)
        let data = pending
        pending = []
        let needed = contentSize + records.count + trailer.count
        let current = file
        file = nil
        let spool = self.spool
        let id = self.id
        slot = try await spool.pool.runIfActive {
            let slot = try current ?? spool.openSlot(needed: needed)
            let path = spool.path(of: slot.number)
            let end = SpoolFiles.slotEnd(needed: needed, previous: slot.size)
            do {
                defer { close(slot.fd) }
                try SpoolFiles.writeAll(slot.fd, data, path: path)
                // The trailer ends the slot; what lies between is zeros from the release.
                try SpoolFiles.pwriteAll(slot.fd, trailer, at: end - trailer.count, path: path)
                // Into a free slot of its size, this writes data blocks only; a slot that
                // grows gets new blocks and a new size in its inode, but never a new name.
                guard fdatasync(slot.fd) == 0 else { throw SpoolError("fsync", path, errno: errno) }
                if slot.made { try spool.queueSync.sync() }
            } catch {
                // Never leave a complete-looking file behind for a message the client was refused.
                unlink(path)
                throw error
            }
            // All of it is in `data` only when no chunk went to the disk before.
            if current == nil { spool.recent.withLockedValue { $0.insert(id, storage: data, size: contentSize) } }
            return slot.number
        }
    }

    /// Drops the message: nothing of it stays on disk.
    public func abort() async {
        pending = []
        stopHolding()
        guard let slot = file else { return }
        file = nil
        let spool = self.spool
        _ = try? await spool.pool.runIfActive {
            close(slot.fd)
            spool.release(slot.number)
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

    /// Directory syncs run so far.
    var count: Int {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return completed
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
