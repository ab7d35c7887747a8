/// Messages waiting for their next attempt, ordered by when it is due: a binary heap, so that
/// each tick looks only at what is due instead of walking every waiting message (Postfix's
/// deferred queue scan walks the directory; this is its in-memory index).
///
/// Each message has one due time, the earliest asked for; a later `schedule` never delays
/// it. Messages due at the same time come in the order of their ids (queue ids: arrival). Entries replaced or removed stay in the heap until they surface and are skipped.
public struct RetryQueue<ID: Hashable & Comparable & Sendable>: Sendable {
    private var heap: [(due: Int64, id: ID)] = []
    private var due: [ID: Int64] = [:]

    public init() {}

    public var count: Int { due.count }
    /// Room reserved: heap slots and dictionary buckets.
    var capacity: (heap: Int, due: Int) { (heap.capacity, due.capacity) }
    public var isEmpty: Bool { due.isEmpty }

    /// `id` is due at `time`, or at the time it already had if that is sooner.
    public mutating func schedule(_ id: ID, at time: Int64) {
        if let current = due[id], current <= time { return }
        due[id] = time
        push((time, id))
        // Stale entries would otherwise pile up under a message rescheduled again and again.
        if heap.count > 64, heap.count > due.count * 4 { rebuild() }
    }

    public mutating func remove(_ id: ID) { due[id] = nil }

    /// Takes every message due at `now` or before, soonest first.
    public mutating func popDue(now: Int64) -> [ID] {
        var out: [ID] = []
        while let top = heap.first, top.due <= now {
            pop()
            // Skip what was removed or replaced since.
            guard due[top.id] == top.due else { continue }
            due[top.id] = nil
            out.append(top.id)
        }
        if !out.isEmpty { compact() }
        return out
    }

    /// After a burst (a destination back after an outage), storage sized for it goes back:
    /// neither an array nor a dictionary gives memory back by itself.
    private mutating func compact() {
        if heap.capacity > 1024, heap.capacity > heap.count * 4 {
            heap = heap.withUnsafeBufferPointer { Array($0) }
        }
        if due.capacity > 1024, due.capacity > due.count * 4 {
            var smaller = [ID: Int64](minimumCapacity: due.count)
            for (id, time) in due { smaller[id] = time }
            due = smaller
        }
    }

    /// The soonest due time, if any message waits.
    public mutating func nextDue() -> Int64? {
        while let top = heap.first, due[top.id] != top.due { pop() }
        return heap.first?.due
    }

    private mutating func push(_ item: (due: Int64, id: ID)) {
        heap.append(item)
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(heap[i], heap[parent]) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    private mutating func pop() {
        let last = heap.removeLast()
        guard !heap.isEmpty else { return }
        heap[0] = last
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var smallest = i
            if l < heap.count, less(heap[l], heap[smallest]) { smallest = l }
            if r < heap.count, less(heap[r], heap[smallest]) { smallest = r }
            guard smallest != i else { return }
            heap.swapAt(i, smallest)
            i = smallest
        }
    }

    private func less(_ a: (due: Int64, id: ID), _ b: (due: Int64, id: ID)) -> Bool {
        a.due != b.due ? a.due < b.due : a.id < b.id
    }

    private mutating func rebuild() {
        let live = due.map { (due: $0.value, id: $0.key) }
        heap = []
        for item in live { push(item) }
    }
}
