#if FUZZING
import Delivery
import SMTPProtocol
import Transports

/// libFuzzer entry point for the SMTP client: arbitrary server bytes, cut into lines, through
/// the reply parser and `SMTPClientStateMachine`, which offers a message whenever it is ready.
///
/// It traps when the machine reports a recipient delivered without having sent the content
/// (`.sendContent`) and then read a reply, when a message's verdicts do not match its
/// recipients, or when any step crashes. Built with `-sanitize=fuzzer` by `scripts/fuzz`.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    let input = Array(UnsafeRawBufferPointer(start: start, count: count))
    guard let setup = input.first else { return 0 }
    let policies: [TLSPolicy] = [.none, .may, .encrypt, .verify]
    var machine = SMTPClientStateMachine(
        heloName: "relay.test", tlsPolicy: policies[Int(setup & 3)],
        credentials: setup & 4 != 0 ? ClientCredentials(user: "u", password: "p") : nil,
        ownHostname: setup & 16 != 0 ? "relay.test" : nil)
    let message = OutboundMessage(
        sender: "app@client.test",
        recipients: [.init(address: "a@example.org"), .init(address: "b@example.org")], size: 100)
    var parser = SMTPReplyParser()
    var contentSent = false
    var offered = false
    for line in input.dropFirst().split(separator: 0x0A, omittingEmptySubsequences: false) {
        if machine.isReady, !offered {
            offered = true
            contentSent = false
            check(machine.send(message), &machine, &contentSent, &offered)
        }
        let text = Substring(String(decoding: line.last == 0x0D ? line.dropLast() : line[...], as: UTF8.self))
        let reply: SMTPReply?
        do {
            reply = try parser.feed(line: text)
        } catch {
            // The connection drops a server that sends what is not a reply.
            check(machine.connectionFailed(stage: .mail, .protocolError("bad reply")), &machine, &contentSent, &offered)
            return 0
        }
        guard let reply else { continue }
        check(machine.reply(reply), &machine, &contentSent, &offered)
    }
    return 0
}

private func check(
    _ action: SMTPClientStateMachine.Action, _ machine: inout SMTPClientStateMachine, _ contentSent: inout Bool, _ offered: inout Bool
) {
    switch action {
    case .sendContent:
        contentSent = true
    case .startTLS:
        check(machine.tlsEstablished(), &machine, &contentSent, &offered)
    case .messageDone(let verdicts, _), .close(_, let verdicts):
        guard !verdicts.isEmpty else { return }
        precondition(verdicts.count == 2, "verdicts for \(verdicts.count) of 2 recipients")
        for verdict in verdicts {
            if case .delivered = verdict { precondition(contentSent, "delivered without sending the content") }
        }
        offered = false
    case .send, .sendSASL, .wait, .sendEmptyContent:
        break
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

@_cdecl("ClientFuzzer_main")
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
        print("ClientFuzzer: build it with scripts/fuzz, which links libFuzzer")
    }
}
#endif
