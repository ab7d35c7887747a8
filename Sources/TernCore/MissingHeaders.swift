#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The header fields a mail program leaves out, added as Postfix's cleanup adds them to local
/// mail: `From:` (the envelope sender), `Date:` and `Message-ID:`, each only when the message
/// has none. `cron`, `mail` and many application servers send without some of them, and
/// receivers score a message without `Date:` or `Message-ID:` as spam.
/// - SeeAlso: RFC 5322 §3.6 (From and Date are required; Message-ID should be present)
public enum MissingHeaders {
    /// Adds the missing fields at the end of the header section; returns their names.
    @discardableResult
    public static func add(
        to headers: inout HeaderBlock, sender: String, queueID: String, hostname: String, date: time_t = time(nil)
    ) -> [String] {
        var added: [HeaderBlock.Field] = []
        let present = Set(headers.fields.map { $0.name.lowercased() })
        let has = { (name: String) in present.contains(name.lowercased()) }
        if !has("From") && !has("Resent-From") {
            added.append(HeaderBlock.Field(name: "From", value: sender.isEmpty ? "MAILER-DAEMON" : "<\(sender)>"))
        }
        if !has("Date") && !has("Resent-Date") {
            added.append(HeaderBlock.Field(name: "Date", value: MailDate.rfc5322(date)))
        }
        if !has("Message-ID") && !has("Resent-Message-ID") {
            added.append(HeaderBlock.Field(name: "Message-ID", value: "<\(MailDate.compact(date)).\(queueID)@\(hostname)>"))
        }
        // The header section ends at the first line that is not a field.
        let end = headers.fields.firstIndex { $0.name.isEmpty } ?? headers.fields.endIndex
        headers.fields.insert(contentsOf: added, at: end)
        return added.map(\.name)
    }
}
