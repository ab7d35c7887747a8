import CCrypto
import SMTPProtocol

/// A new DKIM key pair: the private key as PEM (for `key_file`) and the TXT record to
/// publish at `<selector>._domainkey.<domain>`.
/// - SeeAlso: RFC 6376 §3.6.1 (the key record), RFC 8463 §4 (ed25519 public keys: raw 32 bytes)
public enum DKIMKeyGenerator {
    public struct KeyPair: Sendable {
        public var privateKeyPEM: String
        /// `v=DKIM1; k=rsa; p=…`
        public var record: String
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public static func generate(_ algorithm: DKIMKey.Algorithm, rsaBits: Int32 = 2048) throws -> KeyPair {
        let isRSA = algorithm == .rsaSHA256
        guard let ctx = EVP_PKEY_CTX_new_id(isRSA ? EVP_PKEY_RSA : EVP_PKEY_ED25519, nil) else {
            throw Failure(description: "EVP_PKEY_CTX_new_id failed")
        }
        defer { EVP_PKEY_CTX_free(ctx) }
        guard EVP_PKEY_keygen_init(ctx) == 1 else { throw Failure(description: "EVP_PKEY_keygen_init failed") }
        if isRSA, EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, rsaBits) != 1 { throw Failure(description: "cannot set the RSA key size") }
        var key: OpaquePointer?
        guard EVP_PKEY_keygen(ctx, &key) == 1, let key else { throw Failure(description: "key generation failed") }
        defer { EVP_PKEY_free(key) }

        guard let bio = BIO_new(BIO_s_mem()) else { throw Failure(description: "BIO_new failed") }
        defer { BIO_free(bio) }
        guard PEM_write_bio_PrivateKey(bio, key, nil, nil, 0, nil, nil) == 1 else { throw Failure(description: "cannot write the key") }
        var data: UnsafeMutablePointer<CChar>?
        let length = tern_bio_mem_data(bio, &data)
        guard let data, length > 0 else { throw Failure(description: "empty PEM") }
        let pem = String(decoding: UnsafeRawBufferPointer(start: data, count: length), as: UTF8.self)

        let publicKey: [UInt8]
        if isRSA {
            // SubjectPublicKeyInfo DER, as RFC 6376 publishes RSA keys.
            var out: UnsafeMutablePointer<UInt8>?
            let n = i2d_PUBKEY(key, &out)
            guard n > 0, let out else { throw Failure(description: "cannot encode the public key") }
            publicKey = Array(UnsafeBufferPointer(start: out, count: Int(n)))
            CRYPTO_free(out, #fileID, #line)
        } else {
            var raw = [UInt8](repeating: 0, count: 32)
            var n = 32
            guard EVP_PKEY_get_raw_public_key(key, &raw, &n) == 1 else { throw Failure(description: "cannot read the public key") }
            publicKey = Array(raw[0..<n])
        }
        return KeyPair(privateKeyPEM: pem, record: "v=DKIM1; k=\(isRSA ? "rsa" : "ed25519"); p=\(SASLBase64.encode(publicKey))")
    }
}
