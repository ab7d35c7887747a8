/// Makes a value from the network safe for a log line, a stored error or a terminal: every
/// control character (C0, DEL, C1), and the Unicode line and paragraph separators and bidi
/// overrides that reorder or break a line on screen, becomes `\xNN` (or `\u{NNNN}`), so that
/// a value can never end a log line, start a forged one, cut one at a NUL, or send escape
/// sequences to an operator's terminal. Everything else is kept as it is.
/// - SeeAlso: Postfix `printable()` (`src/util/printable.c`), which does the same with `?`.
public enum LogEscape {
    public static func escape(_ text: some StringProtocol) -> String {
        guard text.unicodeScalars.contains(where: needsEscape) else { return String(text) }
        var out = ""
        out.reserveCapacity(text.utf8.count + 8)
        for scalar in text.unicodeScalars {
            if needsEscape(scalar) {
                let hex = String(scalar.value, radix: 16, uppercase: true)
                out += scalar.value < 0x100
                    ? "\\x" + (hex.count < 2 ? "0" + hex : hex)
                    : "\\u{" + hex + "}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    /// Bytes that may not be UTF-8 (a SASL user name, a raw command line).
    public static func escape(bytes: some Collection<UInt8>) -> String {
        escape(String(decoding: bytes, as: UTF8.self))
    }

    static func needsEscape(_ s: Unicode.Scalar) -> Bool {
        switch s.value {
        case 0x00...0x1F, 0x7F...0x9F: return true
        case 0x2028, 0x2029: return true  // line and paragraph separators
        case 0x202A...0x202E, 0x2066...0x2069: return true  // bidi embeddings, overrides, isolates
        default: return false
        }
    }
}
