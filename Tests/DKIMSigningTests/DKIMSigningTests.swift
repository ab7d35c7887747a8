import TernCore
import XCTest

@testable import DKIMSigning

final class DKIMSigningTests: XCTestCase {
    func testFromDomain() {
        XCTAssertEqual(DKIMSigningFilter.fromDomain("Someone <App@Mail.Example.COM>"), "mail.example.com")
        XCTAssertEqual(DKIMSigningFilter.fromDomain("app@example.com"), "example.com")
        XCTAssertEqual(DKIMSigningFilter.fromDomain("a@one.example, b@two.example"), "one.example")
        XCTAssertEqual(DKIMSigningFilter.fromDomain("\"Quoted, Name\" <x@q.example>"), "q.example")
        XCTAssertNil(DKIMSigningFilter.fromDomain("undisclosed-recipients:;"))
    }

    func testKeyChoiceExactThenParentThenDefault() throws {
        let pair = try DKIMKeyGenerator.generate(.ed25519SHA256)
        let com = DKIMKey(domain: "example.com", selector: "s", algorithm: .ed25519SHA256, pem: Array(pair.privateKeyPEM.utf8))
        let net = DKIMKey(domain: "example.net", selector: "s", algorithm: .ed25519SHA256, pem: Array(pair.privateKeyPEM.utf8))
        let library = try DKIMLibrary(signedHeaders: ["From"], oversignedHeaders: ["From"])
        let signer = DKIMSigner(library: library, headerCanon: .relaxed, bodyCanon: .relaxed)
        let filter = DKIMSigningFilter(
            name: "d", signer: signer, keys: ["example.com": com, "example.net": net], useParentDomains: true, defaultKey: nil)
        XCTAssertEqual(filter.key(for: "example.com")?.domain, "example.com")
        XCTAssertEqual(filter.key(for: "a.b.example.net")?.domain, "example.net")
        XCTAssertNil(filter.key(for: "com"))
        XCTAssertNil(filter.key(for: "other.example"))
        let strict = DKIMSigningFilter(name: "d", signer: signer, keys: ["example.com": com], useParentDomains: false, defaultKey: net)
        XCTAssertEqual(strict.key(for: "a.example.com")?.domain, "example.net", "no parent lookup: the default key")
    }

    func testSignatureFieldUsesCRLFFolding() throws {
        let pair = try DKIMKeyGenerator.generate(.rsaSHA256)
        let key = DKIMKey(domain: "example.com", selector: "s1", algorithm: .rsaSHA256, pem: Array(pair.privateKeyPEM.utf8))
        let signer = DKIMSigner(library: try DKIMLibrary(signedHeaders: ["From", "Subject"], oversignedHeaders: ["From"]), headerCanon: .relaxed, bodyCanon: .relaxed)
        let field = try signer.sign(Array("From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n".utf8), key: key, jobID: "T1")
        let text = String(decoding: field, as: UTF8.self)
        XCTAssertTrue(text.hasPrefix("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;"), text)
        XCTAssertTrue(text.hasSuffix("\r\n"))
        XCTAssertFalse(field.enumerated().contains { $0.element == 0x0A && ($0.offset == 0 || field[$0.offset - 1] != 0x0D) }, "no bare LF")
        XCTAssertTrue(text.contains("h=From:Subject:From;"), "From is signed once more than it occurs: \(text)")
        XCTAssertThrowsError(
            try signer.sign([], key: DKIMKey(domain: "x", selector: "s", algorithm: .rsaSHA256, pem: Array("not a key".utf8)), jobID: "T2"))
    }
}
