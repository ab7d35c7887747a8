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
                // Fast path: copy a run of ordinary bytes at once.
                var j = i - 1
                while j < n {
                    let c = input[j]
                    if c == Self.cr || c == Self.lf || c == 0 { break }
                    j += 1
                }
                if j > i - 1 {
                    output.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[(i - 1)..<j]))
                    i = j
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
