#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import COpenDKIM
import TernCore

/// A failure of libopendkim, with its status code and message.
public struct DKIMError: Error, CustomStringConvertible {
    public var status: Int32
    public var description: String
}

/// The libopendkim library handle, shared by every signature.
///
/// dkim.h: "dkim_init -- initialize a DKIM library context"; the context is released with
/// `dkim_close`, once no handle made from it is alive. Handles made by `dkim_sign` are
/// released with `dkim_free` (see `sign`), which also frees the buffer `dkim_getsighdr_d`
/// returns.
final class DKIMLibrary: @unchecked Sendable {
    let handle: OpaquePointer

    init(signedHeaders: [String], oversignedHeaders: [String]) throws {
        guard let lib = dkim_init(nil, nil) else { throw DKIMError(status: -1, description: "dkim_init failed") }
        handle = lib
        try Self.setList(lib, DKIM_OPTS_SIGNHDRS, signedHeaders)
        try Self.setList(lib, DKIM_OPTS_OVERSIGNHDRS, oversignedHeaders)
    }

    deinit { dkim_close(handle) }

    /// Sets a NULL-terminated list option. The library copies the strings.
    private static func setList(_ lib: OpaquePointer, _ option: Int32, _ names: [String]) throws {
        var pointers: [UnsafeMutablePointer<CChar>?] = names.map { strdup($0) }
        pointers.append(nil)
        defer { for p in pointers { free(p) } }
        // The option's value is the list itself (a `char **`), and its length that pointer's size.
        let status = pointers.withUnsafeMutableBufferPointer {
            dkim_options(lib, DKIM_OP_SETOPT, option, $0.baseAddress, MemoryLayout<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>.size)
        }
        guard status == DKIM_STAT_OK else { throw DKIMError(status: status, description: "dkim_options(\(option)) failed") }
    }
}

/// Signs messages for one key: a signing domain, a selector and a private key.
/// - SeeAlso: RFC 6376 (DKIM), RFC 8463 (ed25519-sha256)
public struct DKIMKey: Sendable {
    public enum Algorithm: String, Sendable, Decodable, CaseIterable {
        case rsaSHA256 = "rsa-sha256"
        case ed25519SHA256 = "ed25519-sha256"

        var code: Int32 { self == .rsaSHA256 ? DKIM_SIGN_RSASHA256 : DKIM_SIGN_ED25519SHA256 }
    }

    public var domain: String
    public var selector: String
    public var algorithm: Algorithm
    /// The PEM private key.
    var pem: [UInt8]

    public init(domain: String, selector: String, algorithm: Algorithm, pem: [UInt8]) {
        self.domain = domain.lowercased()
        self.selector = selector
        self.algorithm = algorithm
        self.pem = pem
    }
}

public enum Canonicalization: String, Sendable, Decodable, CaseIterable {
    case relaxed, simple
    var code: Int32 { self == .relaxed ? DKIM_CANON_RELAXED : DKIM_CANON_SIMPLE }
}

struct DKIMSigner: Sendable {
    let library: DKIMLibrary
    let headerCanon: Canonicalization
    let bodyCanon: Canonicalization

    /// The `DKIM-Signature:` field (with its CRLF) for `message` (CRLF line endings).
    func sign(_ message: [UInt8], key: DKIMKey, jobID: String) throws -> [UInt8] {
        try sign(headers: message, body: [], key: key, jobID: jobID)
    }

    /// Signs the message given as its header section (with the empty line) and its body,
    /// fed to libopendkim one after the other: no joined copy of the message.
    func sign(headers: [UInt8], body: [UInt8], key: DKIMKey, jobID: String) throws -> [UInt8] {
        var status: DKIM_STAT = DKIM_STAT_OK
        var pem = key.pem + [0]
        let handle = pem.withUnsafeMutableBufferPointer { keyBuffer in
            dkim_sign(
                library.handle, jobID, nil, keyBuffer.baseAddress, key.selector, key.domain, headerCanon.code, bodyCanon.code,
                key.algorithm.code, -1, &status)
        }
        guard let handle, status == DKIM_STAT_OK else {
            throw DKIMError(status: status, description: "cannot start a signature for \(key.domain) (status \(status)); is the key valid?")
        }
        defer { dkim_free(handle) }
        for part in [headers, body] where !part.isEmpty {
            // dkim_chunk reads the buffer and copies what it keeps; it never writes to it.
            status = part.withUnsafeBufferPointer { dkim_chunk(handle, UnsafeMutablePointer(mutating: $0.baseAddress), $0.count) }
            guard status == DKIM_STAT_OK else { throw error(handle, status, "dkim_chunk") }
        }
        status = dkim_chunk(handle, nil, 0)
        guard status == DKIM_STAT_OK else { throw error(handle, status, "dkim_chunk(end)") }
        status = dkim_eom(handle, nil)
        guard status == DKIM_STAT_OK else { throw error(handle, status, "dkim_eom") }
        let name = "DKIM-Signature: "
        var value: UnsafeMutablePointer<u_char>?
        var length = 0
        status = dkim_getsighdr_d(handle, name.utf8.count, &value, &length)
        guard status == DKIM_STAT_OK, let value else { throw error(handle, status, "dkim_getsighdr_d") }
        // The header value belongs to the handle; copy it before dkim_free.
        var field = Array(name.utf8)
        field += UnsafeBufferPointer(start: value, count: length)
        // libopendkim folds with a bare LF; a message on the wire folds with CRLF.
        var out: [UInt8] = []
        out.reserveCapacity(field.count + 16)
        for b in field {
            if b == 0x0A, out.last != 0x0D { out.append(0x0D) }
            out.append(b)
        }
        out += [0x0D, 0x0A]
        return out
    }

    private func error(_ handle: OpaquePointer, _ status: DKIM_STAT, _ step: String) -> DKIMError {
        let text = dkim_geterror(handle).map { String(cString: $0) } ?? "status \(status)"
        return DKIMError(status: status, description: "\(step): \(text)")
    }
}
