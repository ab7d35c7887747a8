import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import ServiceLifecycle
import TernCore

/// `GET /metrics` in the Prometheus text format, on the address `metrics.address` names.
/// Everything else gets 404. One request per connection, within `requestDeadline` of the
/// connect; at most `maxConnections` at once (more are closed at once), so a client that
/// opens connections and sends nothing cannot hold the endpoint or the process's descriptors.
final class MetricsEndpoint: Service, Sendable {
    let address: ListenAddress
    let registry: PrometheusCollectorRegistry
    let logger: Logger
    static let requestDeadline = TimeAmount.seconds(10)
    static let maxConnections = 32

    init(address: ListenAddress, registry: PrometheusCollectorRegistry, logger: Logger) {
        self.address = address
        self.registry = registry
        self.logger = logger
    }

    private let bound = NIOLockedValueBox<(any Channel)?>(nil)

    /// Binds the endpoint now (before the listeners announce themselves, so that whoever
    /// waits for them finds the metrics up too); `run` serves it.
    func bind() async throws {
        let registry = self.registry
        let open = NIOLockedValueBox(0)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let admitted = open.withLockedValue { n -> Bool in
                    guard n < Self.maxConnections else { return false }
                    n += 1
                    return true
                }
                guard admitted else { return channel.close() }
                channel.closeFuture.whenComplete { _ in open.withLockedValue { $0 -= 1 } }
                // A deadline for the whole exchange, not an idle timer.
                let deadline = channel.eventLoop.scheduleTask(in: Self.requestDeadline) { channel.close(promise: nil) }
                channel.closeFuture.whenComplete { _ in deadline.cancel() }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(registry: registry))
                }
            }
            .bind(host: address.host, port: address.port).get()
        bound.withLockedValue { $0 = channel }
        logger.info("metrics on http://\(address)/metrics")
    }

    func run() async throws {
        if bound.withLockedValue({ $0 == nil }) { try await bind() }
        try? await gracefulShutdown()
        try await bound.withLockedValue { $0 }?.close()
    }
}

final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let registry: PrometheusCollectorRegistry
    private var request: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): request = head
        case .body: break
        case .end:
            guard let head = request else { return }
            let found = head.method == .GET && (head.uri == "/metrics" || head.uri.hasPrefix("/metrics?"))
            let body = found ? MetricsCatalog.withHelp(registry.emitToBuffer()) : Array("not found; try /metrics\n".utf8)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
            headers.add(name: "Content-Length", value: String(body.count))
            headers.add(name: "Connection", value: "close")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: found ? .ok : .notFound, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: body)))), promise: nil)
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }
}

/// What each series means, written as `# HELP` above its `# TYPE` line. The registry is fed
/// through swift-metrics, which has no help text; adding it to the output keeps every series
/// described in one place (and config/README.md says the same).
enum MetricsCatalog {
    static let help: [String: String] = [
        "tern_up": "1 while the daemon runs (scrape failures mean it does not).",
        "tern_start_time_seconds": "When the daemon started, in seconds since 1970.",
        "tern_connections_total": "SMTP connections accepted by the listeners.",
        "tern_messages_accepted_total": "Messages queued (a 250 after DATA or BDAT LAST).",
        "tern_accepted_bytes_total": "Bytes of the messages queued.",
        "tern_rejects_total": "Refused commands and messages, by stage (SMTP verb, END-OF-MESSAGE, filter) and reply code.",
        "tern_auth_failures_total": "Failed AUTH attempts by clients, by listener.",
        "tern_inbound_tls_failures_total": "TLS handshakes with clients that failed, by listener.",
        "tern_outbound_tls_failures_total": "TLS handshakes or certificate checks with next hops that failed, by lane.",
        "tern_upstream_auth_failures_total": "AUTH refused by a smarthost or next hop, by lane.",
        "tern_delivery_attempts_total": "Delivery attempts, one per recipient per attempt, by status.",
        "tern_deliveries_total": "Delivery attempts, one per recipient per attempt, by lane and status (sent, deferred, bounced).",
        "tern_queue_messages": "Messages in the queue.",
        "tern_queue_oldest_message_age_seconds": "Seconds since the oldest queued message arrived (0 when the queue is empty).",
        "tern_queue_active_transactions": "Delivery transactions handed to lanes and not finished.",
        "tern_lane_connections": "Open connections of a lane.",
        "tern_lane_queued": "Transactions waiting in a lane.",
        "tern_lane_in_flight": "Transactions under way in a lane.",
        "tern_lane_throttled": "1 while a lane backs off, is reduced, suspended or dead.",
    ]

    static func withHelp(_ exposition: [UInt8]) -> [UInt8] {
        var out = ""
        for line in String(decoding: exposition, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("# TYPE ") {
                let name = line.dropFirst("# TYPE ".count).prefix { $0 != " " }
                if let text = help[String(name)] { out += "# HELP \(name) \(text)\n" }
            }
            out += line
            out += "\n"
        }
        if out.hasSuffix("\n\n") { out.removeLast() }
        return Array(out.utf8)
    }
}
