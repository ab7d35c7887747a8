import NIOCore
import NIOSSL
import SMTPProtocol
import TernCore

/// What the framing layer hands to the session.
enum SMTPFrame: Sendable, Equatable {
    /// A command line (or a SASL response line) without its line ending. `paused`: the line
    /// may change how the next bytes are read (it starts DATA, BDAT or STARTTLS), and
    /// decoding waits for an `SMTPFramingControl` that says how to go on.
    case line([UInt8], paused: Bool)
    /// A line longer than the limit; its bytes up to the next LF are dropped.
    case lineTooLong
    /// Decoded message bytes (dot-stuffing removed).
    case data([UInt8])
    /// The end of the message (`CRLF.CRLF`), with what the decoder noticed on the way.
    case dataEnd(DataDecoder.Violations)
    /// The last byte of a BDAT chunk has been delivered (as `.data`).
    case chunkEnd
    /// The client sent nothing for the read timeout.
    case timeout
    /// The server is shutting down.
    case shutdown
}

/// Tells the framing layer how to go on after a line that paused it.
enum SMTPFramingControl: Sendable {
    /// Read commands again.
    case readCommands
    /// Read a DATA stream.
    case readData(normalizeBareLineEndings: Bool)
    /// Read this many bytes as a BDAT chunk, then commands again.
    case readChunk(size: Int)
    /// Send this reply, then start TLS: whatever the client pipelined after STARTTLS in
    /// plaintext is thrown away, never read as commands (CVE-2011-0411).
    case startTLS(reply: ByteBuffer, context: NIOSSLContext)
    /// Deliver a `.shutdown` frame to the session.
    case shutdown
}

/// The deadlines the framing gives a client, and the shorter ones it gives while the server is
/// under connection pressure (Postfix's stress mode): then an idle or slow client lets its
/// slot go sooner, and a legitimate one still gets in.
struct FramingTimeouts: Sendable {
    var command: TimeAmount
    var data: TimeAmount
    var stressCommand: TimeAmount
    var stressData: TimeAmount
    /// True while most connection slots are taken.
    var underStress: @Sendable () -> Bool = { false }

    init(command: TimeAmount, data: TimeAmount, stressCommand: TimeAmount? = nil, stressData: TimeAmount? = nil,
         underStress: @escaping @Sendable () -> Bool = { false }) {
        self.command = command
        self.data = data
        self.stressCommand = min(stressCommand ?? command, command)
        self.stressData = min(stressData ?? data, data)
        self.underStress = underStress
    }
}

/// Splits the byte stream into command lines, DATA streams and BDAT chunks, with a hard cap
/// on how much it buffers, and with a deadline that depends on what it is reading.
///
/// The session's state machine alone decides what the next bytes are. After a line whose
/// verb is `DATA`, `BDAT` or `STARTTLS` the framing stops decoding until the session sends a
/// `SMTPFramingControl`: only the machine knows whether that line was a command it accepted,
/// a command it refused, or a SASL response that merely reads like one. Everything the client
/// pipelined meanwhile waits in the buffer.
///
/// Timeouts are deadlines, not idle timers: a command line must be complete within
/// `commandTimeout` of the moment the framing began waiting for it, and a whole DATA stream or
/// BDAT chunk within `dataTimeout`, however the client spreads its bytes. No deadline runs
/// while the framing is paused: then the server, not the client, is the one working.
final class SMTPFramingHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = SMTPFrame
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Mode {
        case command
        case discardingLongLine
        case paused
        case data(DataDecoder)
        /// Inside a BDAT chunk: this many raw bytes still belong to it.
        case chunk(remaining: Int)
    }

    private var mode = Mode.command
    private var buffer: ByteBuffer?
    private let maxLineLength: Int
    private let timeouts: FramingTimeouts
    private var deadline = MovingDeadline()
    private var timedOut = false
    private var readHeld = false
    /// While paused, a client that keeps sending fills the buffer; past this, reading stops
    /// until the session catches up.
    static let maxBuffered = 256 * 1024

    /// Told once per connection when TLS fails (the handshake, a bad record): the handshake
    /// error reaches this handler, which sits after the TLS handler, whether or not the
    /// session is still reading when the connection closes.
    private let onTLSFailure: ((any Error) -> Void)?
    private var tlsFailed = false

    init(
        maxLineLength: Int = SMTPLimits.commandLineWithExtensions, timeouts: FramingTimeouts,
        onTLSFailure: ((any Error) -> Void)? = nil
    ) {
        self.maxLineLength = maxLineLength
        self.timeouts = timeouts
        self.onTLSFailure = onTLSFailure
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A client that closes without close_notify has not failed TLS: many do.
        if let e = error as? NIOSSLError, case .uncleanShutdown = e {
            context.fireErrorCaught(error)
            return
        }
        if !tlsFailed, error is NIOSSLError || error is BoringSSLError {
            tlsFailed = true
            onTLSFailure?(error)
        }
        context.fireErrorCaught(error)
    }

    convenience init(maxLineLength: Int = SMTPLimits.commandLineWithExtensions, commandTimeout: TimeAmount, dataTimeout: TimeAmount) {
        self.init(maxLineLength: maxLineLength, timeouts: FramingTimeouts(command: commandTimeout, data: dataTimeout))
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { armTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        armTimer(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline.cancel()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffer == nil {
            buffer = incoming
        } else {
            buffer!.writeBuffer(&incoming)
        }
        decode(context: context)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard let control = event as? SMTPFramingControl else {
            context.triggerUserOutboundEvent(event, promise: promise)
            return
        }
        switch control {
        case .readCommands:
            mode = .command
        case .readData(let normalize):
            mode = .data(DataDecoder(normalizeBareLineEndings: normalize))
        case .readChunk(let size):
            mode = .chunk(remaining: size)
        case .startTLS(let reply, let sslContext):
            context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
            buffer = nil  // plaintext pipelined after STARTTLS: discarded
            do {
                try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sslContext), position: .first)
            } catch {
                context.close(promise: nil)
            }
            mode = .command
        case .shutdown:
            context.fireChannelRead(wrapInboundOut(.shutdown))
        }
        promise?.succeed()
        armTimer(context: context)
        if case .chunk(0) = mode { finishChunk(context: context) }
        decode(context: context)
        // Frames produced here, outside channelRead, still end a read batch for whatever
        // follows in the pipeline.
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if let buffer, buffer.readableBytes > Self.maxBuffered {
            readHeld = true
        } else {
            context.read()
        }
    }

    private func releaseHeldRead(context: ChannelHandlerContext) {
        guard readHeld, (buffer?.readableBytes ?? 0) <= Self.maxBuffered else { return }
        readHeld = false
        context.read()
    }

    // MARK: - Decoding

    private func decode(context: ChannelHandlerContext) {
        while var buf = buffer, buf.readableBytes > 0 {
            switch mode {
            case .paused:
                releaseHeldRead(context: context)
                return
            case .command, .discardingLongLine:
                let view = buf.readableBytesView
                guard let lf = view.firstIndex(of: 0x0A) else {
                    if case .command = mode, buf.readableBytes > maxLineLength {
                        mode = .discardingLongLine
                        context.fireChannelRead(wrapInboundOut(.lineTooLong))
                    }
                    if case .discardingLongLine = mode { buf.clear() }
                    buffer = buf
                    return
                }
                let lineLength = lf - view.startIndex
                var line = buf.readBytes(length: lineLength)!
                buf.moveReaderIndex(forwardBy: 1)
                buffer = buf
                if case .discardingLongLine = mode {
                    mode = .command
                    continue
                }
                if line.last == 0x0D { line.removeLast() }
                guard line.count <= maxLineLength else {
                    armTimer(context: context)
                    context.fireChannelRead(wrapInboundOut(.lineTooLong))
                    continue
                }
                let pauses = Self.pausesFraming(line)
                if pauses {
                    mode = .paused
                    deadline.clear()
                } else {
                    armTimer(context: context)  // the next line's deadline starts now
                }
                context.fireChannelRead(wrapInboundOut(.line(line, paused: pauses)))
            case .chunk(let remaining):
                let n = min(remaining, buf.readableBytes)
                let bytes = buf.readBytes(length: n)!
                buffer = buf
                mode = .chunk(remaining: remaining - n)
                context.fireChannelRead(wrapInboundOut(.data(bytes)))
                if remaining == n { finishChunk(context: context) }
            case .data(var decoder):
                var output: [UInt8] = []
                output.reserveCapacity(buf.readableBytes)
                let result = buf.withUnsafeReadableBytes { decoder.feed($0, into: &output) }
                if !output.isEmpty { context.fireChannelRead(wrapInboundOut(.data(output))) }
                switch result {
                case .needMoreData:
                    buf.clear()
                    buffer = buf
                    mode = .data(decoder)
                case .end(let consumed):
                    buf.moveReaderIndex(forwardBy: consumed)
                    buffer = buf
                    mode = .command
                    armTimer(context: context)
                    context.fireChannelRead(wrapInboundOut(.dataEnd(decoder.violations)))
                }
            }
        }
        if buffer?.readableBytes == 0 { buffer = nil }
        releaseHeldRead(context: context)
    }

    private func finishChunk(context: ChannelHandlerContext) {
        mode = .command
        armTimer(context: context)
        context.fireChannelRead(wrapInboundOut(.chunkEnd))
    }

    /// DATA, BDAT and STARTTLS may change how the following bytes must be read, so decoding
    /// stops after a line with one of these verbs until the session has decided. The test is
    /// the parser's own for a verb (letters, then a space or the end), so no line the parser
    /// reads as one of these commands gets past it.
    static func pausesFraming(_ line: [UInt8]) -> Bool {
        func isVerb(_ verb: String) -> Bool {
            let v = Array(verb.utf8)
            guard line.count >= v.count else { return false }
            for i in 0..<v.count where line[i] | 0x20 != v[i] | 0x20 { return false }
            return line.count == v.count || line[v.count] == 0x20
        }
        return isVerb("DATA") || isVerb("BDAT") || isVerb("STARTTLS")
    }

    // MARK: - Timeouts

    /// Starts the deadline for what the framing reads next.
    private func armTimer(context: ChannelHandlerContext) {
        guard !timedOut else { return }
        if case .paused = mode {
            deadline.clear()
            return
        }
        let stress = timeouts.underStress()
        let timeout: TimeAmount
        switch mode {
        case .data, .chunk: timeout = stress ? timeouts.stressData : timeouts.data
        default: timeout = stress ? timeouts.stressCommand : timeouts.command
        }
        deadline.set(.now() + timeout) { scheduleTimer(context: context, at: $0) }
    }

    private func scheduleTimer(context: ChannelHandlerContext, at due: NIODeadline) -> Scheduled<Void> {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        return context.eventLoop.scheduleTask(deadline: due) {
            let (handler, context) = loopBound.value
            switch handler.deadline.fired() {
            case .expired:
                handler.timedOut = true
                context.fireChannelRead(handler.wrapInboundOut(.timeout))
                context.fireChannelReadComplete()
            case .later(let due):
                handler.deadline.set(due) { handler.scheduleTimer(context: context, at: $0) }
            case .none:
                break
            }
        }
    }
}
