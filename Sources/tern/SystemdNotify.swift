import ServiceLifecycle
import TernCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET` per state change, so
/// that a `Type=notify` unit knows when Tern accepts mail, reloads and stops. Nothing happens
/// when the variable is unset (not started by systemd).
enum SystemdNotify {
    static func send(_ state: String) {
        guard let value = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !value.isEmpty else { return }
        guard let address = UnixSocketAddress(path: value) else { return }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        _ = address.send(fd, Array(state.utf8))
    }

    /// `RELOADING=1` with the monotonic time that systemd 253 and later require beside it.
    static func reloading() -> String {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return "RELOADING=1\nMONOTONIC_USEC=\(Int64(now.tv_sec) * 1_000_000 + Int64(now.tv_nsec) / 1000)"
    }
}

/// Tells systemd READY=1 once the other services have started and STOPPING=1 as soon as a
/// graceful shutdown begins. Last in the service group: started last, stopped first.
struct ReadinessService: Service {
    func run() async throws {
        SystemdNotify.send("READY=1\nSTATUS=accepting mail")
        try? await gracefulShutdown()
        SystemdNotify.send("STOPPING=1")
    }
}
