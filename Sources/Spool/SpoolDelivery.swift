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
import TernCore

/// A recipient's state byte in the spool file.
public enum RecipientState: UInt8, Sendable, Codable {
    case pending = 0x2D  // "-"
    case delivered = 0x44  // "D"
    case bounced = 0x42  // "B"
    /// Removed by the operator (`tern queue delete`) before it was delivered.
    case deleted = 0x58  // "X"

    public var isFinal: Bool { self != .pending }
}

/// Delivery's notes on a message between attempts: kept in `meta/<id>`, replaced whole by a
/// rename. Losing it (a crash before the rename) costs an early retry, never a message: the
/// final states live in the queue file itself.
public struct DeliveryMeta: Sendable, Codable, Equatable {
    public struct Recipient: Sendable, Codable, Equatable {
        public var attempts: Int
        /// Next attempt, milliseconds since 1970.
        public var nextAttemptMillis: Int64
        public var lastError: String?

        public init(attempts: Int, nextAttemptMillis: Int64, lastError: String?) {
            self.attempts = attempts
            self.nextAttemptMillis = nextAttemptMillis
            self.lastError = lastError
        }
    }

    /// Held by the operator: not delivered until released.
    public var held = false
    /// A delay warning was sent.
    public var warned = false
    /// By recipient index; recipients never tried are absent.
    public var recipients: [Int: Recipient] = [:]

    public init() {}
}

/// A message as read back from the spool: for the scheduler on start, and for `tern queue`.
public struct SpooledMessage: Sendable {
    public var id: QueueID
    public var envelope: Envelope
    public var contentSize: Int
    public var states: [RecipientState]
    public var meta: DeliveryMeta
    /// The file in `queue/` that holds it.
    public var slot: String

    /// The slot's number, for the daemon's calls (`mark`, `remove`, `readContent`).
    public var slotNumber: UInt32 { Spool.slotNumber(slot) ?? UInt32.max }
}

extension Spool {
    var metaDirectory: String { root + "/meta" }

    /// Every complete message with its recipient states and delivery notes, oldest first.
    /// Works on a spool that no daemon has open (and that no recovery may have checked, so
    /// each message's checksum is checked).
    public static func load(root: String) throws -> [SpooledMessage] {
        var out: [SpooledMessage] = []
        try forEach(root: root, verify: true) { out.append($0) }
        return out.sorted { $0.id < $1.id }
    }

    /// Each complete message in turn, in directory order, without holding them all.
    static func forEach(root: String, verify: Bool, _ body: (SpooledMessage) -> Void) throws {
        if access(root + "/queue", F_OK) != 0, errno == ENOENT { return }
        let decoder = JSONDecoder()
        for name in try SpoolFiles.list(root + "/queue") where isSlot(name) {
            guard let record = try? SpoolFiles.readRecord(root + "/queue/" + name, verify: verify, decoder: decoder) else { continue }
            let meta = SpoolFiles.readMeta(root + "/meta/" + record.id.rawValue) ?? DeliveryMeta()
            body(
                SpooledMessage(
                    id: record.id, envelope: record.envelope, contentSize: record.contentSize,
                    states: record.states.map { RecipientState(rawValue: $0) ?? .pending }, meta: meta, slot: name))
        }
    }

    /// Reads every message on the spool's threads and hands each to `transform`; what it
    /// returns is collected. The queue manager builds its index this way on start, without
    /// a second copy of the whole queue in memory.
    public func load<T: Sendable>(_ transform: @escaping @Sendable (SpooledMessage) -> T) async throws -> [T] {
        let root = self.root
        return try await pool.runIfActive {
            var out: [T] = []
            // Recovery has checked every checksum already.
            try Self.forEach(root: root, verify: false) { out.append(transform($0)) }
            return out
        }
    }

    /// Marks recipients final in place, so a restart does not send to them again. (A
    /// message whose recipients are all final is removed instead.) Delivered and bounced
    /// marks are not synced, as Postfix does not sync its done-recipient marks: a crash may
    /// lose one, and that recipient is sent again (a duplicate, never a loss; a bounce is
    /// in the spool before its mark). An operator's delete is synced.
    public func mark(_ id: QueueID, slot: UInt32, _ states: [Int: RecipientState]) async throws {
        let path = self.path(of: slot)
        let sync = states.values.contains(.deleted)
        try await pool.runIfActive { try SpoolFiles.writeStates(path, states, sync: sync) }
    }

    /// Removes a message whose recipients are all final, soon: removals are gathered and
    /// done by one job on the spool's threads, so a busy queue pays one thread trip for many.
    /// Nothing is synced: if a crash undoes the slot's truncation, its recipients are sent
    /// again (a duplicate, never a loss). Logs `<id>: removed` when done.
    public func remove(_ id: QueueID, slot: UInt32, hasMeta: Bool) {
        let start = removals.withLockedValue { state -> Bool in
            state.pending.append((id, slot, hasMeta))
            if state.running { return false }
            state.running = true
            return true
        }
        guard start else { return }
        pool.submit { [self] _ in
            while true {
                let batch = removals.withLockedValue { state -> [(QueueID, UInt32, Bool)] in
                    let batch = state.pending
                    state.pending.removeAll(keepingCapacity: true)
                    if batch.isEmpty { state.running = false }
                    return batch
                }
                if batch.isEmpty { return }
                for (id, slot, hasMeta) in batch {
                    recent.withLockedValue { $0.remove(id) }
                    release(slot)
                    if hasMeta { unlink(metaDirectory + "/" + id.rawValue) }
                    logger.info("\(id): removed", metadata: [LogSink.serviceKey: "qmgr"])
                }
            }
        }
    }

    /// Removes a message now (an operator's delete: the command returns after it).
    public func removeNow(_ id: QueueID, slot: UInt32) async throws {
        let meta = metaDirectory + "/" + id.rawValue
        recent.withLockedValue { $0.remove(id) }
        try await pool.runIfActive { [self] in
            release(slot)
            unlink(meta)
        }
        logger.info("\(id): removed", metadata: [LogSink.serviceKey: "qmgr"])
    }

    /// Replaces the message's delivery notes.
    public func writeMeta(_ id: QueueID, _ meta: DeliveryMeta) async throws {
        let path = metaDirectory + "/" + id.rawValue
        try await pool.runIfActive { try SpoolFiles.writeMeta(path, meta) }
    }

    /// Reads the message content (Tern's `Received:` header and the message, CRLF line
    /// endings) in pieces of `writeChunk` on the spool's threads; a message of one piece
    /// costs one trip there (open, read, close), and a small one just committed none (its
    /// first read comes from `RecentContent`).
    public func readContent(_ id: QueueID, slot: UInt32, size: Int, _ body: ([UInt8]) async throws -> Void) async throws {
        if let content = recent.withLockedValue({ $0.take(id) }), content.count == size {
            try await body(content)
            return
        }
        let path = self.path(of: slot)
        let first = min(size, Spool.writeChunk)
        let (fd, chunk) = try await pool.runIfActive { () throws -> (CInt, [UInt8]) in
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
            do {
                let chunk = try SpoolFiles.pread(fd, count: first, at: 0, path: path)
                if first == size {
                    close(fd)
                    return (-1, chunk)
                }
                return (fd, chunk)
            } catch {
                close(fd)
                throw error
            }
        }
        defer { if fd >= 0 { close(fd) } }
        try await body(chunk)
        var offset = first
        while offset < size {
            let count = min(Spool.writeChunk, size - offset)
            let at = offset
            try await body(try await pool.runIfActive { try SpoolFiles.pread(fd, count: count, at: at, path: path) })
            offset += count
        }
    }

    /// The whole content in memory (for a bounce that returns it).
    public func readContent(_ id: QueueID, slot: UInt32, size: Int, limit: Int) async throws -> [UInt8] {
        let path = self.path(of: slot)
        return try await pool.runIfActive {
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
            defer { close(fd) }
            return try SpoolFiles.pread(fd, count: min(size, limit), at: 0, path: path)
        }
    }
}

extension SpoolFiles {
    /// Overwrites recipients' state bytes in place (and syncs the file's data when asked).
    static func writeStates(_ path: String, _ states: [Int: RecipientState], sync: Bool = true) throws {
        let record = try readRecord(path)
        let fd = Glibc.open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
        defer { close(fd) }
        for (index, state) in states {
            guard index >= 0, index < record.states.count else { throw SpoolError("no recipient \(index) in", path) }
            var byte = state.rawValue
            guard pwrite(fd, &byte, 1, off_t(record.stateOffset + index)) == 1 else { throw SpoolError("write", path, errno: errno) }
        }
        if sync, fdatasync(fd) != 0 { throw SpoolError("fsync", path, errno: errno) }
    }

    static func readMeta(_ path: String) -> DeliveryMeta? {
        guard let text = ConfigLoader.readFile(path) else { return nil }
        return try? JSONDecoder().decode(DeliveryMeta.self, from: Data(text.utf8))
    }

    static func writeMeta(_ path: String, _ meta: DeliveryMeta) throws {
        try writeJSON(path, meta)
    }

    /// Writes a value as JSON to a temporary file, syncs it and renames it into place: the
    /// file holds the old value or the new one, never a part.
    static func writeJSON<Value: Encodable>(_ path: String, _ value: Value) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let bytes = Array(try encoder.encode(value))
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SpoolError("create", temporary, errno: errno) }
        do {
            defer { close(fd) }
            try writeAll(fd, bytes, path: temporary)
            guard fdatasync(fd) == 0 else { throw SpoolError("fsync", temporary, errno: errno) }
        }
        guard rename(temporary, path) == 0 else { throw SpoolError("rename", temporary, errno: errno) }
    }
}

/// A lane suspension (the operator's or a reply rule's) that outlives a restart.
public struct LaneSuspension: Sendable, Codable, Equatable {
    /// Milliseconds since 1970.
    public var untilMillis: Int64
    public var reason: String

    public init(untilMillis: Int64, reason: String) {
        self.untilMillis = untilMillis
        self.reason = reason
    }
}

extension Spool {
    /// `suspensions.json` in the spool: lane key → suspension.
    public var suspensionsPath: String { root + "/suspensions.json" }

    /// The recorded suspensions; none when the file does not exist.
    public func loadSuspensions() throws -> [String: LaneSuspension] {
        guard let text = ConfigLoader.readFile(suspensionsPath) else { return [:] }
        return try JSONDecoder().decode([String: LaneSuspension].self, from: Data(text.utf8))
    }

    public func saveSuspensions(_ suspensions: [String: LaneSuspension]) throws {
        try SpoolFiles.writeJSON(suspensionsPath, suspensions)
    }

    /// The header block of a queued message (for `tern queue show`); empty if unreadable.
    public static func headers(root: String, of message: SpooledMessage) -> [UInt8] {
        let path = root + "/queue/" + message.slot
        let size = message.contentSize
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        guard let head = try? SpoolFiles.pread(fd, count: min(size, 65536), at: 0, path: path) else { return [] }
        var i = 0
        while i + 4 <= head.count {
            if head[i] == 0x0D, head[i + 1] == 0x0A, head[i + 2] == 0x0D, head[i + 3] == 0x0A { return Array(head[..<(i + 2)]) }
            i += 1
        }
        return head
    }
}

// MARK: - Without a daemon

extension Spool {
    /// `mark`, for `tern queue` on a spool no daemon has open.
    public static func markOffline(root: String, _ message: SpooledMessage, _ states: [Int: RecipientState]) throws {
        try SpoolFiles.writeStates(root + "/queue/" + message.slot, states)
    }

    /// Deletes the message's slot with it (the daemon makes new ones as it needs them).
    public static func removeOffline(root: String, _ message: SpooledMessage) throws {
        let path = root + "/queue/" + message.slot
        guard unlink(path) == 0 || errno == ENOENT else { throw SpoolError("unlink", path, errno: errno) }
        unlink(root + "/meta/" + message.id.rawValue)
    }

    public static func writeMetaOffline(root: String, id: QueueID, _ meta: DeliveryMeta) throws {
        try SpoolFiles.writeMeta(root + "/meta/" + id.rawValue, meta)
    }
}
