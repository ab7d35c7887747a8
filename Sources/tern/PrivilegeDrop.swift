#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `tern serve` started as root with `user:` set: it binds its listeners and reads its keys
/// as root, then becomes that user for good (supplementary groups, group, user, in that
/// order), and checks that it cannot become root again.
/// - SeeAlso: Postfix `set_ugid()` (`src/util/set_ugid.c`)
struct PrivilegeDrop {
    let user: String
    let uid: uid_t
    let gid: gid_t

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// Looks the user (and group, when named) up; nil when there is nothing to drop.
    static func plan(user: String?, group: String?) throws -> PrivilegeDrop? {
        guard let user, geteuid() == 0 else { return nil }
        guard let pw = getpwnam(user) else { throw Failure(description: "user: no such user '\(user)'") }
        var gid = pw.pointee.pw_gid
        if let group {
            guard let gr = getgrnam(group) else { throw Failure(description: "group: no such group '\(group)'") }
            gid = gr.pointee.gr_gid
        }
        guard pw.pointee.pw_uid != 0 else { throw Failure(description: "user: '\(user)' is root; name an unprivileged user") }
        return PrivilegeDrop(user: user, uid: pw.pointee.pw_uid, gid: gid)
    }

    /// Gives `path` (a spool directory) and everything in it to the user, so that nothing
    /// root left there stays unwritable after the drop.
    func own(_ path: String) throws {
        guard chown(path, uid, gid) == 0 else {
            throw Failure(description: "cannot give \(path) to \(user): \(String(cString: strerror(errno)))")
        }
        guard let dir = opendir(path) else { return }  // a file, not a directory
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            // Maildrop files stay their submitters' (their owner is who sent them).
            guard name != ".", name != "..", name != "maildrop" else { continue }
            let child = path + "/" + name
            var st = stat()
            guard lstat(child, &st) == 0 else { continue }
            if st.st_mode & S_IFMT == S_IFDIR {
                try own(child)
            } else if st.st_mode & S_IFMT != S_IFLNK {
                _ = chown(child, uid, gid)
            }
        }
    }

    func drop() throws {
        guard initgroups(user, gid) == 0 else { throw Failure(description: "initgroups(\(user)): \(String(cString: strerror(errno)))") }
        guard setgid(gid) == 0 else { throw Failure(description: "setgid(\(gid)): \(String(cString: strerror(errno)))") }
        guard setuid(uid) == 0 else { throw Failure(description: "setuid(\(uid)): \(String(cString: strerror(errno)))") }
        // Verify: the saved IDs went too, so root is gone for good.
        guard setuid(0) != 0, geteuid() == uid, getegid() == gid else {
            throw Failure(description: "could still become root after dropping to \(user)")
        }
    }
}
