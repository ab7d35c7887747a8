import NIOCore
import SMTPProtocol
import TernCore

/// A reply line from the server, with the TLS generation it arrived in: lines that arrived
/// before a STARTTLS handshake belong to generation 0 and are never read as replies after it.
struct ReplyLine: Sendable, Equatable {
    var bytes: [UInt8]
    var generation: Int
}

/// The SMTP client's framing: splits the server's bytes into reply lines, each at most
/// `SMTPLimits.maxReplyLine` long, and holds the deadline for the next reply.
///
/// The deadline is not an idle timer. It starts when Tern writes (a command: its reply is due)
/// or when a reply is complete (the next one of a pipelined group is due), and bytes that do
/// not complete a reply do not move it: a server that dribbles a reply a byte at a time is cut
/// off when the reply's time is up. `SetTimeout` changes the length for what follows (the
/// data timeout for the reply to the final dot) and starts a deadline at once.
///
/// At STARTTLS (`discardPlaintext`) whatever the server sent after its `220` and before the
/// handshake is thrown away, buffered bytes and decoded lines alike: the client-side twin of
/// the CVE-2011-0411 injection.
final class ReplyFramer: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ReplyLine
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// A reply did not arrive whole within its deadline.
    struct Timeout: Error {}
    /// A reply line longer than the limit.
    struct LineTooLong: Error {}
    /// Sets the deadline's length from now on, and starts one.
    struct SetTimeout: Sendable { var timeout: TimeAmount }

    private var timeout: TimeAmount
    private var deadline = MovingDeadline()
    private var buffer: ByteBuffer?
    private var generation = 0
    private var failed = false

    init(timeout: TimeAmount) { self.timeout = timeout }

    /// Drops every byte and line received so far; later lines carry the next generation.
    /// Call on the event loop, right before the TLS handler goes in.
    func discardPlaintext() {
        buffer = nil
        generation += 1
    }

    // MARK: - Events

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context)  // the greeting is due
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancel()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        var incoming = unwrapInboundIn(data)
        if buffer == nil {
            buffer = incoming
        } else {
            buffer!.writeBuffer(&incoming)
        }
        decode(context: context)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        arm(context)  // what we send now is answered within the deadline
        context.write(data, promise: promise)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard let set = event as? SetTimeout else {
            context.triggerUserOutboundEvent(event, promise: promise)
            return
        }
        timeout = set.timeout
        arm(context)
        promise?.succeed()
    }

    // MARK: - Decoding

    private func decode(context: ChannelHandlerContext) {
        while var buf = buffer {
            guard let lf = buf.readableBytesView.firstIndex(of: 0x0A) else {
                if buf.readableBytes > SMTPLimits.maxReplyLine { fail(context, LineTooLong()) }
                return
            }
            guard var line = buf.readBytes(length: lf - buf.readerIndex) else { return }
            buf.moveReaderIndex(forwardBy: 1)
            buffer = buf.readableBytes > 0 ? buf : nil
            if line.last == 0x0D { line.removeLast() }
            guard line.count <= SMTPLimits.maxReplyLine else {
                fail(context, LineTooLong())
                return
            }
            // The last line of a reply (`ddd text` or `ddd`) makes the next reply due.
            if line.count == 3 || (line.count > 3 && line[3] != UInt8(ascii: "-")) { arm(context) }
            context.fireChannelRead(wrapInboundOut(ReplyLine(bytes: line, generation: generation)))
        }
    }

    private func fail(_ context: ChannelHandlerContext, _ error: any Error) {
        failed = true
        buffer = nil
        cancel()
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }

    // MARK: - Deadline

    private func cancel() {
        deadline.cancel()
    }

    private func arm(_ context: ChannelHandlerContext) {
        guard !failed else { return }
        deadline.set(.now() + timeout) { schedule(context, at: $0) }
    }

    private func schedule(_ context: ChannelHandlerContext, at due: NIODeadline) -> Scheduled<Void> {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        return context.eventLoop.scheduleTask(deadline: due) {
            let (handler, context) = bound.value
            switch handler.deadline.fired() {
            case .expired: handler.fail(context, Timeout())
            case .later(let due): handler.deadline.set(due) { handler.schedule(context, at: $0) }
            case .none: break
            }
        }
    }
}
