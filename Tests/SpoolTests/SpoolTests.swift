import Logging
import NIOPosix
import XCTest

@testable import Spool
@testable import TernCore

final class SpoolTests: XCTestCase {
    var root = ""
    var pool: NIOThreadPool!

    override func setUp() async throws {
        root = "/tmp/tern-spool-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        pool = NIOThreadPool(numberOfThreads: 4)
        pool.start()
    }

    override func tearDown() async throws {
        try await pool.shutdownGracefully()
        _ = try? FileManagerLite.removeTree(root)
    }

    private func envelope(_ recipients: [String] = ["u@example.org"]) -> Envelope {
        Envelope(
            sender: "a@example.com", recipients: recipients.map { EnvelopeRecipient(address: $0) },
            client: ClientInfo(address: "127.0.0.1", port: 1), listener: "mx", arrivalMillis: 1)
    }

    private func open() async throws -> (Spool, Spool.RecoveryReport) {
        try await Spool.open(root: root, threadPool: pool, logger: Logger(label: "test"))
    }

    func testCommitWritesAndListsAMessage() async throws {
        let (spool, report) = try await open()
        XCTAssertEqual(report, .init(queued: 0, removedIncomplete: 0, corrupt: 0))
        let writer = spool.begin()
        try await writer.append(Array("Subject: hi\r\n\r\nbody\r\n".utf8))
        try await writer.commit(envelope(["u@example.org", "v@example.org"]))
        let listed = try spool.list()
        XCTAssertEqual(listed.count, 1)
        XCTAssertEqual(listed[0].id, writer.id)
        XCTAssertEqual(listed[0].size, 21)
        XCTAssertEqual(listed[0].envelope.recipients.map(\.address), ["u@example.org", "v@example.org"])
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), [writer.id.rawValue])
    }

    func testLargeMessageStreamsToDiskBeforeCommit() async throws {
        let (spool, _) = try await open()
        let writer = spool.begin()
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 50_000)
        try await writer.append(chunk)
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), [], "below one chunk nothing is on disk yet")
        try await writer.append(chunk)
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), [writer.id.rawValue])
        XCTAssertEqual(try spool.list().count, 0, "without its trailer the file is not a queued message")
        try await writer.commit(envelope())
        XCTAssertEqual(try spool.list().first?.size, 100_000)
    }

    func testAbortLeavesNothing() async throws {
        let (spool, _) = try await open()
        let writer = spool.begin()
        try await writer.append([UInt8](repeating: 0x41, count: 100_000))
        await writer.abort()
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), [])
        XCTAssertEqual(try spool.list().count, 0)
    }

    func testRecoveryRemovesHalfWrittenAndQuarantinesCorrupt() async throws {
        do {
            let (spool, _) = try await open()
            let good = spool.begin()
            try await good.append(Array("x\r\n".utf8))
            try await good.commit(envelope())
            let half = spool.begin()
            try await half.append([UInt8](repeating: 0x41, count: 70_000))
            // the process "dies" here: `half` is never committed nor aborted
        }
        // A complete-looking file whose envelope is damaged.
        FileManagerLite.write(root + "/queue/0000000000000000", "x\n{not json\n-\nTERN-SPOOL-2 0000000000000000 0000000000000002 000000000000000c\n")
        let (spool, report) = try await open()
        XCTAssertEqual(report, .init(queued: 1, removedIncomplete: 1, corrupt: 1))
        XCTAssertEqual(try spool.list().count, 1)
        XCTAssertEqual(try SpoolFiles.list(root + "/corrupt"), ["0000000000000000"])
    }

    func testConcurrentCommitsAreAllDurableAndDistinct() async throws {
        let (spool, _) = try await open()
        let envelope = self.envelope()
        let ids = try await withThrowingTaskGroup(of: QueueID.self) { group in
            for i in 0..<200 {
                group.addTask {
                    let w = spool.begin()
                    try await w.append(Array("Subject: \(i)\r\n\r\n".utf8))
                    try await w.commit(envelope)
                    return w.id
                }
            }
            return try await group.reduce(into: [QueueID]()) { $0.append($1) }
        }
        XCTAssertEqual(Set(ids).count, 200)
        XCTAssertEqual(try spool.list().map(\.id), ids.sorted())
    }

    func testQueueIDsGrowAndParse() {
        let generator = QueueIDGenerator()
        var last = generator.next()
        for _ in 0..<10_000 {
            let id = generator.next()
            XCTAssertLessThan(last, id)
            XCTAssertEqual(QueueID(id.rawValue), id)
            last = id
        }
        XCTAssertNil(QueueID("too-short"))
        XCTAssertNil(QueueID("0000000000000OIL"), "Crockford base32 has no O, I, L")
    }

    func testEnvelopeRecordTrailerIsFixedLength() throws {
        let id = QueueID("1K0W8MTXPC400000")!
        let record = SpoolFiles.envelopeRecord(envelope(), contentSize: 1234, id: id)
        let trailer = String(decoding: record.suffix(SpoolFiles.trailerLength), as: UTF8.self)
        XCTAssertTrue(trailer.hasPrefix("TERN-SPOOL-2 1K0W8MTXPC400000 00000000000004d2 "), trailer)
        XCTAssertTrue(trailer.hasSuffix("\n"))
        XCTAssertEqual(trailer.utf8.count, 64)
    }

    func testFinishedFilesAreReusedAndNeverPassForMessages() async throws {
        let (spool, _) = try await open()
        let long = spool.begin()
        try await long.append([UInt8](repeating: UInt8(ascii: "L"), count: 90_000))
        try await long.commit(envelope(["a@example.org", "b@example.org"]))
        try await spool.removeNow(long.id)
        XCTAssertEqual(try SpoolFiles.list(root + "/free"), [long.id.rawValue], "a finished file is kept for reuse")

        // The next message takes that file; it is shorter, so the file is cut to its length.
        let short = spool.begin()
        try await short.append(Array("Subject: short\r\n\r\nhi\r\n".utf8))
        try await short.commit(envelope())
        XCTAssertEqual(try SpoolFiles.list(root + "/free"), [])
        let listed = try spool.list()
        XCTAssertEqual(listed.map(\.id), [short.id])
        XCTAssertEqual(listed[0].size, 22)
        XCTAssertEqual(listed[0].envelope.recipients.map(\.address), ["u@example.org"])
        var content: [UInt8] = []
        try await spool.readContent(short.id, size: 22) { content += $0 }
        XCTAssertEqual(String(decoding: content, as: UTF8.self), "Subject: short\r\n\r\nhi\r\n")

        // A recycled file renamed into the queue but never rewritten (a crash right after the
        // rename) still ends with its old message's trailer: not a message under its new name.
        try await spool.removeNow(short.id)
        let stale = root + "/queue/" + spool.begin().id.rawValue
        XCTAssertEqual(rename(root + "/free/" + short.id.rawValue, stale), 0)
        XCTAssertEqual(SpoolFiles.check(stale), .incomplete)
        let (reopened, report) = try await Spool.open(root: root, threadPool: pool, logger: Logger(label: "test"))
        XCTAssertEqual(report, .init(queued: 0, removedIncomplete: 1, corrupt: 0))
        XCTAssertEqual(try reopened.list().count, 0)
        XCTAssertEqual(try SpoolFiles.list(root + "/free").count, 1, "and it goes back to free/")
    }
}

/// The little file handling the tests need, without Foundation's FileManager.
enum FileManagerLite {
    static func write(_ path: String, _ text: String) {
        let f = fopen(path, "w")!
        fputs(text, f)
        fclose(f)
    }

    static func removeTree(_ path: String) throws {
        guard let d = opendir(path) else {
            unlink(path)
            return
        }
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name == "." || name == ".." { continue }
            if e.pointee.d_type == DT_DIR { try removeTree(path + "/" + name) } else { unlink(path + "/" + name) }
        }
        closedir(d)
        rmdir(path)
    }
}
