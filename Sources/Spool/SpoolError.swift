/// A spool operation that failed, with the path and the system's reason.
public struct SpoolError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var path: String
    public var errno: Int32?

    public init(_ operation: String, _ path: String, errno: Int32? = nil) {
        self.operation = operation
        self.path = path
        self.errno = errno
    }

    /// A file without a valid trailer: a commit that never finished.
    static let noTrailer = "no valid trailer in"
    var isMissingTrailer: Bool { operation == Self.noTrailer }

    /// A trailer whose checksum does not match the content and envelope before it: a commit
    /// torn by a power loss (the trailer reached the disk, some older blocks stayed), or damage.
    static let badChecksum = "content does not match the checksum in"
    var isBadChecksum: Bool { operation == Self.badChecksum }

    /// The file system is full (or the user's quota is).
    public var isOutOfSpace: Bool { errno == ENOSPC || errno == EDQUOT }

    public var description: String {
        let reason = errno.map { ": " + String(cString: strerror($0)) } ?? ""
        return "\(operation) \(path)\(reason)"
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
