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
/// per recipient (`-` pending; delivery marks them in place), then a fixed 64-byte trailer
/// `TERN-SPOOL-2 <queue id> <envelope offset, 16 hex> <state offset, 16 hex>\n`. The file's
/// name is its slot's; the message's queue id is the one in its trailer.
enum SpoolFiles {
    static let magic = "TERN-SPOOL-2 "
    static let trailerLength = 64

    static func envelopeRecord(_ envelope: Envelope, contentSize: Int, id: QueueID) -> [UInt8] {
        var out = envelope.jsonBytes
        out.append(0x0A)
        let stateOffset = contentSize + out.count
        out.append(contentsOf: [UInt8](repeating: UInt8(ascii: "-"), count: envelope.recipients.count))
        out.append(0x0A)
        out.append(contentsOf: Array((magic + id.rawValue + " " + hex16(contentSize) + " " + hex16(stateOffset) + "\n").utf8))
        return out
    }

    static func hex16(_ n: Int) -> String {
        let s = String(n, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    enum Completeness: Equatable {
        case complete(QueueID)
        /// A free slot.
        case empty
        case incomplete
        case corrupt
    }

    /// Whether a slot holds a committed message: no valid trailer means the commit never
    /// finished (half-written); a valid trailer with an unreadable envelope means damage.
    static func check(_ path: String) -> Completeness {
        do {
            return .complete(try readRecord(path).id)
        } catch let error as SpoolError where error.isMissingTrailer {
            var st = stat()
            return stat(path, &st) == 0 && st.st_size == 0 ? .empty : .incomplete
        } catch {
            return .corrupt
        }
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

    static func readRecord(_ path: String, decoder: JSONDecoder = JSONDecoder()) throws -> Record {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SpoolError("stat", path, errno: errno) }
        let fileSize = Int(st.st_size)
        guard fileSize >= trailerLength else { throw SpoolError(SpoolError.noTrailer, path) }
        let trailer = try pread(fd, count: trailerLength, at: fileSize - trailerLength, path: path)
        let text = String(decoding: trailer, as: UTF8.self)
        guard text.hasPrefix(magic), text.hasSuffix("\n") else { throw SpoolError(SpoolError.noTrailer, path) }
        let fields = text.dropFirst(magic.count).dropLast().split(separator: " ")
        guard fields.count == 3, let id = QueueID(String(fields[0])), let envelopeOffset = Int(fields[1], radix: 16),
            let stateOffset = Int(fields[2], radix: 16), envelopeOffset < stateOffset, stateOffset < fileSize
        else { throw SpoolError(SpoolError.noTrailer, path) }
        let json = try pread(fd, count: stateOffset - envelopeOffset - 1, at: envelopeOffset, path: path)
        let envelope = try decoder.decode(Envelope.self, from: Data(json))
        let stateCount = fileSize - trailerLength - 1 - stateOffset
        guard stateCount == envelope.recipients.count else { throw SpoolError("recipient states do not match the envelope in", path) }
        let states = try pread(fd, count: stateCount, at: stateOffset, path: path)
        return Record(id: id, envelope: envelope, contentSize: envelopeOffset, stateOffset: stateOffset, states: states)
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
