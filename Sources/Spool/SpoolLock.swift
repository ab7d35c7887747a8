#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One process at a time owns a spool: `tern serve` for as long as it runs, or an offline
/// queue command for the moment it edits the files. The owner holds an exclusive `flock` on
/// `<spool>/lock`, and the file holds the owner's PID for the message a second one gets.
/// The kernel drops the lock when the process ends, however it ends (`kill -9` included):
/// no stale lock to clean up.
/// - SeeAlso: Postfix `master.lock` (`src/master/master.c`, `myflock`)
public final class SpoolLock: @unchecked Sendable {
    private let fd: CInt

    /// Another process owns the spool.
    public struct Busy: Error, CustomStringConvertible, Sendable {
        public var path: String
        /// The owner's PID as its lock file says, when it says.
        public var pid: Int32?
        public var description: String {
            "\(path) is locked by \(pid.map { "process \($0)" } ?? "another process") (another `tern serve` on this spool?)"
        }
    }

    private init(fd: CInt) { self.fd = fd }

    deinit { close(fd) }

    public static func path(root: String) -> String { root + "/lock" }

    /// Creates the spool directory (and missing parents) without taking the lock.
    public static func createRoot(_ root: String) throws { try SpoolFiles.makeDirectory(root) }

    /// Takes the lock without waiting, creating the spool directory and the lock file when
    /// missing, and writes this process's PID into it.
    public static func acquire(root: String) throws -> SpoolLock {
        try SpoolFiles.makeDirectory(root)
        let path = path(root: root)
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SpoolError("open", path, errno: errno) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let code = errno
            close(fd)
            guard code == EWOULDBLOCK else { throw SpoolError("flock", path, errno: code) }
            throw Busy(path: path, pid: holder(root: root))
        }
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return SpoolLock(fd: fd)
    }

    /// The PID written in the lock file, if it reads as one.
    public static func holder(root: String) -> Int32? {
        let fd = open(path(root: root), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        return Int32(String(decoding: buffer[..<n].prefix(while: { $0 >= 0x30 && $0 <= 0x39 }), as: UTF8.self))
    }
}
