#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Yams

/// A configuration error: which file, which line, which key, and what is wrong with it.
public struct ConfigError: Error, CustomStringConvertible, Sendable {
    public var file: String
    public var line: Int?
    public var keyPath: String
    public var message: String

    public init(file: String, line: Int?, keyPath: String, message: String) {
        self.file = file
        self.line = line
        self.keyPath = keyPath
        self.message = message
    }

    public var description: String {
        let location = line.map { "\(file):\($0)" } ?? file
        return keyPath.isEmpty ? "\(location): \(message)" : "\(location): \(keyPath): \(message)"
    }
}

/// Reads `tern.yaml`: YAML with Yams, decoded strictly into `TernConfig`, then checked for
/// contradictions. Every error names the key path and, where the key is in the file, its line.
public enum ConfigLoader {
    public static func load(path: String, plugins: FilterRegistry = FilterRegistry([])) throws(ConfigError) -> TernConfig {
        guard let text = readFile(path) else {
            throw ConfigError(file: path, line: nil, keyPath: "", message: "cannot read the file: \(String(cString: strerror(errno)))")
        }
        return try parse(text, file: path, plugins: plugins)
    }

    public static func parse(_ text: String, file: String, plugins: FilterRegistry = FilterRegistry([])) throws(ConfigError) -> TernConfig {
        let node: Node
        do {
            guard let composed = try Yams.compose(yaml: text) else {
                throw ConfigError(file: file, line: nil, keyPath: "", message: "the file is empty")
            }
            node = composed
        } catch let error as ConfigError {
            throw error
        } catch let error as YamlError {
            throw ConfigError(file: file, line: yamlErrorLine(error), keyPath: "", message: "not valid YAML: \(error)")
        } catch {
            throw ConfigError(file: file, line: nil, keyPath: "", message: "not valid YAML: \(error)")
        }
        let config: TernConfig
        do {
            config = try YAMLDecoder().decode(TernConfig.self, from: node, userInfo: [FilterConfig.registryKey: plugins])
        } catch let error as UnknownKeyError {
            throw ConfigError(
                file: file, line: line(of: error.codingPath, in: node, keyItself: true), keyPath: keyPath(error.codingPath),
                message: "unknown key (known here: \(error.known.joined(separator: ", ")))")
        } catch let error as DecodingError {
            let (path, message) = describe(error)
            throw ConfigError(file: file, line: line(of: path, in: node, keyItself: false), keyPath: keyPath(path), message: message)
        } catch {
            throw ConfigError(file: file, line: nil, keyPath: "", message: "\(error)")
        }
        try validate(config, file: file, node: node)
        var loaded = config
        if let path = config.providersFile {
            loaded.providers += try providerTable(path)
        }
        return loaded
    }

    /// A file of provider entries (`config/providers.yaml`), checked like the main file.
    static func providerTable(_ path: String) throws(ConfigError) -> [ProviderConfig] {
        guard let text = readFile(path) else {
            throw ConfigError(file: path, line: nil, keyPath: "", message: "cannot read the providers file")
        }
        do {
            guard let node = try Yams.compose(yaml: text) else { return [] }
            do {
                return try YAMLDecoder().decode([ProviderConfig].self, from: node)
            } catch let error as UnknownKeyError {
                throw ConfigError(
                    file: path, line: line(of: error.codingPath, in: node, keyItself: true), keyPath: keyPath(error.codingPath),
                    message: "unknown key (known here: \(error.known.joined(separator: ", ")))")
            } catch let error as DecodingError {
                let (keys, message) = describe(error)
                throw ConfigError(file: path, line: line(of: keys, in: node, keyItself: false), keyPath: keyPath(keys), message: message)
            }
        } catch let error as ConfigError {
            throw error
        } catch {
            throw ConfigError(file: path, line: nil, keyPath: "", message: "not valid YAML: \(error)")
        }
    }

    // MARK: - Contradictions

    static func validate(_ config: TernConfig, file: String, node: Node) throws(ConfigError) {
        func fail(_ path: [String], _ message: String) -> ConfigError {
            let keys: [any CodingKey] = path.map { p in Int(p).flatMap(AnyCodingKey.init(intValue:)) ?? AnyCodingKey(stringValue: p) }
            return ConfigError(file: file, line: line(of: keys, in: node, keyItself: false), keyPath: keyPath(keys), message: message)
        }
        if config.hostname.isEmpty || config.hostname.contains(where: { $0 == " " || $0 == "\t" }) {
            throw fail(["hostname"], "must be a host name without spaces")
        }
        if config.listeners.isEmpty { throw fail(["listeners"], "at least one listener is needed") }
        var names = Set<String>()
        var addresses = Set<ListenAddress>()
        for (i, listener) in config.listeners.enumerated() {
            if !names.insert(listener.name).inserted { throw fail(["listeners", "\(i)", "name"], "'\(listener.name)' is used twice") }
            if listener.name == ListenerConfig.localName {
                throw fail(["listeners", "\(i)", "name"], "'\(listener.name)' is the name of local submission (the spool's Unix socket); choose another")
            }
            if listener.address.port != 0, !addresses.insert(listener.address).inserted {
                throw fail(["listeners", "\(i)", "address"], "\(listener.address) is used twice")
            }
            if listener.kind.requiresTLSConfig, config.tls == nil {
                throw fail(["listeners", "\(i)", "kind"], "a \(listener.kind.rawValue) listener needs tls.certificate and tls.key")
            }
            if listener.kind.requiresAuth, config.access.usersFile == nil {
                throw fail(["listeners", "\(i)", "kind"], "a \(listener.kind.rawValue) listener requires AUTH, so access.users_file must be set")
            }
        }
        if let tls = config.tls {
            if !isReadable(tls.certificate) { throw fail(["tls", "certificate"], "cannot read \(tls.certificate)") }
            if !isReadable(tls.key) { throw fail(["tls", "key"], "cannot read \(tls.key)") }
        }
        if let users = config.access.usersFile, !isReadable(users) {
            throw fail(["access", "users_file"], "cannot read \(users)")
        }
        if !config.access.allowedSenders.isEmpty, config.access.usersFile == nil {
            throw fail(["access", "allowed_senders"], "names users, but access.users_file is not set")
        }
        for (user, senders) in config.access.allowedSenders {
            for (i, sender) in senders.enumerated() {
                let parts = sender.split(separator: "@", omittingEmptySubsequences: false)
                if parts.count != 2 || parts[1].isEmpty || parts[1].contains(" ") {
                    throw fail(["access", "allowed_senders", user, "\(i)"], "'\(sender)' is neither user@domain nor @domain")
                }
            }
        }
        if config.limits.maxConnectionsPerClient > config.limits.maxConnections {
            throw fail(["limits", "max_connections_per_client"], "is larger than limits.max_connections")
        }
        var filterNames = Set<String>()
        let listenerNames = Set(config.listeners.map(\.name) + [ListenerConfig.localName])
        for (i, filter) in config.filters.enumerated() {
            if !filterNames.insert(filter.name).inserted { throw fail(["filters", "\(i)", "name"], "'\(filter.name)' is used twice") }
            for (j, l) in (filter.listeners ?? []).enumerated() where !listenerNames.contains(l) {
                throw fail(["filters", "\(i)", "listeners", "\(j)"], "no listener is named '\(l)'")
            }
        }
        var routeNames = Set<String>()
        for (i, route) in config.routes.enumerated() {
            if !routeNames.insert(route.name).inserted { throw fail(["routes", "\(i)", "name"], "'\(route.name)' is used twice") }
            if let caFile = route.smarthost?.caFile, !isReadable(caFile) {
                throw fail(["routes", "\(i)", "smarthost", "ca_file"], "cannot read \(caFile)")
            }
            if let auth = route.smarthost?.auth {
                do {
                    _ = try auth.readPassword()
                } catch {
                    throw fail(["routes", "\(i)", "smarthost", "auth", "password_file"], "\(auth.passwordFile): \(error.message)")
                }
            }
        }
    }

    // MARK: - Helpers

    public static func readFile(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n > 0 { bytes.append(contentsOf: chunk[0..<n]) }
            if n < chunk.count { break }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func isReadable(_ path: String) -> Bool { access(path, R_OK) == 0 }

    static func keyPath(_ path: [any CodingKey]) -> String {
        var out = ""
        for key in path {
            if let i = key.intValue {
                out += "[\(i)]"
            } else {
                out += out.isEmpty ? key.stringValue : ".\(key.stringValue)"
            }
        }
        return out
    }

    static func describe(_ error: DecodingError) -> ([any CodingKey], String) {
        switch error {
        case .keyNotFound(let key, let context):
            return (context.codingPath + [key], "is required")
        case .typeMismatch(let type, let context):
            return (context.codingPath, "expected \(typeName(type))")
        case .valueNotFound(let type, let context):
            return (context.codingPath, "expected \(typeName(type)), found nothing")
        case .dataCorrupted(let context):
            return (context.codingPath, context.debugDescription)
        @unknown default:
            return ([], "\(error)")
        }
    }

    static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Int.Type: return "a whole number"
        case is Bool.Type: return "true or false"
        default:
            return String(describing: type).hasPrefix("Array") ? "a list" : "a mapping"
        }
    }

    /// The line of the deepest node along `path` that exists in the file.
    static func line(of path: [any CodingKey], in root: Node, keyItself: Bool) -> Int? {
        var node = root
        var line = root.mark?.line
        for key in path {
            if let mapping = node.mapping {
                guard let pair = mapping.first(where: { $0.key.string == key.stringValue }) else { return line }
                line = (keyItself ? pair.key.mark?.line : pair.value.mark?.line) ?? line
                node = pair.value
            } else if let sequence = node.sequence, let i = key.intValue, i < sequence.count {
                node = sequence[i]
                line = node.mark?.line ?? line
            } else {
                return line
            }
        }
        return line
    }

    static func yamlErrorLine(_ error: YamlError) -> Int? {
        switch error {
        case .scanner(_, _, let mark, _), .parser(_, _, let mark, _), .composer(_, _, let mark, _):
            return mark.line
        default:
            return nil
        }
    }
}
