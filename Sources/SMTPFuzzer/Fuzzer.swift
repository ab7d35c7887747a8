import SMTPProtocol

#if FUZZING

/// libFuzzer entry point: any bytes through the command parser, the reply parser and the
/// DATA decoder. A crash, a trap or a hang is a bug; a thrown SMTPParseError is the right answer.
/// Built with `-sanitize=fuzzer` by `scripts/fuzz`.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    let bytes = UnsafeRawBufferPointer(start: start, count: count)
    for line in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
        let command = try? SMTPCommandParser.parse(line.last == 0x0D ? line.dropLast() : line[...])
        if let command {
            // What we parse we must be able to write back and parse again to the same thing.
            let again = try? SMTPCommandParser.parse(Array(command.encoded.utf8.dropLast(2)))
            if case .auth = command {} else if case .help = command {} else if again == nil {
                fatalError("re-encoded command does not parse: \(command.encoded)")
            }
        }
        var replies = SMTPReplyParser()
        _ = try? replies.feed(line: Substring(String(decoding: line, as: UTF8.self)))
    }
    var decoder = DataDecoder()
    var out: [UInt8] = []
    _ = decoder.feed(bytes, into: &out)
    return 0
}

// SwiftPM links an executable's entry point as `<Target>_main`; with -parse-as-library there
// is none, so this one hands control to libFuzzer's driver.
@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafeRawPointer, Int) -> CInt
) -> CInt

@_cdecl("SMTPFuzzer_main")
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
        print("SMTPFuzzer: build it with scripts/fuzz, which links libFuzzer")
    }
}
#endif
