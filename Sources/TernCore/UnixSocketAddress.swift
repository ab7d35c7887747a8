#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A Unix-domain socket address for a path, for the sockets Tern opens with plain system
/// calls: the local submission socket, the control socket, syslog, systemd's notify socket.
/// A path that starts with `@` is an abstract socket (Linux), as systemd writes them.
public struct UnixSocketAddress {
    private var storage = sockaddr_un()
    private let length: socklen_t

    /// nil when the path does not fit in `sun_path`.
    public init?(path: String) {
        var bytes = Array(path.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        storage.sun_family = sa_family_t(AF_UNIX)
        guard bytes.count < MemoryLayout.size(ofValue: storage.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &storage.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        length = abstract ? socklen_t(MemoryLayout<sa_family_t>.size + bytes.count) : socklen_t(MemoryLayout<sockaddr_un>.size)
    }

    public func connect(_ fd: CInt) -> CInt {
        withAddress { Glibc.connect(fd, $0, length) }
    }

    public func bind(_ fd: CInt) -> CInt {
        withAddress { Glibc.bind(fd, $0, length) }
    }

    /// One datagram to this address.
    public func send(_ fd: CInt, _ bytes: [UInt8]) -> Int {
        withAddress { address in bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), address, length) } }
    }

    private func withAddress<T>(_ body: (UnsafePointer<sockaddr>) -> T) -> T {
        var copy = storage
        return withUnsafePointer(to: &copy) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1, body) }
    }
}
