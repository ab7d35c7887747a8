import XCTest
final class PlaceholderTernCoreTests: XCTestCase { func testNothing() {} }
