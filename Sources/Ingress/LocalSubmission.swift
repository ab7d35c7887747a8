#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import TernCore

/// Where local submission (`tern sendmail`) meets the daemon, and who may use it.
///
/// ```
/// <spool>/public/          0710 daemon user, sendmail.group   (0700 without a group)
/// <spool>/public/sendmail  Unix socket: the daemon speaks SMTP here, to trusted local users
/// <spool>/maildrop/        1730 daemon user, sendmail.group   (1700 without a group)
/// ```
/// The socket is for when the daemon runs: `tern sendmail` gets the daemon's answer (queue
/// id, or refusal) before it exits. The maildrop is for when it does not: `tern sendmail`
/// writes a file there and exits 0, and the daemon picks the file up when it starts. Neither
/// is ever open to everyone: the group is who the operator lets submit (Postfix's `postdrop`
/// group), and the sticky bit keeps members from removing each other's files.
public enum LocalSubmission {
    public static func socketPath(spool: String) -> String { spool + "/public/sendmail" }
    public static func maildropPath(spool: String) -> String { spool + "/maildrop" }
    /// Maildrop files that cannot be picked up (unreadable, malformed, refused) go here,
    /// for the operator to look at; nothing is deleted unread.
    public static func rejectedPath(spool: String) -> String { spool + "/maildrop-rejected" }

    public struct SetupError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Creates the directories with their modes. `owner` (root only) gives them to the
    /// daemon's user; `group` is `sendmail.group`'s id.
    public static func prepare(spool: String, owner: (uid: uid_t, gid: gid_t)?, group: gid_t?) throws {
        // Others may pass through the spool's root (0711, as Postfix's queue directory is
        // 0755) to reach public/ and maildrop/; everything else in it is the owner's alone.
        var root = stat()
        if group != nil, stat(spool, &root) == 0, root.st_mode & 0o011 != 0o011 {
            _ = chmod(spool, (root.st_mode & 0o7777) | 0o011)
        }
        let dirs: [(String, mode_t)] = [
            (spool + "/public", group == nil ? 0o700 : 0o710),
            (maildropPath(spool: spool), group == nil ? 0o1700 : 0o1730),
            (rejectedPath(spool: spool), 0o700),
        ]
        for (path, mode) in dirs {
            if mkdir(path, mode) != 0, errno != EEXIST { throw failure("cannot create \(path)") }
            var st = stat()
            guard lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
                throw SetupError(description: "\(path) is not a directory")
            }
            let uid = owner?.uid ?? uid_t.max  // -1: unchanged
            let gid = path.hasSuffix("-rejected") ? (owner?.gid ?? gid_t.max) : (group ?? owner?.gid ?? gid_t.max)
            if uid != uid_t.max || gid != gid_t.max, chown(path, uid, gid) != 0 {
                throw failure("sendmail.group: cannot give \(path) to group \(gid)")
            }
            if chmod(path, mode) != 0 { throw failure("cannot set the mode of \(path)") }
        }
    }

    /// The listening Unix socket, bound with plain system calls (by root before a privilege
    /// drop, or by the daemon itself). A stale socket left by a crash is replaced; any other
    /// file in its place is an error.
    public static func listeningSocket(spool: String, owner: (uid: uid_t, gid: gid_t)?) throws -> CInt {
        let path = socketPath(spool: spool)
        var st = stat()
        guard let address = UnixSocketAddress(path: path) else {
            throw SetupError(description: "\(path): the spool's path is too long for a Unix socket")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure("socket") }
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                close(fd)
                throw SetupError(description: "\(path) exists and is not a socket")
            }
            // A socket someone answers on belongs to a running daemon: never take it away.
            if address.connect(fd) == 0 {
                close(fd)
                throw SetupError(description: "\(path): another tern serve is running on this spool")
            }
            unlink(path)
            close(fd)
            return try listeningSocket(spool: spool, owner: owner)
        }
        let bound = address.bind(fd)
        guard bound == 0, listen(fd, 128) == 0 else {
            let error = failure("cannot listen on \(path)")
            close(fd)
            throw error
        }
        // The directory decides who reaches the socket; the socket itself lets them write.
        _ = chmod(path, 0o666)
        if let owner { _ = chown(path, owner.uid, owner.gid) }
        return fd
    }

    private static func failure(_ what: String) -> SetupError {
        SetupError(description: "\(what): \(String(cString: strerror(errno)).lowercased())")
    }
}
