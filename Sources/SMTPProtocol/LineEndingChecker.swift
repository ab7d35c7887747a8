/// Checks raw message bytes (a BDAT chunk) for bare CR, bare LF and NUL, and optionally
/// turns each bare CR or LF into CRLF. Unlike `DataDecoder` it knows nothing of dots or of
/// an end: BDAT chunks are counted, not terminated. A CR at the end of one chunk is kept
/// pending until the next shows whether an LF follows.
/// - SeeAlso: RFC 3030 §2, RFC 5321 §2.3.8
public struct LineEndingChecker: Sendable {
    public private(set) var violations: DataDecoder.Violations = []
    public let normalizeBareLineEndings: Bool
    private var pendingCR = false

    public init(normalizeBareLineEndings: Bool = false) {
        self.normalizeBareLineEndings = normalizeBareLineEndings
    }

    public mutating func feed(_ input: UnsafeRawBufferPointer, into output: inout [UInt8]) {
        for b in input {
            if pendingCR {
                pendingCR = false
                if b == 0x0A {
                    output.append(contentsOf: [0x0D, 0x0A])
                    continue
                }
                bare(.bareCR, into: &output)
            }
            switch b {
            case 0x0D: pendingCR = true
            case 0x0A: bare(.bareLF, into: &output)
            case 0x00:
                violations.insert(.nul)
                output.append(b)
            default: output.append(b)
            }
        }
    }

    /// Ends the message: a CR left pending is bare.
    public mutating func finish(into output: inout [UInt8]) {
        if pendingCR {
            pendingCR = false
            bare(.bareCR, into: &output)
        }
    }

    private mutating func bare(_ kind: DataDecoder.Violations, into output: inout [UInt8]) {
        violations.insert(kind)
        if normalizeBareLineEndings {
            output.append(contentsOf: [0x0D, 0x0A])
        } else {
            output.append(kind == .bareCR ? 0x0D : 0x0A)
        }
    }
}
