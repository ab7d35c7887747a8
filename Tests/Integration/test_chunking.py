"""BDAT (RFC 3030) on the wire: chunks are counted, never parsed; refusals still read them.
And pipelining (RFC 2920): replies to a group of commands go out together."""
import socket
import struct

from conftest import RawClient, authenticated_outsider, good_transaction, open_transaction


def data_segments_in(sock):
    """Segments carrying data this socket has received (Linux TCP_INFO tcpi_data_segs_in)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 152)[0]


def test_replies_to_a_pipelined_group_go_out_together(make_tern):
    """RFC 2920 §3.2: the server sends the replies to a group in one write, not one segment
    per command. Without batching the four replies below come as four segments."""
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    assert c.cmd("EHLO client.test")[0] == 250
    before = data_segments_in(c.sock)
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.org>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    assert data_segments_in(c.sock) - before == 1
    # A refusal inside the group is batched too, and the group after it still works.
    c.send(b".\r\n")
    assert c.reply()[0] == 250
    before = data_segments_in(c.sock)
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bad address>\r\nRCPT TO:<u@example.org>\r\nNOOP\r\n")
    codes = [c.reply()[0] for _ in range(4)]
    assert codes[0] == 250 and codes[1] >= 500 and codes[2:] == [250, 250], codes
    assert data_segments_in(c.sock) - before == 1
    assert c.cmd("QUIT")[0] == 221


def bdat(c, data: bytes, last=False):
    c.send(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data)
    return c.reply()


def test_message_in_chunks(make_tern):
    tern = make_tern()
    probe = RawClient(tern.port("mx"))
    assert "CHUNKING" in probe.cmd("EHLO client.test")[1].split("\n")
    probe.close()
    c = open_transaction(tern.port("mx"))
    assert bdat(c, b"Subject: chunks\r\n\r\n") == (250, "2.0.0 19 octets received")
    # What DATA would treat as an end and as commands is plain message text here.
    assert bdat(c, b"line\r\n.\r\nQUIT\r\n")[0] == 250
    code, text = bdat(c, b"last line\r\n", last=True)
    assert code == 250 and "queued as" in text
    [q] = tern.queue()
    assert tern.message_bytes(q["id"]).endswith(b"Subject: chunks\r\n\r\nline\r\n.\r\nQUIT\r\nlast line\r\n")
    assert c.cmd("NOOP")[0] == 250


def test_pipelined_bdat(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.org>\r\n"
           b"BDAT 12\r\nSubject: x\r\nBDAT 4 LAST\r\n\r\nx\nQUIT\r\n")
    codes = [c.reply()[0] for _ in range(6)]
    assert codes == [250, 250, 250, 250, 250, 221]
    [q] = tern.queue()
    # A trusted client's bare LF is normalised, as with DATA.
    assert tern.message_bytes(q["id"]).endswith(b"Subject: x\r\n\r\nx\r\n")


def test_refused_bdat_still_consumes_its_chunk(make_tern):
    tern = make_tern()
    c = RawClient(tern.port("mx"))
    c.cmd("EHLO client.test")
    code, _ = bdat(c, b"MAIL FROM:<evil@x.test>\r\n", last=True)
    assert code == 503
    # Had the chunk been read as commands, this RCPT would be accepted.
    assert c.cmd("RCPT TO:<u@example.org>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    good_transaction(tern.port("mx"))


def test_bdat_limits_and_reset(make_tern):
    tern = make_tern(limits="{ max_message_size: 1KB }")
    c = open_transaction(tern.port("mx"))
    assert bdat(c, b"x" * 800)[0] == 250
    code, text = bdat(c, b"y" * 800)
    assert code == 552 and text.startswith("5.3.4")
    assert tern.queue() == [] and tern.spool_files() == []
    # The transaction is over; a new one works, and RSET abandons a sequence.
    assert c.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert c.cmd("RCPT TO:<u@example.org>")[0] == 250
    assert bdat(c, b"Subject: dropped\r\n")[0] == 250
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("RSET")[0] == 250
    assert tern.spool_files() == []
    c.close()
    good_transaction(tern.port("mx"))
    assert len(tern.queue()) == 1


def test_bdat_bare_lf_from_untrusted_client(make_tern, certs, users_file):
    tern = make_tern(mynetworks=["127.0.0.1/32"], tls=certs, users=users_file)
    s = authenticated_outsider(tern, certs)
    s.mail("alice@client.test")
    s.rcpt("u@example.org")
    body = b"Subject: lf\n\nbare\n"
    s.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
    code, text = s.getreply()
    assert code == 550 and text.startswith(b"5.6.2")
    assert tern.queue() == []


def test_client_vanishing_between_chunks_queues_nothing(make_tern):
    tern = make_tern()
    c = open_transaction(tern.port("mx"))
    assert bdat(c, b"Subject: half\r\n")[0] == 250
    c.send(b"BDAT 100\r\nonly part")
    c.close()
    import time
    time.sleep(0.5)
    assert tern.queue() == [] and tern.spool_files() == []
