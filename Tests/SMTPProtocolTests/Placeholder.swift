import XCTest
final class PlaceholderSMTPProtocolTests: XCTestCase { func testNothing() {} }
