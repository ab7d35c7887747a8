// swift-tools-version:6.0
import PackageDescription

let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
    name: "Tern",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "tern", targets: ["tern"]),
        .executable(name: "SMTPFuzzer", targets: ["SMTPFuzzer"]),
        .executable(name: "SessionFuzzer", targets: ["SessionFuzzer"]),
        .executable(name: "ClientFuzzer", targets: ["ClientFuzzer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.30.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.0.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.0.0"),
    ],
    targets: [
        // Pure SMTP grammar: commands, replies, addresses, ESMTP parameters. No I/O.
        .target(name: "SMTPProtocol", swiftSettings: strict),

        // libcrypt (libxcrypt) for crypt(3) password verification.
        .systemLibrary(
            name: "CCrypt",
            pkgConfig: "libcrypt",
            providers: [.apt(["libcrypt-dev"])]
        ),

        // libunbound, the caching resolver library, for MX and address lookups.
        .systemLibrary(name: "CUnbound", providers: [.apt(["libunbound-dev"])]),

        // libopendkim, the reference DKIM implementation, for the DKIMSigning plugin.
        .systemLibrary(name: "COpenDKIM", pkgConfig: "opendkim", providers: [.apt(["libopendkim-dev"])]),
        // libmilter's protocol numbers (mfdef.h, mfapi.h), for the MilterBridge plugin.
        .systemLibrary(name: "CMilter", providers: [.apt(["libmilter-dev"])]),
        // OpenSSL's libcrypto, for `tern dkim keygen`.
        .systemLibrary(name: "CCrypto", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),

        // Configuration model, shared types, log names.
        .target(
            name: "TernCore",
            dependencies: [
                "SMTPProtocol",
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),

        // Durable queue: write, fsync, recover, queue ids.
        .target(
            name: "Spool",
            dependencies: [
                "TernCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: strict
        ),

        // Listeners, sessions, access policy, AUTH, TLS.
        .target(
            name: "Ingress",
            dependencies: [
                "SMTPProtocol", "TernCore", "Spool", "CCrypt",
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict
        ),

        // Delivery's decisions, pure: routes, the failure policy, the retry schedule, the lane
        // window, DSNs.
        // Cross-module optimization in release builds: the queue manager drives Delivery's
        // generic state machine (LaneStateMachine<DeliveryJob>) once per job event, and
        // without it every call runs unspecialized, through runtime generic metadata.
        .target(
            name: "Delivery", dependencies: ["SMTPProtocol", "TernCore", "Spool"],
            swiftSettings: strict + [.unsafeFlags(["-cross-module-optimization"], .when(configuration: .release))]),

        // Outbound SMTP: the client state machine, its NIO driver, MX resolution.
        .target(
            name: "Transports",
            dependencies: [
                "SMTPProtocol", "TernCore", "Delivery", "CUnbound",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: strict
        ),

        // Pre-queue filter plugins: each knows only TernCore's Filter protocol (and its own
        // C library); the executable lists them in its registry.
        .target(name: "HeaderRewrite", dependencies: ["TernCore"], path: "Plugins/HeaderRewrite", swiftSettings: strict),
        .target(
            name: "DKIMSigning",
            dependencies: ["TernCore", "SMTPProtocol", "COpenDKIM", "CCrypto", .product(name: "Logging", package: "swift-log")],
            path: "Plugins/DKIMSigning", swiftSettings: strict),
        .target(
            name: "MilterBridge",
            dependencies: [
                "TernCore", "SMTPProtocol", "CMilter",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Plugins/MilterBridge", swiftSettings: strict),

        // The queue manager: the scheduler and the lanes that carry queued mail out through
        // the transports, recording each outcome in the spool; bounces; queue control.
        .target(
            name: "QueueManager",
            dependencies: [
                "SMTPProtocol", "TernCore", "Spool", "Delivery", "Transports",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict
        ),

        .executableTarget(
            name: "tern",
            dependencies: [
                "TernCore", "Spool", "Ingress", "SMTPProtocol", "Delivery", "Transports", "QueueManager", "HeaderRewrite", "DKIMSigning", "MilterBridge",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict
        ),

        // libFuzzer entry point for the command parser (see scripts/fuzz).
        .executableTarget(name: "SMTPFuzzer", dependencies: ["SMTPProtocol"], swiftSettings: strict),
        // libFuzzer entry point for the server session: framing handler and state machine.
        .executableTarget(
            name: "SessionFuzzer",
            dependencies: [
                "Ingress", "SMTPProtocol", "TernCore",
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // libFuzzer entry point for the SMTP client's reply parser and state machine.
        .executableTarget(name: "ClientFuzzer", dependencies: ["Transports", "Delivery", "SMTPProtocol"], swiftSettings: strict),

        .testTarget(name: "SMTPProtocolTests", dependencies: ["SMTPProtocol"]),
        .testTarget(name: "TernCoreTests", dependencies: ["TernCore"]),
        .testTarget(name: "HeaderRewriteTests", dependencies: ["HeaderRewrite", "TernCore"]),
        .testTarget(name: "DKIMSigningTests", dependencies: ["DKIMSigning", "TernCore"]),
        .testTarget(name: "MilterBridgeTests", dependencies: ["MilterBridge", "TernCore", "SMTPProtocol", "CMilter"]),
        .testTarget(name: "DeliveryTests", dependencies: ["Delivery", "SMTPProtocol", "TernCore", "Spool"]),
        .testTarget(
            name: "TransportsTests",
            dependencies: ["Transports", "Delivery", "SMTPProtocol", "TernCore", .product(name: "NIOPosix", package: "swift-nio")],
            exclude: ["Peers"]
        ),
        .testTarget(
            name: "SpoolTests",
            dependencies: ["Spool", "TernCore", .product(name: "NIOPosix", package: "swift-nio")]
        ),
        .testTarget(
            name: "IngressTests",
            dependencies: [
                "Ingress", "SMTPProtocol", "TernCore", "Spool",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
