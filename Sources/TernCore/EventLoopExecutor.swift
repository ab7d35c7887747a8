import NIOCore

/// Runs a task's code on one event loop's thread. A session's task prefers the executor of
/// its own channel's loop (`addTask(executorPreference:)`), and so does a lane worker, whose
/// connections are opened on that loop: a line that arrives on the loop is handled there,
/// and the answer is written there, without a hand-off to Swift's cooperative pool and back
/// for every line. Actor-isolated code (the scheduler, the lanes) still runs on its actor's
/// executor; a blocking call still goes to a thread pool.
/// - SeeAlso: SE-0417 (task executor preference); swift-nio `NIOSerialEventLoopExecutor`
public final class EventLoopExecutor: TaskExecutor {
    public let loop: any EventLoop

    public init(_ loop: any EventLoop) { self.loop = loop }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }

    public func asUnownedTaskExecutor() -> UnownedTaskExecutor { UnownedTaskExecutor(ordinary: self) }
}
