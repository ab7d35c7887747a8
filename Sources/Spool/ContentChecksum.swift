/// A 64-bit checksum of a message's content and envelope, kept in its slot's trailer.
///
/// A slot is rewritten in place, so a commit cut short by a power loss can leave the new
/// trailer on disk over blocks of the message the slot held before. Recovery tells the two
/// apart by this sum. It guards against torn writes and damage, not against an adversary:
/// one multiply-rotate round per 8 bytes, then a final avalanche (the shape of xxHash's
/// single lane), a few GB/s on one core. Fed in pieces of any size, it gives the same
/// result as fed at once.
struct ContentChecksum: Sendable, Equatable {
    private static let prime1: UInt64 = 0x9E37_79B1_85EB_CA87
    private static let prime2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    private static let prime3: UInt64 = 0x1656_67B1_9E37_79F9

    private var state: UInt64 = 0x27D4_EB2F_1656_67C5
    /// Bytes not yet a whole word, little-endian, low bytes first.
    private var partial: UInt64 = 0
    private var partialCount = 0
    private var length: UInt64 = 0

    @inline(__always)
    private static func round(_ state: UInt64, _ word: UInt64) -> UInt64 {
        let mixed = state &+ word &* prime2
        return ((mixed << 31) | (mixed >> 33)) &* prime1
    }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        let count = bytes.count
        length &+= UInt64(count)
        var i = 0
        // Finish a word begun by the previous piece.
        while partialCount > 0, partialCount < 8, i < count {
            partial |= UInt64(bytes[i]) << (8 * UInt64(partialCount))
            partialCount += 1
            i += 1
        }
        if partialCount == 8 {
            state = Self.round(state, partial)
            partial = 0
            partialCount = 0
        }
        var s = state
        while i + 8 <= count {
            s = Self.round(s, UInt64(littleEndian: base.loadUnaligned(fromByteOffset: i, as: UInt64.self)))
            i += 8
        }
        state = s
        while i < count {
            partial |= UInt64(bytes[i]) << (8 * UInt64(partialCount))
            partialCount += 1
            i += 1
        }
    }

    mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    mutating func update(_ bytes: ArraySlice<UInt8>) {
        bytes.withUnsafeBytes { update($0) }
    }

    var value: UInt64 {
        var h = partialCount > 0 ? Self.round(state, partial ^ (UInt64(partialCount) << 59)) : state
        h ^= length &* Self.prime3
        h ^= h >> 33
        h &*= Self.prime2
        h ^= h >> 29
        h &*= Self.prime3
        h ^= h >> 32
        return h
    }
}
