/// Counts the `Received:` header fields of a message as its bytes stream past, without
/// holding the message: each relay adds one, so their number is the message's hop count
/// (RFC 5321 §6.3). It looks only at the header section and stops at the first empty line.
/// - SeeAlso: Postfix `hopcount_limit` (cleanup), RFC 5321 §6.3
public struct HopCounter: Sendable {
    public private(set) var received = 0
    private var inHeaders = true
    /// Bytes seen of the current line; only the first nine are compared.
    private var column = 0
    /// The line so far reads `received:` (in any case).
    private var matches = true
    /// The line has a byte other than CR: an empty line (CRLF or LF) ends the header section.
    private var hasContent = false

    private static let name = Array("received:".utf8)

    public init() {}

    /// Takes an array, not any collection: a generic entry point is not specialised across
    /// the module boundary, and went through the collection's witness table for each byte.
    public mutating func feed(_ bytes: [UInt8]) {
        guard inHeaders else { return }
        for byte in bytes {
            if byte == 0x0A {
                guard hasContent else {
                    inHeaders = false
                    return
                }
                column = 0
                matches = true
                hasContent = false
                continue
            }
            if byte != 0x0D { hasContent = true }
            if column < Self.name.count, matches {
                if byte | 0x20 != Self.name[column] {
                    matches = false
                } else if column == Self.name.count - 1 {
                    received += 1
                }
            }
            column += 1
        }
    }
}
