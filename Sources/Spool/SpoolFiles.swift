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
import NIOConcurrencyHelpers
import TernCore

/// The on-disk format of one spool file and the blocking system calls around it. Called only
/// from the spool's thread pool or from command-line tools, never from an event loop.
///
/// A file is the message content, then the envelope as one line of JSON, then one state byte
/// per recipient (`-` pending; delivery marks them in place) and a newline, then zeros up to
/// the slot's size, then a fixed 81-byte trailer, the file's last bytes:
/// `TERN-SPOOL-3 <queue id> <envelope offset, 16 hex> <state offset, 16 hex> <checksum, 16 hex>\n`.
/// The checksum covers the content and the envelope. The file's name is its slot's; the
/// message's queue id is the one in its trailer. A free slot ends in a trailer's length of
/// zeros. Files of the format before (`TERN-SPOOL-2`, 64 bytes, no checksum, no padding) are
/// still read.
enum SpoolFiles {
    static let magic = "TERN-SPOOL-3 "
    static let trailerLength = 81
    static let magicV2 = "TERN-SPOOL-2 "
    static let trailerLengthV2 = 64

    /// Slots up to this size are rewritten in place; a larger one is truncated when its
    /// message is done, so a free slot never holds more than this on disk.
    static let inPlaceLimit = 64 * 1024

    /// The envelope and the recipient states, which follow the content, and the trailer, which
    /// ends the slot. `checksum` has been fed the content; the envelope is added here.
    static func records(
        _ envelope: Envelope, contentSize: Int, id: QueueID, checksum: ContentChecksum
    ) -> (records: [UInt8], trailer: [UInt8]) {
        var out = envelope.jsonBytes
        out.append(0x0A)
        let stateOffset = contentSize + out.count
        var sum = checksum
        sum.update(out)
        out.append(contentsOf: [UInt8](repeating: UInt8(ascii: "-"), count: envelope.recipients.count))
        out.append(0x0A)
        let trailer = Array(
            (magic + id.rawValue + " " + hex16(contentSize) + " " + hex16(stateOffset) + " " + hex16(sum.value) + "\n").utf8)
        return (out, trailer)
    }

    /// A whole file with no padding: the content, the records and the trailer.
    static func file(content: [UInt8], envelope: Envelope, id: QueueID) -> [UInt8] {
        var sum = ContentChecksum()
        sum.update(content)
        let (records, trailer) = records(envelope, contentSize: content.count, id: id, checksum: sum)
        return content + records + trailer
    }

    /// Where a message of `needed` bytes (records and trailer included) ends in a slot that
    /// was `previous` bytes long: a small message fills a power of two of 4 KB pages, or the
    /// slot as it was if that is larger, so that reusing the slot changes neither its size
    /// nor its blocks; a large one ends where it ends.
    static func slotEnd(needed: Int, previous: Int) -> Int {
        guard needed <= inPlaceLimit else { return needed }
        var size = 4096
        while size < needed { size *= 2 }
        return max(size, previous)
    }

    static func hex16<N: BinaryInteger>(_ n: N) -> String {
        let s = String(n, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    enum Completeness: Equatable {
        case complete(QueueID)
        /// A free slot of this size.
        case free(Int)
        case incomplete
        /// Moved aside for the operator: `checksum` when only the checksum disagrees.
        case corrupt(checksum: Bool)
    }

    /// Whether a slot holds a committed message: no valid trailer means the commit never
    /// finished (half-written); a valid trailer whose checksum or envelope does not match
    /// what the file holds means a commit torn by a power loss, or damage.
    static func check(_ path: String) -> Completeness {
        do {
            return .complete(try readRecord(path, verify: true).id)
        } catch let error as SpoolError where error.isMissingTrailer {
            guard let (size, tail) = try? tail(path) else { return .incomplete }
            return size == 0 || (size <= inPlaceLimit && tail.allSatisfy { $0 == 0 }) ? .free(size) : .incomplete
        } catch let error as SpoolError where error.isBadChecksum {
            return .corrupt(checksum: true)
        } catch {
            return .corrupt(checksum: false)
        }
    }

    private static let zeros = [UInt8](repeating: 0, count: inPlaceLimit)

    /// Frees a slot (see `Spool.release`) and returns its size afterwards; nil if it could
    /// not be freed.
    static func free(_ fd: CInt, path: String) -> Int? {
        guard let (size, tail) = try? tail(fd, path: path) else { return nil }
        if size == 0 { return 0 }
        let current = tail.count == trailerLength && tail.starts(with: magic.utf8)
        if size <= inPlaceLimit, current || tail.allSatisfy({ $0 == 0 }),
            (try? zeros.withUnsafeBytes { try pwriteAll(fd, UnsafeRawBufferPointer(rebasing: $0[..<size]), at: 0, path: path) }) != nil
        {
            return size
        }
        return ftruncate(fd, 0) == 0 ? 0 : nil
    }

    /// A file's size and its last `trailerLength` bytes (fewer if it is shorter).
    static func tail(_ path: String) throws -> (Int, [UInt8]) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
        defer { close(fd) }
        return try tail(fd, path: path)
    }

    static func tail(_ fd: CInt, path: String) throws -> (Int, [UInt8]) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SpoolError("stat", path, errno: errno) }
        let size = Int(st.st_size)
        let count = min(size, trailerLength)
        return (size, try pread(fd, count: count, at: size - count, path: path))
    }

    /// What delivery needs of a committed file besides its content.
    struct Record {
        var id: QueueID
        var envelope: Envelope
        /// Bytes of message content, which start at offset 0.
        var contentSize: Int
        var stateOffset: Int
        /// One byte per recipient: `-` pending, `D` delivered, `B` bounced, `X` deleted.
        var states: [UInt8]
    }

    /// Reads a slot's trailer, envelope and states. With `verify`, the content and the
    /// envelope are read too and must match the trailer's checksum (recovery, and tools that
    /// read a spool no daemon has recovered).
    static func readRecord(_ path: String, verify: Bool = false, decoder: JSONDecoder = JSONDecoder()) throws -> Record {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
        defer { close(fd) }
        let (fileSize, tail) = try tail(fd, path: path)
        guard let trailer = parseTrailer(tail, fileSize: fileSize) else { throw SpoolError(SpoolError.noTrailer, path) }
        // The envelope's line, with its newline.
        let line = try pread(fd, count: trailer.stateOffset - trailer.envelopeOffset, at: trailer.envelopeOffset, path: path)
        if verify, let expected = trailer.checksum {
            var sum = ContentChecksum()
            var offset = 0
            while offset < trailer.envelopeOffset {
                let count = min(Spool.writeChunk, trailer.envelopeOffset - offset)
                sum.update(try pread(fd, count: count, at: offset, path: path))
                offset += count
            }
            sum.update(line)
            guard sum.value == expected else { throw SpoolError(SpoolError.badChecksum, path) }
        }
        guard line.last == 0x0A else { throw SpoolError("no newline after the envelope in", path) }
        let envelope = try decoder.decode(Envelope.self, from: Data(line.dropLast()))
        let stateCount = envelope.recipients.count
        // The states, their newline, and (in the current format) padding before the trailer.
        let stateEnd = trailer.stateOffset + stateCount + 1
        let fits = trailer.checksum == nil ? stateEnd == trailer.start : stateEnd <= trailer.start
        guard fits else { throw SpoolError("recipient states do not match the envelope in", path) }
        let states = try pread(fd, count: stateCount + 1, at: trailer.stateOffset, path: path)
        guard states.last == 0x0A else { throw SpoolError("recipient states do not match the envelope in", path) }
        return Record(
            id: trailer.id, envelope: envelope, contentSize: trailer.envelopeOffset, stateOffset: trailer.stateOffset,
            states: Array(states.dropLast()))
    }

    struct Trailer {
        var id: QueueID
        var envelopeOffset: Int
        var stateOffset: Int
        /// Absent in the format before checksums.
        var checksum: UInt64?
        /// Where the trailer begins.
        var start: Int
    }

    /// The trailer in a file's last bytes, in either format.
    static func parseTrailer(_ tail: [UInt8], fileSize: Int) -> Trailer? {
        guard tail.last == 0x0A else { return nil }
        let current = tail.count == trailerLength ? String(decoding: tail, as: UTF8.self) : ""
        let (text, fieldCount, length): (Substring, Int, Int)
        if current.hasPrefix(magic) {
            (text, fieldCount, length) = (current.dropFirst(magic.count).dropLast(), 4, trailerLength)
        } else {
            let old = String(decoding: tail.suffix(trailerLengthV2), as: UTF8.self)
            guard tail.count >= trailerLengthV2, old.hasPrefix(magicV2) else { return nil }
            (text, fieldCount, length) = (Substring(old).dropFirst(magicV2.count).dropLast(), 3, trailerLengthV2)
        }
        let fields = text.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count == fieldCount, fields.dropFirst().allSatisfy({ $0.utf8.count == 16 }),
            let id = QueueID(String(fields[0])), let envelopeOffset = Int(fields[1], radix: 16),
            let stateOffset = Int(fields[2], radix: 16), envelopeOffset >= 0, envelopeOffset < stateOffset,
            stateOffset < fileSize - length
        else { return nil }
        var checksum: UInt64?
        if fieldCount == 4 {
            guard let sum = UInt64(fields[3], radix: 16) else { return nil }
            checksum = sum
        }
        return Trailer(id: id, envelopeOffset: envelopeOffset, stateOffset: stateOffset, checksum: checksum, start: fileSize - length)
    }

    static func pread(_ fd: CInt, count: Int, at offset: Int, path: String) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = buffer.withUnsafeMutableBytes { Glibc.pread(fd, $0.baseAddress! + done, count - done, off_t(offset + done)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw SpoolError("read", path, errno: n < 0 ? errno : nil) }
            done += n
        }
        return buffer
    }

    /// Creates in one directory are serialised by its lock in the kernel anyway; while one
    /// thread holds it (ext4's free-inode search can take hundreds of microseconds), other
    /// threads would spin on it. Taking this lock first makes them sleep instead.
    private static let createLock = NIOLock()

    static func create(_ path: String) throws -> CInt {
        let fd = createLock.withLock { open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        guard fd >= 0 else { throw SpoolError("create", path, errno: errno) }
        return fd
    }

    static func pwriteAll(_ fd: CInt, _ bytes: [UInt8], at offset: Int, path: String) throws {
        try bytes.withUnsafeBytes { try pwriteAll(fd, $0, at: offset, path: path) }
    }

    static func pwriteAll(_ fd: CInt, _ bytes: UnsafeRawBufferPointer, at offset: Int, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw SpoolError("write", path, errno: errno) }
            done += n
        }
    }

    static func writeAll(_ fd: CInt, _ bytes: [UInt8], path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw SpoolError("write", path, errno: errno) }
            done += n
        }
    }

    /// Creates `path` and any missing parents, syncing each parent that gains an entry.
    /// The directory itself is private (0700); parents it had to create are 0755, so that a
    /// user the spool is given to after a privilege drop can still reach it.
    static func makeDirectory(_ path: String, mode: mode_t = 0o700) throws {
        let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        if !parent.isEmpty, access(parent, F_OK) != 0 { try makeDirectory(parent, mode: 0o755) }
        if mkdir(path, mode) == 0 {
            // The new entry must survive a crash too.
            let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
            try syncDirectory(parent.isEmpty ? (path.hasPrefix("/") ? "/" : ".") : parent)
        } else if errno != EEXIST {
            throw SpoolError("mkdir", path, errno: errno)
        }
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw SpoolError("fsync", path, errno: errno) }
    }

    static func list(_ dir: String) throws -> [String] {
        guard let d = opendir(dir) else { throw SpoolError("opendir", dir, errno: errno) }
        defer { closedir(d) }
        var names: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
