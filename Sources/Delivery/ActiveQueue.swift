/// Admission to the active queue, as Postfix's queue manager keeps one: how many
/// transactions are in the lanes at once (`active_limit`), how many each lane holds
/// (`max_queued`), and the mail that waits for room. A lane's waiting mail is its backlog,
/// messages in arrival order, each with its recipients for the lane; lanes that have room of
/// their own but are held back by the active queue's limit are served in turn (round robin)
/// as room comes free anywhere, so one busy destination cannot take all of it.
///
/// Pure: the scheduler asks, hands jobs over, and reports each transaction's end.
/// - SeeAlso: Postfix `qmgr_active.c`, `SCHEDULER_README` ("the active queue")
public struct ActiveQueue<ID: Hashable & Sendable>: Sendable {
    /// The most transactions in all lanes at once.
    public var limit: Int
    /// Transactions in all lanes.
    public private(set) var active = 0
    private var outstanding: [LaneKey: Int] = [:]
    private var backlogs: [LaneKey: Backlog] = [:]
    /// Lanes with room of their own and waiting mail that the active queue's limit holds back.
    private var starved = FIFO<LaneKey>()

    public init(limit: Int) { self.limit = limit }

    /// What became of recipients offered to a lane.
    public enum Admission: Sendable, Equatable {
        /// Hand them over now (then `handedOver`).
        case now
        /// They wait in the lane's backlog. `refill`: room is free in the active queue now
        /// (mail ahead of them holds them back): call `nextStarved` soon.
        case waiting(refill: Bool)
    }

    /// Offers a message's due recipients for a lane. They go now if the lane has fewer than
    /// `maxQueued` transactions, the active queue has room and nothing waits ahead of them
    /// in the lane; otherwise they join its backlog (a message already there keeps its place).
    public mutating func offer(_ id: ID, recipients: [Int], lane: LaneKey, maxQueued: Int) -> Admission {
        let laneRoom = outstanding[lane, default: 0] < maxQueued
        if laneRoom, active < limit, backlogs[lane] == nil { return .now }
        backlogs[lane, default: Backlog()].add(id, recipients)
        guard laneRoom else { return .waiting(refill: false) }
        starved.push(lane)
        return .waiting(refill: active < limit)
    }

    /// Transactions handed to a lane.
    public mutating func handedOver(lane: LaneKey, transactions: Int) {
        outstanding[lane, default: 0] += transactions
        active += transactions
    }

    /// Transactions of a lane that ended (done, or taken back before they started). Returns
    /// whether waiting mail may go now: the lane's own, or another lane's in turn.
    @discardableResult
    public mutating func finished(lane: LaneKey, transactions: Int = 1) -> Bool {
        let left = max(0, outstanding[lane, default: 0] - transactions)
        outstanding[lane] = left == 0 ? nil : left
        active = max(0, active - transactions)
        return backlogs[lane] != nil || !starved.isEmpty
    }

    /// The next waiting message of `lane`, when the lane and the active queue have room for
    /// it; nil when none may go. When the lane's backlog runs dry it is dropped; when only the
    /// active queue holds it back, the lane takes its turn among the starved.
    public mutating func next(of lane: LaneKey, maxQueued: Int) -> (id: ID, recipients: [Int])? {
        let laneRoom = outstanding[lane, default: 0] < maxQueued
        if laneRoom, active < limit, let waiting = backlogs[lane]?.pop() { return waiting }
        if backlogs[lane]?.isEmpty == true {
            backlogs[lane] = nil
        } else if backlogs[lane] != nil, laneRoom {
            starved.push(lane)
        }
        return nil
    }

    /// The next lane held back by the active queue, in turn, once the active queue has room.
    public mutating func nextStarved() -> LaneKey? {
        guard active < limit else { return nil }
        return starved.pop()
    }

    /// Forgets what waits (a reload routes waiting mail afresh).
    public mutating func clearWaiting() {
        backlogs = [:]
        starved = FIFO()
    }

    public func outstanding(_ lane: LaneKey) -> Int { outstanding[lane, default: 0] }
    /// Messages waiting in the lane's backlog.
    public func waiting(_ lane: LaneKey) -> Int { backlogs[lane]?.count ?? 0 }
    /// Nothing handed over or waiting for the lane.
    public func isIdle(_ lane: LaneKey) -> Bool { outstanding[lane] == nil && backlogs[lane] == nil }

    /// A lane's waiting mail: messages in arrival order, each with its recipients for the lane.
    struct Backlog: Sendable {
        private var order = FIFO<ID>()
        private var groups: [ID: [Int]] = [:]

        var isEmpty: Bool { order.isEmpty }
        var count: Int { order.count }

        /// Adds a message's recipients; a message already waiting keeps its place.
        mutating func add(_ id: ID, _ recipients: [Int]) {
            order.push(id)
            if let old = groups[id] {
                groups[id] = old + recipients.filter { !old.contains($0) }
            } else {
                groups[id] = recipients
            }
        }

        mutating func pop() -> (id: ID, recipients: [Int])? {
            guard let id = order.pop(), let recipients = groups.removeValue(forKey: id) else { return nil }
            return (id, recipients)
        }
    }
}

/// Items in arrival order, each at most once.
struct FIFO<Item: Hashable & Sendable>: Sendable {
    private var items: [Item] = []
    private var head = 0
    private var members: Set<Item> = []

    var isEmpty: Bool { members.isEmpty }
    var count: Int { members.count }

    mutating func push(_ item: Item) {
        if members.insert(item).inserted { items.append(item) }
    }

    mutating func pop() -> Item? {
        guard head < items.count else { return nil }
        let item = items[head]
        head += 1
        if head > 1024, head * 2 > items.count {
            items.removeFirst(head)
            head = 0
        }
        members.remove(item)
        return item
    }
}
