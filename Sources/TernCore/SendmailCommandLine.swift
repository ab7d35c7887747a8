/// The `sendmail` command line as `mail`, cron, PHP's `mail()` and logwatch write it, read
/// the way Postfix's sendmail reads it: getopt-style clustered flags (`-ti`, `-oi`), option
/// values attached or separate (`-fuser`, `-f user`), options that mean nothing to a relay
/// accepted and ignored, recipients after the options.
/// - SeeAlso: Postfix `sendmail(1)`
public struct SendmailCommandLine: Equatable, Sendable {
    public enum Mode: Equatable, Sendable {
        /// `-bm` (the default): read a message from standard input and send it.
        case deliver
        /// `-bs`: SMTP on standard input and output.
        case smtp
        /// `-bp` or `mailq`: list the queue.
        case listQueue
        /// `-q`: attempt delivery of the queue now.
        case flushQueue
        /// `-bi` or `newaliases`: Tern keeps no local alias table; nothing to do.
        case initAliases
    }

    public var mode: Mode = .deliver
    /// `-f` / `-r`: the envelope sender. `""` is the null sender.
    public var sender: String?
    /// `-F`: the sender's full name, for a `From:` header the message lacks.
    public var fullName: String?
    /// `-t`: recipients from the `To:`, `Cc:` and `Bcc:` headers, and `Bcc:` removed.
    public var extractRecipients = false
    /// `-i`, `-oi`: a line with a single dot does not end the message.
    public var ignoreDots = false
    /// `-N`: DSN NOTIFY (`never`, or any of `success,failure,delay`).
    public var notify: String?
    /// `-R`: DSN RET (`full` or `hdrs`).
    public var ret: String?
    /// `-V`: DSN ENVID.
    public var envid: String?
    /// `-C`: Tern's config file.
    public var config: String?
    /// `-v`: print the SMTP dialogue with the daemon on standard error.
    public var verbose = false
    public var recipients: [String] = []

    public struct UsageError: Error, Equatable, CustomStringConvertible {
        public var description: String
    }

    /// Options whose value is ignored, as Postfix's sendmail ignores them.
    static let ignoredWithValue: Set<Character> = ["B", "L", "O", "X", "e", "h", "p"]
    static let ignoredFlags: Set<Character> = ["G", "I", "U", "c", "m", "n", "x"]

    public init() {}

    /// Parses `arguments` (without the program name).
    public init(_ arguments: [String]) throws(UsageError) {
        var i = 0
        var operandsOnly = false
        while i < arguments.count {
            let argument = arguments[i]
            i += 1
            if operandsOnly || !argument.hasPrefix("-") || argument == "-" {
                recipients.append(contentsOf: Self.split(argument))
                continue
            }
            if argument == "--" {
                operandsOnly = true
                continue
            }
            var rest = Substring(argument.dropFirst())
            while let option = rest.first {
                rest = rest.dropFirst()
                // The value of an option that takes one: the rest of this word, or the next.
                func value() throws(UsageError) -> String {
                    if !rest.isEmpty {
                        defer { rest = "" }
                        return String(rest)
                    }
                    guard i < arguments.count else { throw UsageError(description: "option -\(option) needs a value") }
                    i += 1
                    return arguments[i - 1]
                }
                switch option {
                case "t": extractRecipients = true
                case "i": ignoreDots = true
                case "v": verbose = true
                case "f", "r": sender = try value()
                case "F": fullName = try value()
                case "N": notify = try value()
                case "R": ret = try value()
                case "V": envid = try value()
                case "C": config = try value()
                case "o":
                    // -oi is -i; -oem, -odb, -oep, -om … change nothing for a relay.
                    if try value().hasPrefix("i") { ignoreDots = true }
                case "b":
                    switch try value() {
                    case "m": mode = .deliver
                    case "s": mode = .smtp
                    case "p": mode = .listQueue
                    case "i": mode = .initAliases
                    case let other:
                        throw UsageError(description: "-b\(other) is not supported (use -bm, -bs, -bp or -bi; `tern serve` runs the daemon)")
                    }
                case "q":
                    // -q, -q30m, -qR…: one flush now; an interval means nothing here.
                    mode = .flushQueue
                    rest = ""
                case let c where Self.ignoredWithValue.contains(c):
                    _ = try value()
                case let c where Self.ignoredFlags.contains(c):
                    break
                default:
                    throw UsageError(description: "unknown option -\(option)")
                }
            }
        }
        if let notify {
            let words = notify.lowercased().split(separator: ",").map(String.init)
            let known: Set<String> = ["never", "success", "failure", "delay"]
            guard !words.isEmpty, words.allSatisfy(known.contains), !(words.contains("never") && words.count > 1) else {
                throw UsageError(description: "-N \(notify): use never, or any of success,failure,delay")
            }
        }
        if let ret, !["full", "hdrs"].contains(ret.lowercased()) {
            throw UsageError(description: "-R \(ret): use full or hdrs")
        }
    }

    /// `a@example.com, b@example.com` in one argument is two recipients, as `mail` writes them.
    static func split(_ argument: String) -> [String] {
        argument.split(separator: ",").map { $0.trimmingCharacters(in: " \t") }.filter { !$0.isEmpty }
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = self
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
