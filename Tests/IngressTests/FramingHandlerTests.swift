import NIOCore
import NIOEmbedded
import SMTPProtocol
import XCTest

@testable import Ingress

/// Records what reaches the end of the pipeline, and when a read batch completes.
private final class Recorder: ChannelInboundHandler {
    typealias InboundIn = SMTPFrame
    var frames: [SMTPFrame] = []
    var deliveredFrames = 0

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        frames.append(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        deliveredFrames = frames.count
    }
}

final class FramingHandlerTests: XCTestCase {
    private func makeChannel(maxLine: Int = 100) throws -> (EmbeddedChannel, Recorder) {
        let recorder = Recorder()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(
            SMTPFramingHandler(maxLineLength: maxLine, commandTimeout: .seconds(60), dataTimeout: .seconds(60)))
        try channel.pipeline.syncOperations.addHandler(recorder)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, recorder)
    }

    private func write(_ channel: EmbeddedChannel, _ text: String, split: Int = .max) throws {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let end = min(bytes.count, offset + split)
            try channel.writeInbound(ByteBuffer(bytes: bytes[offset..<end]))
            offset = end
        }
    }

    private func line(_ s: String, paused: Bool = false) -> SMTPFrame { .line(Array(s.utf8), paused: paused) }

    func testLinesHoweverSplit() throws {
        for split in [1, 2, 3, 7, .max] {
            let (channel, recorder) = try makeChannel()
            try write(channel, "EHLO a\r\nNOOP\nRSET\r\n", split: split)
            XCTAssertEqual(recorder.frames, [line("EHLO a"), line("NOOP"), line("RSET")], "split \(split)")
        }
    }

    func testOverlongLineIsReportedOnceAndSkipped() throws {
        for split in [1, 50, .max] {
            let (channel, recorder) = try makeChannel(maxLine: 20)
            try write(channel, "NOOP " + String(repeating: "x", count: 200) + "\r\nQUIT\r\n", split: split)
            XCTAssertEqual(recorder.frames, [.lineTooLong, line("QUIT")], "split \(split)")
        }
    }

    func testDataPausesUntilTheSessionAnswers() throws {
        for split in [1, 3, .max] {
            let (channel, recorder) = try makeChannel()
            try write(channel, "DATA\r\nSubject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n", split: split)
            XCTAssertEqual(recorder.frames, [line("DATA", paused: true)], "nothing after DATA is decoded before the answer")
            try channel.triggerUserOutboundEvent(SMTPFramingControl.readData(normalizeBareLineEndings: false)).wait()
            let data = recorder.frames.dropFirst().compactMap { frame -> [UInt8]? in
                if case .data(let d) = frame { return d }
                return nil
            }.flatMap { $0 }
            XCTAssertEqual(String(decoding: data, as: UTF8.self), "Subject: x\r\n\r\n.hi\r\n")
            XCTAssertEqual(recorder.frames.suffix(2), [.dataEnd([]), line("QUIT")])
        }
    }

    /// Regression: a body that arrived before the session's answer to DATA was decoded in
    /// the control event and never delivered, because no channelReadComplete followed.
    func testFramesDecodedOnControlAreDelivered() throws {
        let (channel, recorder) = try makeChannel()
        try write(channel, "DATA\r\nbody\r\n.\r\n")
        XCTAssertEqual(recorder.deliveredFrames, 1)
        try channel.triggerUserOutboundEvent(SMTPFramingControl.readData(normalizeBareLineEndings: false)).wait()
        XCTAssertEqual(recorder.deliveredFrames, recorder.frames.count)
        XCTAssertEqual(recorder.frames.last, .dataEnd([]))
    }

    func testRefusedDataReadsTheRestAsCommands() throws {
        let (channel, recorder) = try makeChannel()
        try write(channel, "DATA\r\nSubject: x\r\n")
        try channel.triggerUserOutboundEvent(SMTPFramingControl.readCommands).wait()
        XCTAssertEqual(recorder.frames, [line("DATA", paused: true), line("Subject: x")])
    }

    func testPausedBufferHoldsReadsPastTheCap() throws {
        let (channel, _) = try makeChannel()
        try write(channel, "DATA\r\n" + String(repeating: "x", count: SMTPFramingHandler.maxBuffered + 10))
        var reads = 0
        final class ReadCounter: ChannelOutboundHandler {
            typealias OutboundIn = Any
            let onRead: () -> Void
            init(_ onRead: @escaping () -> Void) { self.onRead = onRead }
            func read(context: ChannelHandlerContext) {
                onRead()
                context.read()
            }
        }
        try channel.pipeline.syncOperations.addHandler(ReadCounter({ reads += 1 }), position: .first)
        channel.read()
        XCTAssertEqual(reads, 0, "a paused framer with a full buffer asks for no more bytes")
    }
}

final class ChunkFramingTests: XCTestCase {
    /// The framing reads a chunk only when the session says so, with the size the session
    /// took from the command it accepted (or refused): a BDAT line alone never starts one.
    func testChunksAreCountedNotDecodedHoweverSplit() throws {
        // The chunk holds what would be commands and a DATA terminator: all of it is data.
        let chunk = "a\r\n.\r\nQUIT\r\n\n"
        let input = "BDAT \(chunk.utf8.count)\r\n" + chunk + "BDAT 0 LAST\r\nNOOP\r\n"
        for split in [1, 2, 5, .max] {
            let recorder = Recorder2()
            let channel = EmbeddedChannel()
            try channel.pipeline.syncOperations.addHandler(
                SMTPFramingHandler(commandTimeout: .seconds(60), dataTimeout: .seconds(60)))
            try channel.pipeline.syncOperations.addHandler(recorder)
            let bytes = Array(input.utf8)
            var offset = 0
            var answered = 0
            // Plays the session: each paused BDAT line is answered with its size.
            func answer() throws {
                while answered < recorder.frames.count {
                    let frame = recorder.frames[answered]
                    answered += 1
                    if case .line(let l, paused: true) = frame {
                        let size = Int(String(decoding: l, as: UTF8.self).split(separator: " ")[1])!
                        try channel.triggerUserOutboundEvent(SMTPFramingControl.readChunk(size: size)).wait()
                    }
                }
            }
            while offset < bytes.count {
                let end = min(bytes.count, offset + split)
                try channel.writeInbound(ByteBuffer(bytes: bytes[offset..<end]))
                offset = end
                try answer()
            }
            var data: [UInt8] = []
            var shape: [String] = []
            for frame in recorder.frames {
                switch frame {
                case .data(let d): data += d
                case .line(let l, _): shape.append(String(decoding: l, as: UTF8.self))
                case .chunkEnd: shape.append("<end>")
                default: shape.append("\(frame)")
                }
            }
            XCTAssertEqual(String(decoding: data, as: UTF8.self), chunk, "split \(split)")
            XCTAssertEqual(shape, ["BDAT \(chunk.utf8.count)", "<end>", "BDAT 0 LAST", "<end>", "NOOP"], "split \(split)")
        }
    }

    /// Regression: a SASL response that reads `BDAT 0` made the framing start a chunk on its
    /// own while the session was in AUTH, and the session aborted the process on the frame.
    func testABDATLineWaitsForTheSession() throws {
        let recorder = Recorder2()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(SMTPFramingHandler(commandTimeout: .seconds(60), dataTimeout: .seconds(60)))
        try channel.pipeline.syncOperations.addHandler(recorder)
        try channel.writeInbound(ByteBuffer(string: "BDAT 0\r\nNOOP\r\n"))
        XCTAssertEqual(recorder.frames, [.line(Array("BDAT 0".utf8), paused: true)])
        try channel.triggerUserOutboundEvent(SMTPFramingControl.readCommands).wait()
        XCTAssertEqual(recorder.frames, [.line(Array("BDAT 0".utf8), paused: true), .line(Array("NOOP".utf8), paused: false)])
    }

    func testVerbsThatPause() {
        for line in ["DATA", "data", "BDAT 5", "bdat x", "STARTTLS", "StartTLS now"] {
            XCTAssertTrue(SMTPFramingHandler.pausesFraming(Array(line.utf8)), line)
        }
        for line in ["DATAX", "BDATE 5", "NOOP", "", "STARTTLSX", "MAIL FROM:<data@x>"] {
            XCTAssertFalse(SMTPFramingHandler.pausesFraming(Array(line.utf8)), line)
        }
    }
}

private final class Recorder2: ChannelInboundHandler {
    typealias InboundIn = SMTPFrame
    var frames: [SMTPFrame] = []
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { frames.append(unwrapInboundIn(data)) }
}
