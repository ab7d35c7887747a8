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
/// peer does not read) suspends the writer until the channel drains.
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

    // Event-loop state below: touched only on `eventLoop`.
    @usableFromInline var context: ChannelHandlerContext?
    @usableFromInline var frames = CircularBuffer<Frame>(initialCapacity: 4)
    @usableFromInline var reader: UnsafeContinuation<Frame?, any Error>?
    @usableFromInline var drainWaiter: UnsafeContinuation<Void, any Error>?
    @usableFromInline var ended = false
    @usableFromInline var failure: (any Error)?
    @usableFromInline var readHeld = false
    @usableFromInline var cancelled = false

    /// - Parameter limit: frames buffered before the inbox stops reading from the socket.
    @inlinable
    public init(channel: any Channel, limit: Int = 8) {
        self.channel = channel
        self.eventLoop = channel.eventLoop
        self.limit = max(1, limit)
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

    /// Writes and flushes `buffer`. Returns once it is handed to the channel, or, when the
    /// channel has stopped being writable, once it is writable again. Throws when the channel
    /// is closed.
    @inlinable
    public func write(_ buffer: ByteBuffer) async throws {
        guard eventLoop.inEventLoop else {
            try await eventLoop.flatSubmit { self.writeOnLoop(buffer) }.get()
            return
        }
        guard let context, context.channel.isActive else { throw ChannelError.ioOnClosedChannel }
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        guard !context.channel.isWritable else { return }
        try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Void, any Error>) in
            // Still on the loop: nothing can have changed since the check above.
            drainWaiter = continuation
        }
    }

    @inlinable
    func writeOnLoop(_ buffer: ByteBuffer) -> EventLoopFuture<Void> {
        guard let context, context.channel.isActive else { return eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
        return context.writeAndFlush(wrapOutboundOut(buffer))
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
        } else if cancelled {
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
        if let drainWaiter {
            self.drainWaiter = nil
            drainWaiter.resume(throwing: error ?? ChannelError.ioOnClosedChannel)
        }
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
        if context.channel.isWritable, let drainWaiter {
            self.drainWaiter = nil
            drainWaiter.resume()
        }
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
