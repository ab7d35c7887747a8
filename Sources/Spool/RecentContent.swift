import NIOCore

/// The content of the messages committed last, kept in memory until their first delivery
/// attempt takes it: that attempt then needs no trip to the spool's threads (open, read,
/// close, and a thread hop each way). Bounded by bytes; past the budget the oldest go first,
/// and their attempt reads the disk as any retry does.
struct RecentContent {
    let budget: Int
    private var entries: [QueueID: Entry] = [:]
    /// Insertion order, for eviction. Ids already taken are skipped when they come up, and
    /// swept out when they outnumber the entries.
    private var order = CircularBuffer<QueueID>()
    private(set) var bytes = 0

    struct Entry {
        var content: [UInt8]
    }

    init(budget: Int) { self.budget = budget }

    var count: Int { entries.count }

    /// Keeps a copy of the first `size` bytes of `storage` as the content of `id` (a copy of
    /// its own size: the writer's buffer has room for a whole chunk). A message larger than
    /// a quarter of the budget is not kept.
    mutating func insert(_ id: QueueID, storage: [UInt8], size: Int) {
        guard size <= budget / 4, size <= storage.count, entries[id] == nil else { return }
        entries[id] = Entry(content: Array(storage[..<size]))
        bytes += size
        order.append(id)
        while bytes > budget, let oldest = order.popFirst() {
            if let gone = entries.removeValue(forKey: oldest) { bytes -= gone.content.count }
        }
        if order.count > 2 * entries.count + 64 {
            order = CircularBuffer(order.filter { entries[$0] != nil })
        }
    }

    /// The content, once: it is dropped as it is handed out.
    mutating func take(_ id: QueueID) -> [UInt8]? {
        guard let entry = entries.removeValue(forKey: id) else { return nil }
        bytes -= entry.content.count
        return entry.content
    }

    mutating func remove(_ id: QueueID) {
        if let gone = entries.removeValue(forKey: id) { bytes -= gone.content.count }
    }

    /// Ids still waiting in the order buffer (for tests: it must not grow without bound).
    var orderCount: Int { order.count }
}
