import XCTest
final class PlaceholderIngressTests: XCTestCase { func testNothing() {} }
