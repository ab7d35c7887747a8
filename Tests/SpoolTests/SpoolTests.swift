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
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), ["s000000000"], "the message is in a slot")
    }

    func testLargeMessageStreamsToDiskBeforeCommit() async throws {
        let (spool, _) = try await open()
        let writer = spool.begin()
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 100_000)
        try await writer.append(chunk)
        try await writer.append(chunk)
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), [], "below the hold limit nothing is on disk yet")
        XCTAssertEqual(spool.held.withLockedValue { $0 }, Spool.holdLimit - Spool.writeChunk)
        try await writer.append(chunk)
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), ["s000000000"], "past it, the message streams to the disk")
        XCTAssertEqual(spool.held.withLockedValue { $0 }, 0, "and gives its share of the budget back")
        XCTAssertEqual(try spool.list().count, 0, "without its trailer the file is not a queued message")
        try await writer.commit(envelope())
        XCTAssertEqual(try spool.list().first?.size, 300_000)
    }

    /// A message below the hold limit goes to the disk in one write at its commit, and its
    /// first attempt reads it from memory; with the hold budget spent it streams in chunks.
    func testAMessageBelowTheHoldLimitWaitsInMemoryWhileTheBudgetAllows() async throws {
        let (spool, _) = try await open()
        let piece = [UInt8](repeating: UInt8(ascii: "y"), count: 10_000)
        let held = spool.begin()
        for _ in 0..<15 { try await held.append(piece) }
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), [])
        try await held.commit(envelope())
        XCTAssertEqual(spool.held.withLockedValue { $0 }, 0)
        XCTAssertEqual(spool.recent.withLockedValue { $0.count }, 1, "kept for the first attempt")
        var read: [UInt8] = []
        try await spool.readContent(held.id, slot: held.slot, size: 150_000) { read += $0 }
        XCTAssertEqual(read.count, 150_000)

        // The budget spent by others: the next message goes to the disk at the first chunk.
        spool.held.withLockedValue { $0 = Spool.holdBudget }
        let streamed = spool.begin()
        for _ in 0..<7 { try await streamed.append(piece) }
        XCTAssertEqual(try SpoolFiles.list(root + "/queue").count, 2, "on disk past one chunk")
        await streamed.abort()
        XCTAssertEqual(spool.held.withLockedValue { $0 }, Spool.holdBudget, "it never took a share")
        spool.held.withLockedValue { $0 = 0 }

        // An aborted held message gives its share back.
        let aborted = spool.begin()
        for _ in 0..<7 { try await aborted.append(piece) }
        XCTAssertEqual(spool.held.withLockedValue { $0 }, Spool.holdLimit - Spool.writeChunk)
        await aborted.abort()
        XCTAssertEqual(spool.held.withLockedValue { $0 }, 0)
    }

    func testAbortLeavesNothing() async throws {
        let (spool, _) = try await open()
        let writer = spool.begin()
        try await writer.append([UInt8](repeating: 0x41, count: 300_000))
        XCTAssertEqual(try SpoolFiles.list(root + "/queue").count, 1, "past the hold limit it is on disk")
        await writer.abort()
        XCTAssertEqual(try filesWithContent(), [], "the slot is emptied")
        XCTAssertEqual(try spool.list().count, 0)
    }

    func testRecoveryRemovesHalfWrittenAndQuarantinesCorrupt() async throws {
        do {
            let (spool, _) = try await open()
            let good = spool.begin()
            try await good.append(Array("x\r\n".utf8))
            try await good.commit(envelope())
            let half = spool.begin()
            try await half.append([UInt8](repeating: 0x41, count: 300_000))
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
        let file = SpoolFiles.file(content: [UInt8](repeating: 0x78, count: 1234), envelope: envelope(), id: id)
        let trailer = String(decoding: file.suffix(SpoolFiles.trailerLength), as: UTF8.self)
        XCTAssertTrue(trailer.hasPrefix("TERN-SPOOL-3 1K0W8MTXPC400000 00000000000004d2 "), trailer)
        XCTAssertTrue(trailer.hasSuffix("\n"))
        XCTAssertEqual(trailer.utf8.count, 81)
        XCTAssertEqual(trailer.split(separator: " ").map(\.utf8.count), [12, 16, 16, 16, 17])
    }

    /// A checksum fed in pieces is the one fed at once, and any one changed bit changes it.
    func testTheChecksumIsTheSameInAnyPiecesAndSeesEveryBit() {
        let bytes = (0..<300).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        var whole = ContentChecksum()
        whole.update(bytes)
        for a in 0...bytes.count {
            for b in stride(from: a, through: bytes.count, by: 7) {
                var pieces = ContentChecksum()
                pieces.update(bytes[..<a])
                pieces.update(bytes[a..<b])
                pieces.update(bytes[b...])
                XCTAssertEqual(pieces.value, whole.value, "split at \(a) and \(b)")
            }
        }
        var seen = Set([whole.value])
        for bit in 0..<(bytes.count * 8) {
            var changed = bytes
            changed[bit / 8] ^= 1 << (bit % 8)
            var sum = ContentChecksum()
            sum.update(changed)
            seen.insert(sum.value)
        }
        XCTAssertEqual(seen.count, bytes.count * 8 + 1)
        var shorter = ContentChecksum(), zeroed = ContentChecksum()
        shorter.update(bytes.dropLast())
        zeroed.update(Array(bytes.dropLast()) + [0])
        XCTAssertNotEqual(shorter.value, whole.value)
        XCTAssertNotEqual(shorter.value, zeroed.value, "a trailing zero byte counts")
    }

    /// Slots that hold any byte other than zero: a free slot is empty or all zeros.
    private func filesWithContent() throws -> [String] {
        try SpoolFiles.list(root + "/queue").filter { name in
            (FileManagerLite.readBytes(root + "/queue/" + name) ?? []).contains { $0 != 0 }
        }
    }

    private func slotStat(_ name: String) -> stat {
        var st = stat()
        XCTAssertEqual(stat(root + "/queue/" + name, &st), 0)
        return st
    }

    private func slotSize(_ name: String) -> Int { Int(slotStat(name).st_size) }

    func testSlotsAreReusedWithoutADirectorySync() async throws {
        let (spool, _) = try await open()
        let long = spool.begin()
        try await long.append([UInt8](repeating: UInt8(ascii: "L"), count: 90_000))
        try await long.commit(envelope(["a@example.org", "b@example.org"]))
        XCTAssertEqual(spool.queueSync.count, 1, "a slot made for a message: its name is synced")
        try await spool.removeNow(long.id, slot: long.slot)
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), ["s000000000"])
        XCTAssertEqual(slotSize("s000000000"), 0, "a finished message leaves nothing readable")

        // The next message takes that slot, with one file sync and no directory sync.
        let short = spool.begin()
        try await short.append(Array("Subject: short\r\n\r\nhi\r\n".utf8))
        try await short.commit(envelope())
        XCTAssertEqual(spool.queueSync.count, 1)
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), ["s000000000"])
        let listed = try spool.list()
        XCTAssertEqual(listed.map(\.id), [short.id])
        XCTAssertEqual(listed[0].size, 22)
        XCTAssertEqual(listed[0].envelope.recipients.map(\.address), ["u@example.org"])
        var content: [UInt8] = []
        try await spool.readContent(short.id, slot: short.slot, size: 22) { content += $0 }
        XCTAssertEqual(String(decoding: content, as: UTF8.self), "Subject: short\r\n\r\nhi\r\n")

        // Two at once: the second makes a new slot.
        let a = spool.begin(), b = spool.begin()
        try await a.append(Array("x\r\n".utf8))
        try await b.append(Array("y\r\n".utf8))
        try await a.commit(envelope())
        try await b.commit(envelope())
        XCTAssertEqual(try SpoolFiles.list(root + "/queue").sorted(), ["s000000000", "s000000001", "s000000002"])
        XCTAssertEqual(spool.queueSync.count, 3)
    }

    /// A finished small message leaves its slot at its size, all zeros; the next message of
    /// that size is written over it in place: same size, same blocks, so its commit allocates
    /// nothing and changes no inode field but the times.
    func testASmallSlotIsRewrittenInPlace() async throws {
        let (spool, _) = try await open()
        let first = spool.begin()
        try await first.append(Array("Subject: one\r\n\r\nfirst\r\n".utf8))
        try await first.commit(envelope())
        XCTAssertEqual(slotSize("s000000000"), 4096, "a small message fills one page")
        let blocks = slotStat("s000000000").st_blocks
        let inode = slotStat("s000000000").st_ino
        try await spool.removeNow(first.id, slot: first.slot)
        XCTAssertEqual(slotSize("s000000000"), 4096, "the slot keeps its size")
        XCTAssertEqual(try filesWithContent(), [], "and holds nothing but zeros")
        XCTAssertEqual(try spool.list().count, 0)

        let second = spool.begin()
        let text = "Subject: two\r\n\r\n" + String(repeating: "second ", count: 200) + "\r\n"
        try await second.append(Array(text.utf8))
        try await second.commit(envelope(["a@example.org", "b@example.org"]))
        XCTAssertEqual(second.slot, first.slot)
        XCTAssertEqual(slotStat("s000000000").st_ino, inode)
        XCTAssertEqual(slotSize("s000000000"), 4096)
        XCTAssertEqual(slotStat("s000000000").st_blocks, blocks, "no block allocated")
        XCTAssertEqual(spool.queueSync.count, 1, "only the slot's making synced queue/")
        let listed = try spool.list()
        XCTAssertEqual(listed.map(\.id), [second.id])
        XCTAssertEqual(listed[0].size, text.utf8.count)
        _ = spool.recent.withLockedValue { $0.take(second.id) }
        var content: [UInt8] = []
        try await spool.readContent(second.id, slot: second.slot, size: text.utf8.count) { content += $0 }
        XCTAssertEqual(String(decoding: content, as: UTF8.self), text, "read back from the disk")
        try await spool.mark(second.id, slot: second.slot, [1: .delivered])
        let states = try await spool.load { $0.states }
        XCTAssertEqual(states, [[.pending, .delivered]])

        // A larger message takes a larger slot, which grows to a power of two of pages.
        try await spool.removeNow(second.id, slot: second.slot)
        let third = spool.begin()
        try await third.append([UInt8](repeating: UInt8(ascii: "t"), count: 10_000))
        try await third.commit(envelope())
        XCTAssertEqual(third.slot, first.slot, "the one free slot, grown")
        XCTAssertEqual(slotSize("s000000000"), 16384)
        XCTAssertEqual(try spool.list().map(\.size), [10_000])
        // A slot past 64 KB is truncated when its message is done.
        try await spool.removeNow(third.id, slot: third.slot)
        let big = spool.begin()
        try await big.append([UInt8](repeating: UInt8(ascii: "b"), count: 100_000))
        try await big.commit(envelope())
        XCTAssertGreaterThan(slotSize("s000000000"), SpoolFiles.inPlaceLimit)
        XCTAssertEqual(try spool.list().map(\.size), [100_000])
        try await spool.removeNow(big.id, slot: big.slot)
        XCTAssertEqual(slotSize("s000000000"), 0)
    }

    /// A power loss in the middle of a commit into a slot that held another message can leave
    /// any mix of the two on disk: the new trailer over old content, or the old trailer over
    /// new content. Recovery reads a message only where the content matches its trailer's
    /// checksum: one message or the other, whole, never one's envelope with the other's body.
    func testATornCommitInPlaceIsNeverReadAsAMixOfTwoMessages() async throws {
        var files: [[UInt8]] = []
        var contents: [QueueID: [UInt8]] = [:]
        do {
            let (spool, _) = try await open()
            for text in ["Subject: old\r\n\r\nthe old message's body\r\n", "Subject: new\r\n\r\nthe new message, other words\r\n"] {
                let w = spool.begin()
                try await w.append(Array(text.utf8))
                try await w.commit(envelope([text.contains("old") ? "old@example.org" : "new@example.org"]))
                files.append(try XCTUnwrap(FileManagerLite.readBytes(root + "/queue/s000000000")))
                contents[w.id] = Array(text.utf8)
                try await spool.removeNow(w.id, slot: w.slot)
            }
        }
        let (old, new) = (files[0], files[1])
        XCTAssertEqual(old.count, new.count)
        var outcomes: [String: Int] = [:]
        for (first, second) in [(old, new), (new, old)] {
            for cut in stride(from: 0, through: old.count, by: 8) {
                let mixed = Array(first[..<cut] + second[cut...])
                try FileManagerLite.writeBytes(root + "/queue/s000000000", mixed)
                let (spool, report) = try await open()
                let loaded = try await spool.load { $0 }
                XCTAssertLessThanOrEqual(loaded.count, 1)
                if let message = loaded.first {
                    var read: [UInt8] = []
                    try await spool.readContent(message.id, slot: message.slotNumber, size: message.contentSize) { read += $0 }
                    XCTAssertEqual(read, contents[message.id], "cut at \(cut): the content is the trailer's own")
                    XCTAssertEqual(message.envelope.recipients.map(\.address), [String(decoding: read, as: UTF8.self).contains("old") ? "old@example.org" : "new@example.org"])
                    outcomes["whole", default: 0] += 1
                } else {
                    XCTAssertEqual(report.corrupt, 1, "cut at \(cut): a valid trailer over other content is moved aside")
                    outcomes["corrupt", default: 0] += 1
                }
                for name in try SpoolFiles.list(root + "/corrupt") { unlink(root + "/corrupt/" + name) }
                _ = try? FileManagerLite.removeTree(root + "/queue")
                try SpoolFiles.makeDirectory(root + "/queue")
            }
        }
        XCTAssertGreaterThan(outcomes["corrupt", default: 0], 0)
        XCTAssertGreaterThan(outcomes["whole", default: 0], 0)
    }

    /// A message takes a free slot of its own size first, then a smaller one (which grows),
    /// an empty one, a larger one; a message that streams in takes an empty one first.
    func testTheOrderInWhichFreeSlotsAreTaken() {
        var slots = Spool.Slots()
        for (number, size) in [(0, 0), (1, 4096), (2, 16384), (3, 65536), (4, 8192)] as [(UInt32, Int)] {
            slots.put(Spool.FreeSlot(number: number, size: size))
        }
        XCTAssertEqual(slots.take(needed: 12_000)?.number, 2, "its own size")
        XCTAssertEqual(slots.take(needed: 12_000)?.number, 4, "then the next smaller")
        XCTAssertEqual(slots.take(needed: 12_000)?.number, 1)
        XCTAssertEqual(slots.take(needed: 12_000)?.number, 0, "then an empty one")
        XCTAssertEqual(slots.take(needed: 12_000)?.number, 3, "then a larger one")
        XCTAssertNil(slots.take(needed: 12_000))
        XCTAssertEqual(slots.freeCount, 0)
        for (number, size) in [(0, 0), (1, 4096), (3, 65536)] as [(UInt32, Int)] {
            slots.put(Spool.FreeSlot(number: number, size: size))
        }
        XCTAssertEqual([nil, nil, nil].map { (_: Int?) in slots.take(needed: nil)?.number }, [0, 3, 1], "streaming: empty, then largest")
    }

    func testSlotNames() {
        XCTAssertEqual(Spool.slotName(42), "s000000042")
        XCTAssertEqual(Spool.slotNumber("s000000042"), 42)
        XCTAssertEqual(Spool.slotNumber(Spool.slotName(4_000_000_000)), 4_000_000_000, "past nine digits too")
        XCTAssertNil(Spool.slotNumber("s00000004x"))
        XCTAssertNil(Spool.slotNumber("s42"))
        XCTAssertNil(Spool.slotNumber("1K0W8MTXPC400000"))
        XCTAssertTrue(Spool.isSlot("1K0W8MTXPC400000"), "a file of the layout before slots")
        XCTAssertFalse(Spool.isSlot("notes.txt"))
    }

    func testRecoveryKeepsEmptySlotsQuietlyAndNumbersNewOnesAfterThem() async throws {
        do {
            let (spool, _) = try await open()
            for _ in 0..<3 {
                let w = spool.begin()
                try await w.append(Array("x\r\n".utf8))
                try await w.commit(envelope())
            }
            let loaded = try await spool.load { $0 }
            let first = try XCTUnwrap(loaded.min { $0.id < $1.id })
            try await spool.removeNow(first.id, slot: first.slotNumber)
        }
        let (spool, report) = try await open()
        XCTAssertEqual(report, .init(queued: 2, removedIncomplete: 0, corrupt: 0), "an empty slot is not a half-written message")
        _ = try await spool.load { $0.id }
        let w = spool.begin()
        try await w.append(Array("x\r\n".utf8))
        try await w.commit(envelope())
        XCTAssertEqual(try SpoolFiles.list(root + "/queue").count, 3, "the free slot is taken again")
        let v = spool.begin()
        try await v.append(Array("x\r\n".utf8))
        try await v.commit(envelope())
        XCTAssertEqual(try SpoolFiles.list(root + "/queue").sorted().last, "s000000003")
    }

    func testASpoolOfTheLayoutBeforeSlotsIsRead() async throws {
        // Files named by their queue id, and finished files in free/.
        let id = QueueID("1K0W8MTXPC400000")!
        let content = Array("Subject: old\r\n\r\nhi\r\n".utf8)
        for dir in ["", "/queue", "/free"] { XCTAssertEqual(mkdir(root + dir, 0o700), 0) }
        FileManagerLite.write(
            root + "/queue/" + id.rawValue,
            String(decoding: v2File(content: content, envelope: envelope(), id: id), as: UTF8.self))
        FileManagerLite.write(root + "/free/1K0W8MTXPC400001", "")
        let (spool, report) = try await open()
        XCTAssertEqual(report, .init(queued: 1, removedIncomplete: 0, corrupt: 0))
        let loaded = try await spool.load { $0 }
        XCTAssertEqual(loaded.map(\.id), [id])
        let slot = loaded[0].slotNumber
        var read: [UInt8] = []
        try await spool.readContent(id, slot: slot, size: content.count) { read += $0 }
        XCTAssertEqual(read, content)
        XCTAssertEqual(access(root + "/free", F_OK), -1, "free/ is gone")
        XCTAssertEqual(try SpoolFiles.list(root + "/queue"), ["s000000000"], "the message's file became a slot")
        try await spool.removeNow(id, slot: slot)
        XCTAssertEqual(try spool.list().count, 0)
        XCTAssertEqual(slotSize("s000000000"), 0, "a slot of the format before is truncated, not rewritten in place")
    }

    /// A file as the format before checksums wrote it: no padding, a 64-byte trailer.
    private func v2File(content: [UInt8], envelope: Envelope, id: QueueID) -> [UInt8] {
        var out = content + envelope.jsonBytes + [0x0A]
        let stateOffset = out.count
        out += [UInt8](repeating: UInt8(ascii: "-"), count: envelope.recipients.count) + [0x0A]
        out += Array(("TERN-SPOOL-2 " + id.rawValue + " " + SpoolFiles.hex16(content.count) + " " + SpoolFiles.hex16(stateOffset) + "\n").utf8)
        return out
    }

    /// A crash at any point of a commit leaves a prefix of the file on disk (the slot was
    /// empty before). Only the whole file is a message; every shorter prefix is a commit that
    /// never finished, and recovery empties its slot. A byte damaged anywhere in the records
    /// after the content gives a message, a half-written one or a corrupt one, never a crash.
    func testRecoveryAtEveryOffsetOfACommitAndEveryDamagedByte() async throws {
        let content = Array("Subject: every offset\r\n\r\nbody\r\n".utf8)
        let id = QueueID("1K0W8MTXPC400000")!
        let whole = SpoolFiles.file(content: content, envelope: envelope(["a@example.org", "b@example.org"]), id: id)
        let stateOffset = whole.count - SpoolFiles.trailerLength - 3
        func recover(_ bytes: [UInt8]) async throws -> (Spool.RecoveryReport, [QueuedMessage], [String]) {
            _ = try? FileManagerLite.removeTree(root)
            try SpoolFiles.makeDirectory(root + "/queue")
            let fd = Glibc.open(root + "/queue/s000000000", O_WRONLY | O_CREAT, 0o600)
            try SpoolFiles.writeAll(fd, bytes, path: "slot")
            close(fd)
            let (spool, report) = try await open()
            return (report, try spool.list(), try filesWithContent())
        }
        for length in 0...whole.count {
            let (report, listed, left) = try await recover(Array(whole.prefix(length)))
            if length == whole.count {
                XCTAssertEqual(report, .init(queued: 1, removedIncomplete: 0, corrupt: 0))
                XCTAssertEqual(listed.map(\.id), [id])
            } else {
                XCTAssertEqual(report, .init(queued: 0, removedIncomplete: length == 0 ? 0 : 1, corrupt: 0), "prefix of \(length)")
                XCTAssertEqual(listed.count, 0)
                XCTAssertEqual(left, [], "the slot is emptied")
            }
        }
        for offset in 0..<whole.count {
            var damaged = whole
            damaged[offset] ^= 0x5A
            let (report, listed, _) = try await recover(damaged)
            XCTAssertEqual(report.queued + report.removedIncomplete + report.corrupt, 1, "offset \(offset)")
            XCTAssertEqual(listed.count, report.queued)
            if offset < stateOffset || offset >= whole.count - 17 {
                // The content, the envelope and the checksum itself are covered by the checksum.
                XCTAssertEqual(report.queued, 0, "damage at \(offset) is never read as a message")
            }
            if let message = listed.first {
                // A damaged byte that still parses (a letter of an address, say) is read as written.
                XCTAssertEqual(message.envelope.recipients.count, 2)
            }
        }
    }

    /// Each step of a delivery's records, and what a restart finds after it: the commit, a
    /// recipient's outcome marked in place, the removal.
    func testRecoveryAfterEachStepOfADelivery() async throws {
        let id: QueueID
        do {
            let (spool, _) = try await open()
            let w = spool.begin()
            try await w.append(Array("x\r\n".utf8))
            try await w.commit(envelope(["a@example.org", "b@example.org"]))
            id = w.id
        }
        func pending() async throws -> [[RecipientState]] {
            let (spool, _) = try await open()
            return try await spool.load { $0.states }
        }
        let after1 = try await pending()
        XCTAssertEqual(after1, [[.pending, .pending]])
        do {
            let (spool, _) = try await open()
            let slot = try await spool.load { $0.slotNumber }[0]
            try await spool.mark(id, slot: slot, [1: .delivered])
        }
        let after2 = try await pending()
        XCTAssertEqual(after2, [[.pending, .delivered]])
        do {
            let (spool, _) = try await open()
            let slot = try await spool.load { $0.slotNumber }[0]
            try await spool.removeNow(id, slot: slot)
        }
        let after3 = try await pending()
        XCTAssertEqual(after3, [])
        XCTAssertEqual(try filesWithContent(), [])
    }

    func testTheFirstAttemptReadsASmallMessageFromMemoryAndLaterOnesFromTheSlot() async throws {
        let (spool, _) = try await open()
        let w = spool.begin()
        let content = Array("Subject: kept\r\n\r\nhi\r\n".utf8)
        try await w.append(content)
        try await w.commit(envelope())
        // Damage the slot's copy: only a read from the disk would see it.
        let fd = Glibc.open(root + "/queue/s000000000", O_WRONLY)
        XCTAssertEqual(pwrite(fd, "X", 1, 0), 1)
        close(fd)
        var first: [UInt8] = []
        try await spool.readContent(w.id, slot: w.slot, size: content.count) { first += $0 }
        XCTAssertEqual(first, content)
        var second: [UInt8] = []
        try await spool.readContent(w.id, slot: w.slot, size: content.count) { second += $0 }
        XCTAssertEqual(second.first, UInt8(ascii: "X"))
        XCTAssertEqual(spool.recent.withLockedValue { $0.bytes }, 0)
    }

    func testAMarkForARecipientTheFileDoesNotHaveIsAnErrorNotACrash() async throws {
        let (spool, _) = try await open()
        let w = spool.begin()
        try await w.append(Array("x\r\n".utf8))
        try await w.commit(envelope())
        do {
            try await spool.mark(w.id, slot: w.slot, [5: .delivered])
            XCTFail("marked a recipient that is not there")
        } catch {}
    }
}

/// The little file handling the tests need, without Foundation's FileManager.
enum FileManagerLite {
    static func write(_ path: String, _ text: String) {
        let f = fopen(path, "w")!
        fputs(text, f)
        fclose(f)
    }

    static func readBytes(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return try? SpoolFiles.pread(fd, count: Int(st.st_size), at: 0, path: path)
    }

    static func writeBytes(_ path: String, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        defer { close(fd) }
        try SpoolFiles.writeAll(fd, bytes, path: path)
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

final class RecentContentTests: XCTestCase {
    private let ids = QueueIDGenerator()

    func testTakenOnceAndOnlyTheContent() {
        var recent = RecentContent(budget: 1000)
        let id = ids.next()
        recent.insert(id, storage: Array("contentRECORD".utf8), size: 7)
        XCTAssertEqual(recent.take(id).map { String(decoding: $0, as: UTF8.self) }, "content")
        XCTAssertNil(recent.take(id), "the second attempt reads the disk")
        XCTAssertEqual(recent.bytes, 0)
    }

    func testTheOldestGoPastTheBudgetAndLargeOnesAreNotKept() {
        var recent = RecentContent(budget: 1000)
        let made = (0..<5).map { _ in ids.next() }
        for id in made { recent.insert(id, storage: [UInt8](repeating: 1, count: 240), size: 240) }
        XCTAssertEqual(recent.count, 4)
        XCTAssertLessThanOrEqual(recent.bytes, 1000)
        XCTAssertNil(recent.take(made[0]))
        XCTAssertNotNil(recent.take(made[4]))
        let large = ids.next()
        recent.insert(large, storage: [UInt8](repeating: 1, count: 251), size: 251)
        XCTAssertNil(recent.take(large))
    }

    /// One message that is never taken (deferred before its first read, say) must not keep
    /// every later id in the eviction order.
    func testTheOrderStaysBoundedBehindOneLongLivedEntry() {
        var recent = RecentContent(budget: 1 << 20)
        recent.insert(ids.next(), storage: [1], size: 1)
        for _ in 0..<100_000 {
            let id = ids.next()
            recent.insert(id, storage: [1, 2, 3], size: 3)
            _ = recent.take(id)
        }
        XCTAssertEqual(recent.count, 1)
        XCTAssertLessThan(recent.orderCount, 200)
    }
}
