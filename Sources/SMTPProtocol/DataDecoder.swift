#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Decodes the DATA stream: removes dot-stuffing and finds the end of data.
///
/// End of data is only `CRLF "." CRLF` (the start of DATA counts as a CRLF). A bare LF or bare
/// CR is never a line end: `LF . LF`, `CR . CR` and their mixtures are message text, so what
/// Tern reads as the end is what every later hop reads as the end (the SMTP-smuggling class
/// of bug, CVE-2023-51764/51765/51766). Bare line endings and NULs are recorded in
/// `violations` for the session to reject; with `normalizeBareLineEndings` each bare CR or LF
/// is written out as CRLF instead, as Postfix's `smtpd_forbid_bare_newline = normalize` does.
/// - SeeAlso: RFC 5321 §4.1.1.4, §4.5.2
public struct DataDecoder: Sendable {
    public struct Violations: OptionSet, Hashable, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let bareLF = Violations(rawValue: 1 << 0)
        public static let bareCR = Violations(rawValue: 1 << 1)
        public static let nul = Violations(rawValue: 1 << 2)
    }

    public enum Result: Equatable, Sendable {
        /// All input consumed; the end of data was not among it.
        case needMoreData
        /// The end of data was found; `consumed` bytes of the input belonged to the message
        /// and its terminator, the rest belongs to whatever the client sent next.
        case end(consumed: Int)
    }

    private enum State {
        /// After CRLF (or at the start): a dot here is stuffing or the end.
        case lineStart
        /// Saw a dot at line start.
        case dot
        /// Saw dot, CR at line start.
        case dotCR
        /// Inside a line.
        case text
        /// Saw CR inside a line.
        case textCR
    }

    private var state = State.lineStart
    public private(set) var violations: Violations = []
    public let normalizeBareLineEndings: Bool

    public init(normalizeBareLineEndings: Bool = false) {
        self.normalizeBareLineEndings = normalizeBareLineEndings
    }

    private static let cr: UInt8 = 0x0D
    private static let lf: UInt8 = 0x0A
    private static let dotByte: UInt8 = 0x2E
    private static let crlf: [UInt8] = [0x0D, 0x0A]

    /// Feeds input and appends the decoded message bytes to `output`.
    public mutating func feed(_ input: UnsafeRawBufferPointer, into output: inout [UInt8]) -> Result {
        var i = 0
        let n = input.count
        while i < n {
            let b = input[i]
            i += 1
            switch state {
            case .lineStart:
                if b == Self.dotByte {
                    state = .dot
                } else {
                    state = .text
                    i -= 1  // reprocess as text
                }
            case .dot:
                if b == Self.cr {
                    state = .dotCR
                } else {
                    // A stuffed dot: drop it, and treat this byte as the line's first text.
                    state = .text
                    i -= 1
                }
            case .dotCR:
                if b == Self.lf { return .end(consumed: i) }
                // ".<CR>x": the dot was stuffing; the CR is bare.
                bareLineEnding(.bareCR, into: &output)
                state = .text
                i -= 1
            case .text:
                // Fast path: the clean lines from here on are copied in one piece.
                let start = i - 1
                let end = Self.cleanRun(input, from: start)
                if end > start {
                    output.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[start..<end]))
                    i = end
                    continue
                }
                if b == Self.cr {
                    state = .textCR
                } else if b == Self.lf {
                    bareLineEnding(.bareLF, into: &output)
                } else {  // NUL
                    violations.insert(.nul)
                    output.append(b)
                }
            case .textCR:
                if b == Self.lf {
                    output.append(contentsOf: Self.crlf)
                    state = .lineStart
                } else {
                    bareLineEnding(.bareCR, into: &output)
                    state = .text
                    i -= 1
                }
            }
        }
        return .needMoreData
    }

    /// Where the run of plain message text that starts at `start` ends: text without CR, LF
    /// or NUL, and whole lines with it whose CRLF is followed by anything but a dot or the
    /// end of the input. Everything up to the returned index is copied as it is and leaves the
    /// decoder inside a line; the byte at the index (if any) is for the state machine. The
    /// scanning is `memchr`'s (vectorised), not a loop over each byte.
    static func cleanRun(_ input: UnsafeRawBufferPointer, from start: Int) -> Int {
        guard let base = input.baseAddress else { return start }
        let n = input.count
        var j = start
        while j < n {
            let crAt = memchr(base + j, Int32(Self.cr), n - j).map { base.distance(to: UnsafeRawPointer($0)) } ?? n
            // Up to the CR (or the end), the line must hold no LF and no NUL.
            if let bad = firstLFOrNUL(base, j, crAt) { return bad }
            guard crAt + 2 < n, input[crAt + 1] == Self.lf, input[crAt + 2] != Self.dotByte else { return crAt }
            j = crAt + 2
        }
        return n
    }

    private static func firstLFOrNUL(_ base: UnsafeRawPointer, _ from: Int, _ to: Int) -> Int? {
        guard to > from else { return nil }
        let lfAt = memchr(base + from, Int32(Self.lf), to - from).map { base.distance(to: UnsafeRawPointer($0)) }
        let limit = lfAt ?? to
        let nulAt = limit > from ? memchr(base + from, 0, limit - from).map { base.distance(to: UnsafeRawPointer($0)) } : nil
        return nulAt ?? lfAt
    }

    /// A bare CR or LF stays inside the line as far as the end of data is concerned: the
    /// next byte is text, never stuffing nor the terminator.
    private mutating func bareLineEnding(_ kind: Violations, into output: inout [UInt8]) {
        violations.insert(kind)
        if normalizeBareLineEndings {
            output.append(contentsOf: Self.crlf)
        } else {
            output.append(kind == .bareCR ? Self.cr : Self.lf)
        }
        state = .text
    }
}

/// Dot-stuffing for the sending side: a line that starts with "." gets another.
/// - SeeAlso: RFC 5321 §4.5.2
public struct DotStuffer: Sendable {
    private var atLineStart: Bool

    public init() { atLineStart = true }

    /// Appends `input` to `output` with stuffing; the caller appends `CRLF . CRLF` at the end
    /// (after a CRLF if the message did not end with one: see `terminator`).
    public mutating func stuff(_ input: UnsafeRawBufferPointer, into output: inout [UInt8]) {
        guard let base = input.baseAddress, !input.isEmpty else { return }
        let n = input.count
        // Whole lines are copied at once; only a dot right after a line feed adds a byte.
        var start = 0
        if atLineStart, input[0] == 0x2E { output.append(0x2E) }
        while start < n {
            guard let found = memchr(base + start, 0x0A, n - start) else {
                output.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[start..<n]))
                break
            }
            let lf = base.distance(to: UnsafeRawPointer(found))
            output.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[start...lf]))
            if lf + 1 < n, input[lf + 1] == 0x2E { output.append(0x2E) }
            start = lf + 1
        }
        atLineStart = input[n - 1] == 0x0A
    }

    /// What ends the data: `.CRLF`, preceded by a CRLF when the message did not end with one.
    public var terminator: [UInt8] { atLineStart ? [0x2E, 0x0D, 0x0A] : [0x0D, 0x0A, 0x2E, 0x0D, 0x0A] }
}
