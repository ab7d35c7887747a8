import XCTest
final class PlaceholderSpoolTests: XCTestCase { func testNothing() {} }
