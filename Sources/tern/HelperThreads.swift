import Logging
import NIOConcurrencyHelpers
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// The threads that only wait for the disk or the DNS (the spool's pool, the resolver's
/// pool) run under Linux's `SCHED_BATCH` policy: at the same priority, but a wakeup of
/// theirs never preempts a running thread. Without it, each `fdatasync` that returned and
/// each job handed to a pool thread cut into the event loop running on that core, twice a
/// context switch; with it the woken thread waits for the loop to block or for its slice to
/// end. `bench/cpu.sh` at 20 sessions of 1 KB: 10.3 → 8.6 switches and 0.69 → 0.63 ms of
/// CPU per message, and the commit's latency at one session no worse (`bench/README.md`).
/// - SeeAlso: sched(7), `SCHED_BATCH`.
enum HelperThreads {
    /// `SCHED_BATCH` from `<sched.h>`, which Swift's Glibc module does not export.
    static let schedBatch: CInt = 3

    /// Sets the policy on every thread of `pool` (which has `threads` threads and nothing
    /// queued): one job per thread, each holding its thread until all have started, so that
    /// no thread takes two. Asking for a lower claim on the processor needs no privilege;
    /// where it fails (a kernel without the policy), the threads keep the default.
    static func yieldWakeups(of pool: NIOThreadPool, threads: Int, name: String, logger: Logger) async {
        #if os(Linux)
        let started = NIOLockedValueBox(0)
        let failures = NIOLockedValueBox(0)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<threads {
                group.addTask {
                    _ = try? await pool.runIfActive {
                        var parameters = sched_param()
                        parameters.sched_priority = 0
                        if sched_setscheduler(0, schedBatch, &parameters) != 0 { failures.withLockedValue { $0 += 1 } }
                        started.withLockedValue { $0 += 1 }
                        // Held until every thread has one job (or a second has passed: a
                        // thread already busy elsewhere must not stop the start-up).
                        for _ in 0..<1000 where started.withLockedValue({ $0 }) < threads { usleep(1000) }
                    }
                }
            }
        }
        let failed = failures.withLockedValue { $0 }
        if failed > 0 { logger.notice("\(name) threads: SCHED_BATCH refused on \(failed) of \(threads); they keep the default policy") }
        #endif
    }
}
