import TernCore

/// Rewrites the header section by ordered rules: each rule's pattern is matched against one
/// whole logical header (`Name: value`, folded continuation lines included) and the rule
/// removes it, replaces it with another header line, or adds a header line before or after
/// it. The built-in rules hide what an outbound relay should not show the world: `Received:`
/// lines naming private or loopback addresses or `localhost`, `X-Originating-IP`,
/// `X-PHP-Originating-Script`, and (when asked) `X-Mailer`. A message that no rule matches
/// passes byte for byte.
public struct HeaderRewriteFilter: MessageFilter {
    public enum Action: String, Sendable, Decodable, CaseIterable { case remove, replace, prepend, append }

    public struct Rule: @unchecked Sendable {
        /// Regex is immutable once built; it is only matched against here.
        public var pattern: String
        var regex: Regex<AnyRegexOutput>
        /// Lowercased header name the rule can only match, to skip the regex for others.
        var onlyHeader: String?
        public var action: Action
        /// The header line for replace, prepend and append (`Name: value`).
        public var with: String?

        public init(pattern: String, action: Action, with: String? = nil, onlyHeader: String? = nil) throws {
            self.pattern = pattern
            self.regex = try Regex(pattern)
            self.action = action
            self.with = with
            self.onlyHeader = onlyHeader?.lowercased()
        }

        func matches(_ field: HeaderBlock.Field) -> Bool {
            if let only = onlyHeader, field.name.lowercased() != only { return false }
            // A rule sees at most the first `matchedLength` bytes of a field (Postfix cuts
            // headers at header_size_limit for header_checks alike): a 9 MB folded header
            // must not cost seconds of regex time.
            let text = field.raw.count > HeaderRewriteFilter.matchedLength
                ? String(decoding: field.raw.prefix(HeaderRewriteFilter.matchedLength), as: UTF8.self) : field.text
            return (try? regex.firstMatch(in: text)) != nil
        }
    }

    public let name: String
    public let rules: [Rule]
    /// How much of one header field the rules are matched against.
    public static let matchedLength = 16 * 1024

    public init(name: String, rules: [Rule]) {
        self.name = name
        self.rules = rules
    }

    /// Private (RFC 1918), loopback, unique-local IPv6 (fc00::/7) addresses and `localhost`,
    /// as they appear in a Received line: in brackets, parentheses or after "from"/"by".
    static let privateAddress =
        #"(?is)^Received:.*(\b10\.\d{1,3}\.\d{1,3}\.\d{1,3}\b|\b172\.(1[6-9]|2\d|3[01])\.\d{1,3}\.\d{1,3}\b|\b192\.168\.\d{1,3}\.\d{1,3}\b|\b127\.\d{1,3}\.\d{1,3}\.\d{1,3}\b|[\[\s(:]f[cd][0-9a-f]{2}:[0-9a-f:]*|\blocalhost\b)"#

    public static func defaultRules(stripXMailer: Bool) throws -> [Rule] {
        var rules = [
            try Rule(pattern: privateAddress, action: .remove, onlyHeader: "Received"),
            try Rule(pattern: "(?i)^X-Originating-IP:", action: .remove, onlyHeader: "X-Originating-IP"),
            try Rule(pattern: "(?i)^X-PHP-Originating-Script:", action: .remove, onlyHeader: "X-PHP-Originating-Script"),
        ]
        if stripXMailer { rules.append(try Rule(pattern: "(?i)^X-Mailer:", action: .remove, onlyHeader: "X-Mailer")) }
        return rules
    }

    public func endOfMessage(_ session: FilterSession, _ message: inout FilterMessage) async throws -> FilterVerdict {
        let headers = message.headers
        message.headers = try await FilterWork.run { [self] in rewrite(headers) }
        return .continue
    }

    /// Each header goes through the rules in order; the first rule that matches decides.
    public func rewrite(_ block: HeaderBlock) -> HeaderBlock {
        var out: [HeaderBlock.Field] = []
        out.reserveCapacity(block.fields.count)
        var changed = false
        for field in block.fields {
            guard let rule = rules.first(where: { $0.matches(field) }) else {
                out.append(field)
                continue
            }
            changed = true
            let line = rule.with.map(Self.field)
            switch rule.action {
            case .remove: break
            case .replace: out.append(line!)
            case .prepend: out += [line!, field]
            case .append: out += [field, line!]
            }
        }
        return changed ? HeaderBlock(fields: out) : block
    }

    static func field(_ line: String) -> HeaderBlock.Field {
        let name = line.split(separator: ":", maxSplits: 1).first.map(String.init) ?? ""
        return HeaderBlock.Field(name: name, raw: Array((line + "\r\n").utf8))
    }
}

/// `type: header_rewrite` in `filters:`.
public enum HeaderRewritePlugin: FilterPlugin {
    public static let type = "header_rewrite"

    struct Settings: Decodable, @unchecked Sendable {
        var rules: [HeaderRewriteFilter.Rule]

        enum CodingKeys: String, CodingKey, CaseIterable {
            case defaults
            case stripXMailer = "strip_x_mailer"
            case rules
        }

        struct RuleConfig: Decodable {
            var rule: HeaderRewriteFilter.Rule
            enum CodingKeys: String, CodingKey, CaseIterable { case match, action, with }

            init(from decoder: any Decoder) throws {
                try decoder.rejectUnknownKeys(CodingKeys.self)
                let c = try decoder.container(keyedBy: CodingKeys.self)
                let pattern = try c.decode(String.self, forKey: .match)
                let action = try c.decodeEnum(.action) as HeaderRewriteFilter.Action? ?? .remove
                let with = try c.decodeIfPresent(String.self, forKey: .with)
                if action != .remove {
                    guard let w = with else {
                        throw DecodingError.keyNotFound(
                            CodingKeys.with, .init(codingPath: c.codingPath, debugDescription: "\(action.rawValue) needs `with:`"))
                    }
                    guard let colon = w.firstIndex(of: ":"), colon > w.startIndex, !w[..<colon].contains(" "), !w.contains("\n"), !w.contains("\r")
                    else {
                        throw DecodingError.dataCorruptedError(forKey: .with, in: c, debugDescription: "'\(w)' is not a header line such as 'X-Name: value'")
                    }
                }
                do {
                    rule = try HeaderRewriteFilter.Rule(pattern: pattern, action: action, with: with)
                } catch {
                    throw DecodingError.dataCorruptedError(forKey: .match, in: c, debugDescription: "'\(pattern)' is not a valid regular expression: \(error)")
                }
            }
        }

        init(from decoder: any Decoder) throws {
            try decoder.rejectUnknownKeys(CodingKeys.self)
            let c = try decoder.container(keyedBy: CodingKeys.self)
            let defaults = try c.decodeIfPresent(Bool.self, forKey: .defaults) ?? true
            let stripXMailer = try c.decodeIfPresent(Bool.self, forKey: .stripXMailer) ?? false
            let own = try c.decodeIfPresent([RuleConfig].self, forKey: .rules)?.map(\.rule) ?? []
            rules = own + (defaults ? try HeaderRewriteFilter.defaultRules(stripXMailer: stripXMailer) : [])
        }

        init(rules: [HeaderRewriteFilter.Rule]) { self.rules = rules }
    }

    public static func settings(from decoder: (any Decoder)?) throws -> any Sendable {
        guard let decoder else { return Settings(rules: try HeaderRewriteFilter.defaultRules(stripXMailer: false)) }
        return try Settings(from: decoder)
    }

    public static func make(name: String, settings: any Sendable) throws -> any MessageFilter {
        HeaderRewriteFilter(name: name, rules: (settings as! Settings).rules)
    }
}
