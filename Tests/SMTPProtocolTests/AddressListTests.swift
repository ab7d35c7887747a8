import XCTest

@testable import SMTPProtocol

final class AddressListTests: XCTestCase {
    func testFixtures() {
        let cases: [(String, [String])] = [
            ("a@x.example", ["a@x.example"]),
            ("A <a@x.example>, b@y.example", ["a@x.example", "b@y.example"]),
            ("\"Doe, Jane\" <jane@x.example>", ["jane@x.example"]),
            ("jane@x.example (Jane, at work)", ["jane@x.example"]),
            ("team: c@x.example, d@x.example;, e@y.example", ["c@x.example", "d@x.example", "e@y.example"]),
            ("undisclosed-recipients:;", []),
            ("<\"odd,local\"@x.example>", ["\"odd,local\"@x.example"]),
            ("root", ["root"]),
            ("", []),
        ]
        for (value, expected) in cases {
            XCTAssertEqual(AddressList.addresses(in: value), expected, value)
        }
    }
}
