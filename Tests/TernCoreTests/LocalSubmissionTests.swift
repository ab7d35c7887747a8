import XCTest

@testable import TernCore

final class SendmailCommandLineTests: XCTestCase {
    func testWhatMailCronAndPHPSend() throws {
        // mail(1): sendmail -i -- user@example.org
        var line = try SendmailCommandLine(["-i", "--", "user@example.org"])
        XCTAssertTrue(line.ignoreDots)
        XCTAssertEqual(line.recipients, ["user@example.org"])
        // cron: sendmail -FCronDaemon -i -B8BITMIME -oem user
        line = try SendmailCommandLine(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
        XCTAssertEqual(line.fullName, "CronDaemon")
        XCTAssertEqual(line.recipients, ["root"])
        // PHP: sendmail -t -i, with -f appended by the application
        line = try SendmailCommandLine(["-t", "-i", "-fapp@example.com"])
        XCTAssertTrue(line.extractRecipients)
        XCTAssertEqual(line.sender, "app@example.com")
        // Clustered flags, values in the next word, a comma list as one argument.
        line = try SendmailCommandLine(["-ti", "-r", "<>", "-odb", "-oi", "a@x.example, b@y.example"])
        XCTAssertTrue(line.extractRecipients && line.ignoreDots)
        XCTAssertEqual(line.sender, "<>")
        XCTAssertEqual(line.recipients, ["a@x.example", "b@y.example"])
    }

    func testModes() throws {
        XCTAssertEqual(try SendmailCommandLine(["-bs"]).mode, .smtp)
        XCTAssertEqual(try SendmailCommandLine(["-bp"]).mode, .listQueue)
        XCTAssertEqual(try SendmailCommandLine(["-q"]).mode, .flushQueue)
        XCTAssertEqual(try SendmailCommandLine(["-q30m"]).mode, .flushQueue)
        XCTAssertEqual(try SendmailCommandLine(["-bi"]).mode, .initAliases)
        XCTAssertEqual(try SendmailCommandLine(["-bm", "a@b.example"]).mode, .deliver)
    }

    func testUsageErrors() {
        XCTAssertThrowsError(try SendmailCommandLine(["-Z"]))
        XCTAssertThrowsError(try SendmailCommandLine(["-f"]))  // no value
        XCTAssertThrowsError(try SendmailCommandLine(["-bd"]))
        XCTAssertThrowsError(try SendmailCommandLine(["-N", "never,success"]))
        XCTAssertThrowsError(try SendmailCommandLine(["-R", "body"]))
        XCTAssertNoThrow(try SendmailCommandLine(["-N", "success,failure", "-R", "hdrs", "-V", "id1"]))
    }
}

final class LocalMessageTests: XCTestCase {
    func testLineEndingsAndTheDot() {
        let input = Array("Subject: x\n\nline\r\n.\nafter\n".utf8)
        XCTAssertEqual(
            String(decoding: LocalMessage(input: input, ignoreDots: false, extractRecipients: false).content, as: UTF8.self),
            "Subject: x\r\n\r\nline\r\n")
        XCTAssertEqual(
            String(decoding: LocalMessage(input: input, ignoreDots: true, extractRecipients: false).content, as: UTF8.self),
            "Subject: x\r\n\r\nline\r\n.\r\nafter\r\n")
    }

    func testRecipientsFromHeadersAndBccRemoved() {
        let input = Array("To: A <a@x.example>,\n b@x.example\nBcc: hidden@y.example,\n\tother@y.example\nSubject: s\n\nTo: body@z.example\n".utf8)
        let m = LocalMessage(input: input, ignoreDots: true, extractRecipients: true)
        XCTAssertEqual(m.headerRecipients, ["a@x.example", "b@x.example", "hidden@y.example", "other@y.example"])
        XCTAssertEqual(
            String(decoding: m.content, as: UTF8.self),
            "To: A <a@x.example>,\r\n b@x.example\r\nSubject: s\r\n\r\nTo: body@z.example\r\n")
    }

    func testFromAddedOnlyWhenMissing() {
        let from = LocalMessage.fromLine(fullName: "Cron Daemon", address: "root@relay.example")
        XCTAssertEqual(from, "Cron Daemon <root@relay.example>")
        XCTAssertEqual(LocalMessage.fromLine(fullName: "Doe, Jane", address: "j@x"), "\"Doe, Jane\" <j@x>")
        var m = LocalMessage(input: Array("Subject: s\n\nx\n".utf8), ignoreDots: true, extractRecipients: false, fromLine: from)
        XCTAssertTrue(String(decoding: m.content, as: UTF8.self).hasPrefix("From: Cron Daemon <root@relay.example>\r\nSubject: s\r\n"))
        m = LocalMessage(input: Array("from: me@x\n\nx\n".utf8), ignoreDots: true, extractRecipients: false, fromLine: from)
        XCTAssertFalse(String(decoding: m.content, as: UTF8.self).contains("Cron"))
    }
}

final class MaildropFileTests: XCTestCase {
    func testRoundTrip() throws {
        let file = MaildropFile(
            sender: "", recipients: ["a@x.example", "b@y.example"], notify: "failure", ret: "hdrs", envid: "e1",
            content: Array("Subject: s\r\n\r\nbody\n".utf8))
        XCTAssertEqual(try MaildropFile(decoding: file.encoded), file)
    }

    func testRefusesWhatItDidNotWrite() {
        for text in [
            "not a maildrop file\n\nx", "tern-maildrop 1\nsender a@b\n\nx", "tern-maildrop 1\nrecipient a@b\n\nx",
            "tern-maildrop 1\nsender a@b\nrecipient c@d", "tern-maildrop 1\nsender a@b\nrecipient c@d\nbcc e@f\n\nx",
            "tern-maildrop 1\nsender a\u{1B}[2J@b\nrecipient c@d\n\nx", "tern-maildrop 1\nsender a@b\nsender c@d\nrecipient c@d\n\n",
            "tern-maildrop 1\nsender a@b> RET=FULL\nrecipient c@d\n\nx", "tern-maildrop 1\nsender a@b\nrecipient c@d> NOTIFY=NEVER\n\nx",
        ] {
            XCTAssertThrowsError(try MaildropFile(decoding: Array(text.utf8)), text)
        }
    }
}

final class MissingHeadersTests: XCTestCase {
    func testAddsOnlyWhatIsMissing() {
        var (headers, _) = HeaderBlock.parse(Array("Subject: s\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody".utf8))
        let added = MissingHeaders.add(to: &headers, sender: "a@x.example", queueID: "Q1", hostname: "relay.example", date: 0)
        XCTAssertEqual(added, ["From", "Message-ID"])
        XCTAssertEqual(headers.fields.map(\.name), ["Subject", "Date", "From", "Message-ID"])
        XCTAssertEqual(headers.fields[2].value, "<a@x.example>")
        XCTAssertEqual(headers.fields[3].value, "<19700101000000.Q1@relay.example>")
        // Nothing missing: nothing added.
        XCTAssertEqual(MissingHeaders.add(to: &headers, sender: "", queueID: "Q2", hostname: "h"), [])
    }

    func testNullSenderIsMailerDaemon() {
        var headers = HeaderBlock(fields: [])
        MissingHeaders.add(to: &headers, sender: "", queueID: "Q", hostname: "h", date: 0)
        XCTAssertEqual(headers.fields.first?.value, "MAILER-DAEMON")
    }
}
