import NIOCore
import NIOSSL
import SMTPProtocol

/// What the framing layer hands to the session.
enum SMTPFrame: Sendable, Equatable {
    /// A command line (or a SASL response line) without its line ending. `paused`: the line
    /// was DATA or STARTTLS, and decoding waits for an `SMTPFramingControl`.
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
    /// Send this reply, then start TLS: whatever the client pipelined after STARTTLS in
    /// plaintext is thrown away, never read as commands (CVE-2011-0411).
    case startTLS(reply: ByteBuffer, context: NIOSSLContext)
    /// Deliver a `.shutdown` frame to the session.
    case shutdown
}

/// Splits the byte stream into command lines and DATA streams, with a hard cap on how much
/// it buffers, and with a read timeout that depends on what it is reading.
///
/// After a line that starts `DATA` or `STARTTLS` it stops decoding until the session, which
/// alone knows whether the command was accepted, sends a `SMTPFramingControl`. Everything the
/// client pipelined meanwhile waits in the buffer.
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
    private let commandTimeout: TimeAmount
    private let dataTimeout: TimeAmount
    private var timer: Scheduled<Void>?
    private var timedOut = false
    private var readHeld = false
    /// While paused, a client that keeps sending fills the buffer; past this, reading stops
    /// until the session catches up.
    static let maxBuffered = 256 * 1024

    init(maxLineLength: Int = SMTPLimits.commandLineWithExtensions, commandTimeout: TimeAmount, dataTimeout: TimeAmount) {
        self.maxLineLength = maxLineLength
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { armTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        armTimer(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffer == nil {
            buffer = incoming
        } else {
            buffer!.writeBuffer(&incoming)
        }
        armTimer(context: context)
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
        decode(context: context)
        // Frames produced here, outside channelRead, reach the session only with a
        // channelReadComplete: NIOAsyncChannel hands reads over in batches at that event.
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
                    context.fireChannelRead(wrapInboundOut(.lineTooLong))
                    continue
                }
                let pauses = Self.pausesFraming(line)
                if pauses { mode = .paused }
                context.fireChannelRead(wrapInboundOut(.line(line, paused: pauses)))
                // RFC 3030: a chunk's bytes follow its BDAT line at once and are read whether
                // or not the command is accepted, so the framing takes the size from the line.
                if let size = Self.chunkSize(line) {
                    mode = .chunk(remaining: size)
                    armTimer(context: context)
                    if size == 0 { finishChunk(context: context) }
                }
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

    /// The chunk size of a well-formed `BDAT size [LAST]` line.
    static func chunkSize(_ line: [UInt8]) -> Int? {
        guard line.count >= 6, line[0] | 0x20 == 0x62, line[1] | 0x20 == 0x64, line[2] | 0x20 == 0x61,
            line[3] | 0x20 == 0x74, line[4] == 0x20,
            case .bdat(let size, _) = try? SMTPCommandParser.parse(line)
        else { return nil }
        return size
    }

    /// DATA and STARTTLS change how the following bytes must be read, so decoding stops
    /// after them until the session has answered.
    static func pausesFraming(_ line: [UInt8]) -> Bool {
        func isVerb(_ verb: String) -> Bool {
            let v = Array(verb.utf8)
            guard line.count >= v.count else { return false }
            for i in 0..<v.count where line[i] | 0x20 != v[i] | 0x20 { return false }
            return line.count == v.count || line[v.count] == 0x20
        }
        return isVerb("DATA") || isVerb("STARTTLS")
    }

    // MARK: - Timeouts

    private func armTimer(context: ChannelHandlerContext) {
        timer?.cancel()
        guard !timedOut else { return }
        let timeout: TimeAmount
        switch mode {
        case .data, .chunk: timeout = dataTimeout
        default: timeout = commandTimeout
        }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: timeout) {
            let (handler, context) = loopBound.value
            handler.timedOut = true
            context.fireChannelRead(handler.wrapInboundOut(.timeout))
            context.fireChannelReadComplete()
        }
    }
}
