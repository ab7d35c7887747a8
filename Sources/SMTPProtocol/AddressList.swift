/// The addresses in a `To:`, `Cc:` or `Bcc:` field's value, for `sendmail -t`.
///
/// ```
/// address-list = (address *("," address))
/// address      = mailbox / group
/// mailbox      = name-addr / addr-spec
/// name-addr    = [display-name] angle-addr
/// group        = display-name ":" [group-list] ";"
/// ```
/// Display names, quoted strings and comments are skipped; what is left of each mailbox is its
/// addr-spec, returned as written. An element with no `@` is returned too: the caller decides
/// (a local user name, to be qualified with the origin domain).
/// - SeeAlso: RFC 5322 §3.4
public enum AddressList {
    public static func addresses(in value: String) -> [String] {
        var result: [String] = []
        var current = ""  // the element outside quotes, comments and angle brackets
        var angle: String? = nil  // inside <…>
        var lastAngle: String? = nil
        var depth = 0  // comment nesting
        var quoted = false
        var escaped = false

        func finish() {
            let text = (lastAngle ?? current).trimmingSpaces
            if !text.isEmpty { result.append(text) }
            current = ""
            lastAngle = nil
        }

        for ch in value {
            if escaped {
                if angle != nil { angle!.append(ch) }
                escaped = false
                continue
            }
            if quoted {
                if ch == "\\" {
                    escaped = true
                } else if ch == "\"" {
                    quoted = false
                }
                // A quoted local part inside <…> is part of the address.
                if angle != nil { angle!.append(ch) }
                continue
            }
            if depth > 0 {
                if ch == "\\" {
                    escaped = true
                } else if ch == "(" {
                    depth += 1
                } else if ch == ")" {
                    depth -= 1
                }
                continue
            }
            switch ch {
            case "(":
                depth = 1
            case "\"":
                quoted = true
                if angle != nil { angle!.append(ch) }
            case "<":
                angle = ""
            case ">":
                if let a = angle { lastAngle = a }
                angle = nil
            case ":" where angle == nil:
                current = ""  // a group's display name
            case ",", ";":
                if angle == nil { finish() } else { angle!.append(ch) }
            case "\r", "\n":
                continue
            default:
                if angle != nil { angle!.append(ch) } else { current.append(ch) }
            }
        }
        finish()
        // A display name left over in front of an angle address was dropped with it; a bare
        // display name without an address (`undisclosed-recipients:;`) leaves nothing.
        return result.filter { !$0.contains(" ") || $0.hasPrefix("\"") }
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}
