import CCrypt
import NIOConcurrencyHelpers
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The users file: one `name:hash` per line, the hash a crypt(3) string such as
/// `openssl passwd -6` or `mkpasswd -m yescrypt` prints. Blank lines and `#` comments are
/// skipped. Hashes are checked by the system's libcrypt, never by code of ours.
public struct UserDatabase: Sendable {
    private var hashes: [String: String]

    public struct LoadError: Error, CustomStringConvertible {
        public var path: String
        public var line: Int?
        public var message: String
        public var description: String { line.map { "\(path):\($0): \(message)" } ?? "\(path): \(message)" }
    }

    public init(hashes: [String: String]) { self.hashes = hashes }

    public static func load(path: String) throws(LoadError) -> UserDatabase {
        guard let f = fopen(path, "r") else {
            throw LoadError(path: path, line: nil, message: String(cString: strerror(errno)))
        }
        defer { fclose(f) }
        var hashes: [String: String] = [:]
        var number = 0
        var linePointer: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(linePointer) }
        while getline(&linePointer, &capacity, f) > 0 {
            number += 1
            let line = String(cString: linePointer!).trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let colon = line.firstIndex(of: ":") else {
                throw LoadError(path: path, line: number, message: "expected name:hash")
            }
            let name = String(line[..<colon])
            let hash = String(line[line.index(after: colon)...])
            guard !name.isEmpty, hash.hasPrefix("$") else {
                throw LoadError(path: path, line: number, message: "expected name:hash with a crypt(3) hash such as $6$… or $y$…")
            }
            hashes[name] = hash
        }
        return UserDatabase(hashes: hashes)
    }

    public var count: Int { hashes.count }

    /// Checks a password. Blocking (a hash costs milliseconds by design): call it from a
    /// thread pool. An unknown user costs the same as a known one, so that timing does not
    /// tell which names exist.
    public func verify(user: String, password: String) -> Bool {
        let known = hashes[user]
        let setting = known ?? Self.decoy
        // crypt(3) reads a C string: a NUL would end the password early, and `secret\0junk`
        // would pass for `secret`. No password in a users file holds a NUL, so none matches.
        // The hash is computed all the same, so the answer takes as long either way.
        let cut = password.utf8.contains(0) || user.utf8.contains(0)
        guard let computed = Self.crypt(password, setting: setting) else { return false }
        return known != nil && !cut && Self.constantTimeEqual(computed, setting)
    }

    /// A valid SHA-512-crypt setting for users that do not exist.
    private static let decoy = "$6$rounds=5000$tern.decoy.salt$"

    static func crypt(_ phrase: String, setting: String) -> String? {
        let data = UnsafeMutablePointer<crypt_data>.allocate(capacity: 1)
        defer { data.deallocate() }
        memset(data, 0, MemoryLayout<crypt_data>.size)
        // crypt_rn (libxcrypt): returns NULL on error instead of a magic failure string, and
        // keeps its state in `data`, so concurrent calls are safe.
        guard let result = crypt_rn(phrase, setting, data, Int32(MemoryLayout<crypt_data>.size)) else { return nil }
        let out = String(cString: result)
        return out.hasPrefix("*") ? nil : out
    }

    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<x.count { diff |= x[i] ^ y[i] }
        return diff == 0
    }
}

extension String {
    func trimmingWhitespace() -> String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })!
        return String(scalars[first...last])
    }
}

/// Remembers failed AUTH attempts per client address. Each failure slows the next reply
/// (one second per recent failure, at most five); past the limit within the window the
/// address is disconnected when it tries again, until the window has passed.
final class AuthThrottle: Sendable {
    private let failures = NIOLockedValueBox([String: [ContinuousClock.Instant]]())
    let limit: Int
    let window: Duration

    init(limit: Int, window: Duration) {
        self.limit = limit
        self.window = window
    }

    private func recent(_ list: [ContinuousClock.Instant], now: ContinuousClock.Instant) -> [ContinuousClock.Instant] {
        list.filter { now - $0 < window }
    }

    /// Records a failure and returns how long to wait before answering.
    func recordFailure(_ address: String, now: ContinuousClock.Instant = .now) -> Duration {
        failures.withLockedValue { table in
            var list = recent(table[address] ?? [], now: now)
            list.append(now)
            table[address] = list
            if table.count > 10_000 { table = table.filter { !recent($0.value, now: now).isEmpty } }
            return .seconds(min(list.count, 5))
        }
    }

    /// True when the address has failed `limit` times within the window.
    func isBlocked(_ address: String, now: ContinuousClock.Instant = .now) -> Bool {
        failures.withLockedValue { table in
            recent(table[address] ?? [], now: now).count >= limit
        }
    }
}

/// Counts open connections, in total and per client address.
final class ConnectionLimiter: Sendable {
    private struct State {
        var total = 0
        var perClient: [String: Int] = [:]
    }
    private let state = NIOLockedValueBox(State())
    let maxTotal: Int
    let maxPerClient: Int

    init(maxTotal: Int, maxPerClient: Int) {
        self.maxTotal = maxTotal
        self.maxPerClient = maxPerClient
    }

    enum Verdict: Equatable {
        case admitted
        case tooManyTotal
        case tooManyFromClient
    }

    func admit(_ address: String) -> Verdict {
        state.withLockedValue { s in
            if s.total >= maxTotal { return .tooManyTotal }
            if s.perClient[address, default: 0] >= maxPerClient { return .tooManyFromClient }
            s.total += 1
            s.perClient[address, default: 0] += 1
            return .admitted
        }
    }

    func release(_ address: String) {
        state.withLockedValue { s in
            s.total -= 1
            let n = s.perClient[address, default: 1] - 1
            s.perClient[address] = n == 0 ? nil : n
        }
    }

    var open: Int { state.withLockedValue { $0.total } }

    /// More than 80% of the slots are taken: the server is under stress.
    var underPressure: Bool { state.withLockedValue { $0.total * 5 > maxTotal * 4 } }
}
