import NIOCore
import NIOEmbedded
import NIOPosix
import XCTest

@testable import TernCore

/// The inbox over real loopback connections: a task off the event loop reads what the peer
/// sent, in order, then nil at close; errors, cancellation and backpressure.
final class ChannelInboxTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var server: (any Channel)!
    /// The inbox at the server's end of each accepted connection.
    private let accepted = AsyncStream<ChannelInbox<ByteBuffer>>.makeStream()

    override func setUp() async throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let continuation = accepted.continuation
        server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let inbox = ChannelInbox<ByteBuffer>(channel: channel, limit: 2, drainTimeout: .milliseconds(300))
                    try channel.pipeline.syncOperations.addHandler(inbox)
                    continuation.yield(inbox)
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    override func tearDown() async throws {
        try await server.close()
        try await group.shutdownGracefully()
    }

    private func connect() async throws -> (any Channel, ChannelInbox<ByteBuffer>) {
        let client = try await ClientBootstrap(group: group).connect(to: server.localAddress!).get()
        var inboxes = accepted.stream.makeAsyncIterator()
        let next = await inboxes.next()
        let inbox = try XCTUnwrap(next)
        return (client, inbox)
    }

    private func readAll(_ inbox: ChannelInbox<ByteBuffer>) async throws -> String {
        var text = ""
        while var chunk = try await inbox.next() { text += chunk.readString(length: chunk.readableBytes) ?? "" }
        return text
    }

    func testATaskOffTheLoopReadsEverythingInOrderThenNilAtClose() async throws {
        let (client, inbox) = try await connect()
        for word in ["one ", "two ", "three"] { try await client.writeAndFlush(ByteBuffer(string: word)) }
        try await client.close()
        XCTAssertFalse(inbox.eventLoop.inEventLoop)
        let text = try await readAll(inbox)
        XCTAssertEqual(text, "one two three")
        let again = try await inbox.next()
        XCTAssertNil(again, "nil again after the end")
    }

    func testWritesReachThePeerAndFailOnceClosed() async throws {
        let (client, inbox) = try await connect()
        let (received, arrived) = AsyncStream<String>.makeStream()
        try await client.eventLoop.submit {
            try client.pipeline.syncOperations.addHandler(Collect(arrived))
        }.get()
        try await inbox.write(ByteBuffer(string: "250 ok\r\n"))
        var replies = received.makeAsyncIterator()
        let reply = await replies.next()
        XCTAssertEqual(reply, "250 ok\r\n")
        try await inbox.channel.close()
        do {
            try await inbox.write(ByteBuffer(string: "late"))
            XCTFail("a write on a closed channel succeeded")
        } catch let error as ChannelError {
            XCTAssertEqual(error, .ioOnClosedChannel)
        }
    }

    func testAnErrorComesAfterTheBufferedFramesThenNil() async throws {
        struct Broken: Error {}
        let (client, inbox) = try await connect()
        try await client.writeAndFlush(ByteBuffer(string: "before"))
        // Wait until the bytes are in the inbox, then raise the error behind them.
        while try await inbox.eventLoop.submit({ inbox.frames.isEmpty }).get() { try await Task.sleep(for: .milliseconds(5)) }
        inbox.channel.pipeline.fireErrorCaught(Broken())
        let first = try await inbox.next()
        XCTAssertEqual(first.map { String(buffer: $0) }, "before")
        do {
            _ = try await inbox.next()
            XCTFail("the error was not thrown")
        } catch is Broken {}
        let after = try await inbox.next()
        XCTAssertNil(after)
        try await client.close()
    }

    func testCancellingAWaitingReadEndsIt() async throws {
        let (client, inbox) = try await connect()
        let reader = Task { try await inbox.next() }
        try await Task.sleep(for: .milliseconds(50))
        reader.cancel()
        do {
            _ = try await reader.value
            XCTFail("the cancelled read returned")
        } catch is CancellationError {}
        try await client.close()
    }

    /// A peer that reads nothing: writes go on until the channel is unwritable, then one
    /// waits, and the drain timeout ends that wait and closes the channel.
    func testAWriteToAPeerThatReadsNothingEndsAtTheDrainTimeout() async throws {
        let client = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.so_rcvbuf), value: 4096)
            .channelOption(.autoRead, value: false)
            .connect(to: server.localAddress!).get()
        var inboxes = accepted.stream.makeAsyncIterator()
        let next = await inboxes.next()
        let inbox = try XCTUnwrap(next)
        let chunk = ByteBuffer(repeating: 0x78, count: 64 * 1024)
        var written = 0
        do {
            while written < 1 << 30 {
                try await inbox.write(chunk)
                written += chunk.readableBytes
            }
            XCTFail("a gigabyte went to a peer that reads nothing")
        } catch is WriteDrainTimeout {}
        XCTAssertLessThan(written, 256 << 20, "the writes were held back once the peer's window was full")
        try await inbox.channel.closeFuture.get()
        try? await client.close()
    }

    /// Writes made while more frames wait are held, and go out together before the reader
    /// waits for the next frame (a pipelined group's replies in one write).
    func testHeldWritesGoOutBeforeTheReaderWaits() async throws {
        let channel = EmbeddedChannel()
        let inbox = ChannelInbox<ByteBuffer>(channel: channel)
        try channel.pipeline.syncOperations.addHandler(inbox)
        try await channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 25)).get()
        XCTAssertTrue(try inbox.writeNow(ByteBuffer(string: "250 a\r\n"), flush: false))
        XCTAssertTrue(try inbox.writeNow(ByteBuffer(string: "250 b\r\n"), flush: false))
        XCTAssertNil(try channel.readOutbound(as: ByteBuffer.self), "held while more frames wait")
        let frame: ByteBuffer? = try await withUnsafeThrowingContinuation { continuation in
            inbox.wait(continuation)
            XCTAssertEqual(try? channel.readOutbound(as: ByteBuffer.self), ByteBuffer(string: "250 a\r\n"))
            XCTAssertEqual(try? channel.readOutbound(as: ByteBuffer.self), ByteBuffer(string: "250 b\r\n"))
            try? channel.writeInbound(ByteBuffer(string: "QUIT"))
        }
        XCTAssertEqual(frame, ByteBuffer(string: "QUIT"))
        // A held write that fills the channel's buffer is flushed at once: a writer that
        // then waits for the channel to drain must not wait on bytes never sent.
        channel.isWritable = false
        XCTAssertFalse(try inbox.writeNow(ByteBuffer(string: "250 c\r\n"), flush: false))
        XCTAssertEqual(try channel.readOutbound(as: ByteBuffer.self), ByteBuffer(string: "250 c\r\n"))
        _ = try? channel.finish()
    }

    /// Reads stop while `limit` frames wait, and start again when one is taken.
    func testReadsStopAtTheLimitAndResumeWhenTaken() throws {
        let channel = EmbeddedChannel()
        let counter = ReadCounter()
        let inbox = ChannelInbox<ByteBuffer>(channel: channel, limit: 2)
        try channel.pipeline.syncOperations.addHandlers([counter, inbox])
        channel.read()
        XCTAssertEqual(counter.reads, 1)
        try channel.writeInbound(ByteBuffer(string: "a"))
        try channel.writeInbound(ByteBuffer(string: "b"))
        channel.read()
        XCTAssertEqual(counter.reads, 1, "two frames wait: no read")
        XCTAssertNotNil(inbox.take())
        XCTAssertEqual(counter.reads, 2, "one taken: the held read goes out")
        XCTAssertNotNil(inbox.take())
        XCTAssertNil(inbox.take())
        XCTAssertEqual(counter.reads, 2)
    }
}

private final class ReadCounter: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = ByteBuffer
    var reads = 0
    func read(context: ChannelHandlerContext) {
        reads += 1
        context.read()
    }
}

private final class Collect: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let continuation: AsyncStream<String>.Continuation
    init(_ continuation: AsyncStream<String>.Continuation) { self.continuation = continuation }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        continuation.yield(buffer.readString(length: buffer.readableBytes) ?? "")
    }
}
