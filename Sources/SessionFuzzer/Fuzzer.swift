#if FUZZING
import NIOCore
import NIOEmbedded
import SMTPProtocol
import TernCore
@testable import Ingress

/// libFuzzer entry point for the server session: arbitrary client bytes, split at arbitrary
/// places, through the real `SMTPFramingHandler` on an `EmbeddedChannel` and the real
/// `SessionStateMachine`, driven as `SMTPSession` drives them (the same `framing(after:)`
/// decision; controls reach the framing after the read, as the session's do).
///
/// It traps when the framing and the machine disagree (message bytes outside a transfer, a
/// command line inside one, a transfer started by a line that did not pause the framing), when
/// a paused line gets no control, or when a command gets no reply or two before the next.
/// Built with `-sanitize=fuzzer` by `scripts/fuzz`.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    let input = Array(UnsafeRawBufferPointer(start: start, count: count))
    guard input.count >= 2 else { return 0 }
    SessionHarness(setup: input[0], split: Int(input[1] % 16) + 1).run(Array(input[2...]))
    return 0
}

/// Plays `SMTPSession` on one embedded channel. The AUTH password "secret" is the good one.
final class SessionHarness: ChannelInboundHandler {
    typealias InboundIn = SMTPFrame

    private enum Transfer: Equatable {
        case none
        case data
        case chunk(last: Bool, refusal: SMTPReply?)
    }

    private var machine: SessionStateMachine
    private var transfer = Transfer.none
    private var controls: [SMTPFramingControl] = []
    /// Replies still owed to the last command line.
    private var owed = 0
    /// The last line paused the framing and no control has answered it yet.
    private var pausedUnanswered = false
    private let split: Int
    private let channel = EmbeddedChannel()
    /// Filters refuse every other command they are asked about.
    private var checks = 0

    init(setup: UInt8, split: Int) {
        let kinds: [ListenerKind] = [.smtp, .submission, .smtps]
        let policy = SessionPolicy(
            kind: kinds[Int(setup & 3) % 3], hostname: "fuzz.test", tlsAvailable: setup & 4 != 0,
            authAvailable: setup & 8 != 0, maxMessageSize: 4096, maxRecipients: 5, maxErrors: Int(setup >> 6) + 3,
            commandFilters: setup & 32 != 0, allowedSenders: [:], bareLineEndings: setup & 16 != 0 ? .normalize : .reject)
        machine = SessionStateMachine(policy: policy, trusted: setup & 1 == 0, tlsActive: setup & 2 != 0)
        self.split = split
    }

    func run(_ bytes: [UInt8]) {
        try! channel.pipeline.syncOperations.addHandler(
            SMTPFramingHandler(maxLineLength: 200, commandTimeout: .hours(1), dataTimeout: .hours(1)))
        try! channel.pipeline.syncOperations.addHandler(self)
        var offset = 0
        while offset < bytes.count, !machine.isClosed {
            let end = min(bytes.count, offset + split)
            try! channel.writeInbound(ByteBuffer(bytes: bytes[offset..<end]))
            offset = end
            // The session's controls reach the event loop after the read that caused them.
            while !controls.isEmpty, !machine.isClosed {
                let control = controls.removeFirst()
                try! channel.triggerUserOutboundEvent(control).wait()
            }
        }
        if !machine.isClosed, transfer == .none {
            precondition(!pausedUnanswered, "a paused line got no control: the session would stall")
            precondition(owed == 0, "a command got no reply")
        }
        _ = try? channel.finish()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !machine.isClosed else { return }
        switch unwrapInboundIn(data) {
        case .line(let line, let paused):
            precondition(transfer == .none, "a command line inside a transfer")
            precondition(owed == 0, "a command line before the previous one was answered")
            precondition(!pausedUnanswered, "a line decoded while the framing waited for a control")
            owed = 1
            pausedUnanswered = paused
            carryOut(machine.line(line))
        case .lineTooLong:
            precondition(transfer == .none, "an over-long line inside a transfer")
            owed = 1
            carryOut(machine.lineTooLong())
        case .data:
            precondition(transfer != .none, "message bytes outside DATA or BDAT")
        case .dataEnd:
            precondition(transfer == .data, "end of DATA outside DATA")
            transfer = .none
            owed = 1
            carryOut(machine.dataEnded(.queued("FUZZ")))
        case .chunkEnd:
            guard case .chunk(let last, let refusal) = transfer else { preconditionFailure("end of a chunk outside BDAT") }
            transfer = .none
            owed = 1
            if let refusal {
                answered(refusal)
            } else {
                carryOut(last ? machine.dataEnded(.queued("FUZZ")) : machine.chunkReceived(size: 0))
            }
        case .timeout, .shutdown:
            break
        }
    }

    private func answered(_ reply: SMTPReply) {
        precondition(owed == 1, "two replies to one command")
        owed = 0
    }

    private func carryOut(_ action: SessionStateMachine.Action) {
        let next = SessionStateMachine.framing(after: action)
        if !pausedUnanswered {
            switch next {
            case .commands, .closed: break
            case .data, .chunk, .tls: preconditionFailure("\(action) after a line that did not pause the framing")
            }
        }
        switch action {
        case .reply(let reply), .close(let reply), .replyThenClose(let reply, _):
            answered(reply)
        case .startTLS(let reply):
            answered(reply)
            machine.tlsEstablished()
        case .beginData(let reply, _):
            answered(reply)
            transfer = .data
        case .verifyCredentials(let user, let password):
            resume(next)
            carryOut(machine.authChecked(user: user, success: password == "secret"))
            return
        case .checkCommand:
            resume(next)
            checks += 1
            carryOut(machine.filterChecked(refusal: checks % 2 == 0 ? SMTPReply(550, .deliveryNotAuthorized, "no") : nil))
            return
        case .receiveChunk(_, let last, _, _):
            transfer = .chunk(last: last, refusal: nil)
        case .discardChunk(let reply, _):
            transfer = .chunk(last: false, refusal: reply)
        }
        resume(next)
    }

    private func resume(_ next: SessionStateMachine.NextFraming) {
        guard pausedUnanswered else { return }
        pausedUnanswered = false
        switch next {
        case .commands, .tls: controls.append(.readCommands)  // no TLS here: the machine's side only
        case .data(let normalize): controls.append(.readData(normalizeBareLineEndings: normalize))
        case .chunk(let size): controls.append(.readChunk(size: size))
        case .closed: break
        }
    }
}

// SwiftPM links an executable's entry point as `<Target>_main`; with -parse-as-library there
// is none, so this one hands control to libFuzzer's driver.
@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafeRawPointer, Int) -> CInt
) -> CInt

@_cdecl("SessionFuzzer_main")
public func fuzzerMain(
    _ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
) -> CInt {
    var count = argc
    var vector = argv
    return runFuzzerDriver(&count, &vector) { fuzz($0, $1) }
}

#else
/// An ordinary build (`swift build`) gets a stub: the fuzzer needs libFuzzer's runtime.
@main
struct FuzzerStub {
    static func main() {
        print("SessionFuzzer: build it with scripts/fuzz, which links libFuzzer")
    }
}
#endif
