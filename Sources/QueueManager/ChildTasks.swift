/// The queue manager's child tasks: lane workers, lane timers, deferrals of a resting lane's
/// jobs, refills. Actors start them (an actor's synchronous code cannot own a task group);
/// they all run in the one task group of `run()`, which `Scheduler.run` owns. When that task
/// is cancelled (the relay stops), every child is cancelled and waited for: nothing the
/// queue manager started outlives it, and nothing keeps running after shutdown.
///
/// Work started after the group ended is dropped: at shutdown the mail it concerns stays in
/// the spool and is tried after the restart.
/// - SeeAlso: swift-service-lifecycle's `ServiceGroup`, Hummingbird's connection task group
struct ChildTasks: Sendable {
    typealias Work = @Sendable () async -> Void

    private let stream: AsyncStream<(Work, (any TaskExecutor)?)>
    private let continuation: AsyncStream<(Work, (any TaskExecutor)?)>.Continuation

    init() {
        (stream, continuation) = AsyncStream.makeStream(of: (Work, (any TaskExecutor)?).self)
    }

    /// Starts `work` as a child of the running group, on `executor` when one is given.
    func start(on executor: (any TaskExecutor)? = nil, _ work: @escaping Work) {
        continuation.yield((work, executor))
    }

    /// Runs what is started until this task is cancelled; then cancels every child and
    /// returns once all have ended.
    func run() async {
        await withDiscardingTaskGroup { group in
            // Ends when this task is cancelled (an AsyncStream's iteration does).
            for await (work, executor) in stream {
                group.addTask(executorPreference: executor, operation: work)
            }
            continuation.finish()
            group.cancelAll()
        }
    }
}
