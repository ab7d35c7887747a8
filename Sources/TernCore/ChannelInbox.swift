import NIOCore

/// The end of a channel's pipeline where one task reads frames and writes bytes: what
/// `NIOAsyncChannel` does for a session or an SMTP client connection, without its
/// general-purpose machinery (a sequence producer with watermarks, a writer with its own
/// state machine and a task for each hand-over). A frame that arrives while the task waits
/// resumes it at once; one that arrives while it is busy waits in a small buffer. The task
/// that reads runs on the channel's own event loop (`EventLoopExecutor`), so taking a buffered
/// frame or writing a reply is a plain call on that thread, with no suspension; from any
/// other thread every step hops onto the loop first, and stays correct.
///
/// Backpressure: once `limit` frames wait, the inbox stops asking the channel to read, and
/// asks again when the task has taken one. A write that leaves the channel unwritable (the
/// peer does not read) suspends the writer until the channel drains, and no longer than
/// `drainTimeout`: that wait is a deadline too.
///
/// After `errorCaught` the frames already buffered are still read, then `next` throws the
/// error once, then returns nil, as it does after the channel closes. The owner closes the
/// channel.
///
/// Everything is generic over the frame and `@inlinable`, so each use is specialised in its
/// own module: no generic metadata is looked up per frame at run time.
public final class ChannelInbox<Frame: Sendable>: ChannelDuplexHandler, @unchecked Sendable {
    public typealias InboundIn = Frame
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// The channel this inbox ends.
    public let channel: any Channel
    @usableFromInline let eventLoop: any EventLoop
    @usableFromInline let limit: Int
    /// How long a write may wait for a peer that does not read, at most.
    @usableFromInline let drainTimeout: TimeAmount?

    // Event-loop state below: touched only on `eventLoop`.
    @usableFromInline var context: ChannelHandlerContext?
    @usableFromInline var frames = CircularBuffer<Frame>(initialCapacity: 4)
    @usableFromInline var reader: UnsafeContinuation<Frame?, any Error>?
    @usableFromInline var drainWaiter: UnsafeContinuation<Void, any Error>?
    @usableFromInline var drainTimer: Scheduled<Void>?
    @usableFromInline var ended = false
    @usableFromInline var failure: (any Error)?
    @usableFromInline var readHeld = false
    @usableFromInline var cancelled = false
    /// Bytes were written without a flush (more frames waited): flushed before the task
    /// waits for a frame, or with the next flushed write.
    @usableFromInline var unflushed = false

    /// - Parameters:
    ///   - limit: frames buffered before the inbox stops reading from the socket.
    ///   - drainTimeout: how long a write may wait for the channel to become writable again
    ///     before the channel is closed; nil when another deadline covers it.
    @inlinable
    public init(channel: any Channel, limit: Int = 8, drainTimeout: TimeAmount? = nil) {
        self.channel = channel
        self.eventLoop = channel.eventLoop
        self.limit = max(1, limit)
        self.drainTimeout = drainTimeout
    }

    // MARK: - The task's side

    /// The next frame; nil once the channel has closed (after any error was thrown once).
    @inlinable
    public func next() async throws -> Frame? {
        if eventLoop.inEventLoop, let frame = take() { return frame }
        if Task.isCancelled { throw CancellationError() }
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Frame?, any Error>) in
                if eventLoop.inEventLoop {
                    wait(continuation)
                } else {
                    eventLoop.execute { self.wait(continuation) }
                }
            }
        } onCancel: {
            eventLoop.execute { self.cancelReader() }
        }
    }

    /// Frames wait to be read: the peer sent more before this task caught up (it pipelines).
    /// Meaningful on the channel's loop only; false elsewhere.
    @inlinable
    public var framesWaiting: Bool { eventLoop.inEventLoop && !frames.isEmpty }

    /// Writes `buffer`, and flushes it unless `flush` is false: then it goes out with the next
    /// flushed write, or before the task next waits for a frame, whichever comes first (a
    /// server answering pipelined commands sends their replies together, RFC 2920 §3.2).
    /// Returns once it is handed to the channel, or, when the channel has stopped being
    /// writable (the peer does not read), once it is writable again. Throws when the channel
    /// is closed, and `WriteDrainTimeout` (closing the channel) when it stays unwritable for
    /// `drainTimeout`.
    @inlinable
    public func write(_ buffer: ByteBuffer, flush: Bool = true) async throws {
        if eventLoop.inEventLoop {
            if try writeNow(buffer, flush: flush) { return }
            // Still on the loop: nothing can have changed since the write.
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Void, any Error>) in
                waitForDrain(continuation)
            }
            return
        }
        try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Void, any Error>) in
            eventLoop.execute {
                do {
                    if try self.writeNow(buffer, flush: flush) { continuation.resume() } else { self.waitForDrain(continuation) }
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// Writes on the loop; true when the channel is still writable after it.
    @inlinable
    func writeNow(_ buffer: ByteBuffer, flush: Bool) throws -> Bool {
        guard let context, context.channel.isActive else { throw ChannelError.ioOnClosedChannel }
        if flush {
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
            unflushed = false
        } else {
            context.write(wrapOutboundOut(buffer), promise: nil)
            unflushed = true
        }
        guard context.channel.isWritable else {
            // Held bytes alone can fill the buffer: they must go out before anything can drain.
            flushHeld()
            return false
        }
        return true
    }

    /// Sends what writes left unflushed.
    @inlinable
    func flushHeld() {
        guard unflushed else { return }
        unflushed = false
        context?.flush()
    }

    @inlinable
    func waitForDrain(_ continuation: UnsafeContinuation<Void, any Error>) {
        // A write that fails at once (the peer reset the connection) closes the channel
        // before it returns: then nothing is left to wait for.
        guard !ended else {
            continuation.resume(throwing: failure ?? ChannelError.ioOnClosedChannel)
            return
        }
        drainWaiter = continuation
        guard let drainTimeout else { return }
        drainTimer = eventLoop.scheduleTask(in: drainTimeout) { self.drainTimedOut() }
    }

    @inlinable
    func drainTimedOut() {
        guard let drainWaiter else { return }
        self.drainWaiter = nil
        drainTimer = nil
        drainWaiter.resume(throwing: WriteDrainTimeout())
        context?.close(promise: nil)
    }

    @inlinable
    func resumeDrainWaiter(_ error: (any Error)?) {
        drainTimer?.cancel()
        drainTimer = nil
        guard let drainWaiter else { return }
        self.drainWaiter = nil
        if let error { drainWaiter.resume(throwing: error) } else { drainWaiter.resume() }
    }

    @inlinable
    func take() -> Frame? {
        guard let frame = frames.popFirst() else { return nil }
        if readHeld, frames.count < limit, let context {
            readHeld = false
            context.read()
        }
        return frame
    }

    @inlinable
    func wait(_ continuation: UnsafeContinuation<Frame?, any Error>) {
        if let frame = take() {
            continuation.resume(returning: frame)
            return
        }
        // Nothing more to answer now: held replies go out before the wait.
        flushHeld()
        if cancelled {
            continuation.resume(throwing: CancellationError())
        } else if ended {
            let error = failure
            failure = nil
            if let error { continuation.resume(throwing: error) } else { continuation.resume(returning: nil) }
        } else {
            reader = continuation
        }
    }

    @inlinable
    func cancelReader() {
        cancelled = true
        if let reader {
            self.reader = nil
            reader.resume(throwing: CancellationError())
        }
    }

    @inlinable
    func finish(_ error: (any Error)?) {
        guard !ended else { return }
        ended = true
        failure = error
        if let reader, frames.isEmpty {
            self.reader = nil
            wait(reader)
        }
        resumeDrainWaiter(error ?? ChannelError.ioOnClosedChannel)
    }

    // MARK: - The channel's side

    @inlinable
    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    @inlinable
    public func handlerRemoved(context: ChannelHandlerContext) {
        finish(nil)
        self.context = nil
    }

    @inlinable
    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !ended else { return }
        let frame = unwrapInboundIn(data)
        if let reader {
            self.reader = nil
            reader.resume(returning: frame)
        } else {
            frames.append(frame)
        }
    }

    @inlinable
    public func channelInactive(context: ChannelHandlerContext) {
        finish(nil)
        context.fireChannelInactive()
    }

    @inlinable
    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(error)
    }

    @inlinable
    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { resumeDrainWaiter(nil) }
        context.fireChannelWritabilityChanged()
    }

    @inlinable
    public func read(context: ChannelHandlerContext) {
        if frames.count >= limit {
            readHeld = true
        } else {
            context.read()
        }
    }
}

/// A write waited longer than its `drainTimeout` for a peer that reads nothing; the channel
/// was closed.
public struct WriteDrainTimeout: Error, CustomStringConvertible {
    public init() {}
    public var description: String { "the peer read nothing for the write timeout" }
}

