/// Base64 for SASL exchanges (RFC 4648 §4), strict: padding required, no whitespace.
/// - SeeAlso: RFC 4954 §4
public enum SASLBase64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let reverse: [UInt8: UInt8] = {
        var table: [UInt8: UInt8] = [:]
        for (i, c) in alphabet.enumerated() { table[c] = UInt8(i) }
        return table
    }()

    public static func encode(_ text: String) -> String { encode(Array(text.utf8)) }

    public static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let b0 = bytes[i]
            let b1 = i + 1 < bytes.count ? bytes[i + 1] : 0
            let b2 = i + 2 < bytes.count ? bytes[i + 2] : 0
            out.append(alphabet[Int(b0 >> 2)])
            out.append(alphabet[Int((b0 & 0x03) << 4 | b1 >> 4)])
            out.append(i + 1 < bytes.count ? alphabet[Int((b1 & 0x0F) << 2 | b2 >> 6)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(b2 & 0x3F)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 4 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(chars.count / 4 * 3)
        var i = 0
        while i < chars.count {
            let pad = (chars[i + 2] == UInt8(ascii: "=") ? 1 : 0) + (chars[i + 3] == UInt8(ascii: "=") ? 1 : 0)
            guard pad == 0 || i + 4 == chars.count, !(chars[i + 2] == UInt8(ascii: "=") && chars[i + 3] != UInt8(ascii: "=")) else {
                return nil
            }
            guard let a = reverse[chars[i]], let b = reverse[chars[i + 1]] else { return nil }
            let c = pad >= 2 ? 0 : reverse[chars[i + 2]]
            let d = pad >= 1 ? 0 : reverse[chars[i + 3]]
            guard let c, let d else { return nil }
            out.append(a << 2 | b >> 4)
            if pad < 2 { out.append((b & 0x0F) << 4 | c >> 2) }
            if pad < 1 { out.append((c & 0x03) << 6 | d) }
            i += 4
        }
        return out
    }
}
