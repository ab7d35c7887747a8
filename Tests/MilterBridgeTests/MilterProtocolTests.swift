import CMilter
import SMTPProtocol
import TernCore
import XCTest

@testable import MilterBridge

final class MilterProtocolTests: XCTestCase {
    func testPacketEncoding() {
        let p = Milter.Packet.strings(TERN_SMFIC_HELO, ["client.example"])
        XCTAssertEqual(p.encoded, [0, 0, 0, 16, UInt8(ascii: "H")] + Array("client.example".utf8) + [0])
    }

    func testNegotiationKeepsOnlyWhatWasOfferedAndReadsMacroLists() throws {
        var data = Milter.u32(6) + Milter.u32(0xFFFF_FFFF) + Milter.u32(UInt32(SMFIP_NR_HDR | SMFIP_NOBODY) | 0x4000_0000)
        data += Milter.u32(UInt32(SMFIM_ENVFROM)) + Array("{auth_authen} i".utf8) + [0]
        data += Milter.u32(UInt32(SMFIM_EOM)) + Array("i".utf8) + [0]
        let n = try Milter.negotiated(Milter.Packet(command: TERN_SMFIC_OPTNEG, data: data))
        XCTAssertEqual(n.version, 6)
        XCTAssertEqual(n.actions, Milter.actions, "a milter gets no action Tern did not offer")
        XCTAssertTrue(n.has(Int(SMFIP_NR_HDR)) && n.has(Int(SMFIP_NOBODY)))
        XCTAssertEqual(n.flags & 0x4000_0000, 0, "unknown protocol bits are dropped")
        XCTAssertEqual(n.macroLists[Int(SMFIM_ENVFROM)], ["{auth_authen}", "i"])
        XCTAssertEqual(n.macroLists[Int(SMFIM_EOM)], ["i"])
        XCTAssertThrowsError(try Milter.negotiated(Milter.Packet(command: TERN_SMFIC_OPTNEG, data: [0, 0])))
    }

    func testReplies() throws {
        XCTAssertEqual(try Milter.reply(Milter.Packet(command: TERN_SMFIR_CONTINUE, data: [])), .continue)
        let custom = try Milter.reply(Milter.Packet.strings(TERN_SMFIR_REPLYCODE, ["554 5.7.0 Custom text"]))
        XCTAssertEqual(custom, .replyCode(SMTPReply(554, EnhancedStatusCode(5, 7, 0), "Custom text")))
        XCTAssertThrowsError(try Milter.reply(Milter.Packet.strings(TERN_SMFIR_REPLYCODE, ["250 ok"])), "a reply code must be 4xx or 5xx")
        var change = Milter.u32(2)
        change += Array("X-A".utf8) + [0] + Array("v".utf8) + [0]
        XCTAssertEqual(
            try Milter.reply(Milter.Packet(command: TERN_SMFIR_CHGHEADER, data: change)), .modification(.changeHeader(index: 2, name: "X-A", value: "v")))
        XCTAssertThrowsError(try Milter.reply(Milter.Packet(command: UInt8(ascii: "Z"), data: [])))
    }

    func testModificationsApplyInOrder() {
        let (headers, offset) = HeaderBlock.parse(Array("X-A: 1\r\nSubject: s\r\nX-A: 2\r\n\r\nbody\r\n".utf8))
        var m = FilterMessage(
            queueID: "Q", sender: "a@x.example", recipients: [EnvelopeRecipient(address: "u@y.example"), EnvelopeRecipient(address: "gone@y.example")],
            headers: headers, body: Array("body\r\n".utf8))
        _ = offset
        Milter.apply(
            [
                .changeHeader(index: 2, name: "x-a", value: "two"), .changeHeader(index: 1, name: "X-A", value: ""),
                .insertHeader(index: 0, name: "X-First", value: " top"), .addHeader(name: "X-Last", value: "folded\n\tvalue"),
                .addRecipient("<new@y.example>", parameters: nil), .deleteRecipient("<GONE@y.example>"), .changeSender("<b@x.example>", parameters: nil),
                .replaceBody(Array("new\nbody\n".utf8)),
            ], to: &m)
        XCTAssertEqual(
            String(decoding: m.headers.serialized, as: UTF8.self),
            "X-First: top\r\nSubject: s\r\nx-a: two\r\nX-Last: folded\r\n\tvalue\r\n\r\n")
        XCTAssertEqual(m.recipients.map(\.address), ["u@y.example", "new@y.example"])
        XCTAssertEqual(m.sender, "b@x.example")
        XCTAssertEqual(String(decoding: m.body, as: UTF8.self), "new\r\nbody\r\n")
    }

    func testEndpoints() {
        XCTAssertEqual(MilterFilter.Endpoint("inet:127.0.0.1:8891"), .inet(host: "127.0.0.1", port: 8891))
        XCTAssertEqual(MilterFilter.Endpoint("inet:8891@localhost"), .inet(host: "localhost", port: 8891))
        XCTAssertEqual(MilterFilter.Endpoint("inet6:[::1]:8891"), .inet(host: "::1", port: 8891))
        XCTAssertEqual(MilterFilter.Endpoint("unix:/run/opendkim/opendkim.sock"), .unix("/run/opendkim/opendkim.sock"))
        XCTAssertNil(MilterFilter.Endpoint("tcp:1.2.3.4:25"))
        XCTAssertNil(MilterFilter.Endpoint("inet:nohost"))
    }
}
