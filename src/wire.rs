//! The data channel between a primary and one worker: a Unix stream socket
//! carrying fixed-size records, with connection descriptors in `SCM_RIGHTS`.
//!
//! Some records own descriptors (`Conn` and `Return` one each, `Lease`
//! three). A message (one `sendmsg`) that carries descriptors starts on a
//! record boundary, and its first record says how many it carries; its
//! records take them in order. The kernel gives a message's descriptors,
//! all together, to the read that takes its first byte (before or with the
//! record that opens it), so the receiver keeps them in arrival order and
//! each opening record claims its count. That survives any split of the
//! byte stream (a short write sends its rest later, alone). When the
//! receiver could not take every descriptor (out of fds: the kernel
//! truncates `SCM_RIGHTS` and drops the rest), the read says so: a message
//! whose count that read cannot fill lost the rest, and its records that
//! find none are marked lost, to be declined, never given the next
//! message's descriptors.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, MsgFlags};

use crate::sys::{self, SysResult, Syscall};

pub const RECORD_LEN: usize = 12;
/// Most descriptors in one message. Both ends size their buffers for it.
pub const MAX_FDS_PER_MSG: usize = 32;
/// The kind word's high half: in the first record of a message that
/// carries descriptors, how many (`send` sets it).
const CARRIED_SHIFT: u32 = 16;
const KIND_MASK: u32 = (1 << CARRIED_SHIFT) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// primary → worker: a connection for `listener`; carries one fd.
    Conn { listener: u32, seq: u32 },
    /// worker → primary: the worker took connection `seq` (or declined it).
    Ack { seq: u32, accepted: bool },
    /// worker → primary: send me connections of `listener` from now on.
    /// (Under the ledger the primary joins the worker itself as it answers
    /// the worker's query, and the worker sends none.)
    Ready { listener: u32 },
    /// worker → primary: stop sending connections of `listener`.
    Gone { listener: u32 },
    /// primary → worker: accept on `listener` yourself, as `slot` of its
    /// ledger; carries the listening socket, the ledger and its progress eventfd.
    Lease { listener: u32, slot: u32 },
    /// primary → worker: no lease on `listener` after all (no slot or
    /// descriptor left); the worker gets only what others return.
    NoLease { listener: u32 },
    /// worker → primary: a connection of `listener` that the worker accepted
    /// itself but cannot take; carries it, for another worker.
    Return { listener: u32 },
}

const CONN: u32 = 1;
const ACK: u32 = 2;
const READY: u32 = 3;
const GONE: u32 = 4;
const LEASE: u32 = 5;
const RETURN: u32 = 6;
const NO_LEASE: u32 = 7;

/// How many descriptors a record of this kind carries.
fn fds_carried(kind: u32) -> usize {
    match kind {
        CONN | RETURN => 1,
        LEASE => 3,
        _ => 0,
    }
}

impl Record {
    pub fn encode(self, out: &mut Vec<u8>) {
        let (kind, a, b) = match self {
            Record::Conn { listener, seq } => (CONN, listener, seq),
            Record::Ack { seq, accepted } => (ACK, seq, accepted as u32),
            Record::Ready { listener } => (READY, listener, 0),
            Record::Gone { listener } => (GONE, listener, 0),
            Record::Lease { listener, slot } => (LEASE, listener, slot),
            Record::Return { listener } => (RETURN, listener, 0),
            Record::NoLease { listener } => (NO_LEASE, listener, 0),
        };
        for word in [kind, a, b] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
    }

    /// `None` for an unknown kind: a malformed record is skipped, never fatal.
    pub fn decode(bytes: &[u8; RECORD_LEN]) -> Option<Record> {
        let word = |i: usize| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        let (a, b) = (word(1), word(2));
        match word(0) & KIND_MASK {
            CONN => Some(Record::Conn { listener: a, seq: b }),
            ACK if b <= 1 => Some(Record::Ack { seq: a, accepted: b == 1 }),
            READY => Some(Record::Ready { listener: a }),
            GONE => Some(Record::Gone { listener: a }),
            LEASE => Some(Record::Lease { listener: a, slot: b }),
            RETURN => Some(Record::Return { listener: a }),
            NO_LEASE => Some(Record::NoLease { listener: a }),
            _ => None,
        }
    }
}

/// Reassembles records from a byte stream and gives each the descriptors it carries.
#[derive(Default)]
pub struct Decoder {
    bytes: Vec<u8>,
    /// Descriptors not yet claimed by a message, by the read that brought them.
    arrived: VecDeque<Arrival>,
    /// What the message being decoded has left, in order.
    current: VecDeque<OwnedFd>,
}

struct Arrival {
    fds: VecDeque<OwnedFd>,
    /// The kernel dropped the rest of the message these end in.
    truncated: bool,
}

/// A decoded record with the descriptors it carries, in the order sent, or
/// `None` when some were lost to a truncated `SCM_RIGHTS` message.
#[derive(Debug)]
pub struct Incoming {
    pub record: Record,
    pub fds: Option<Vec<OwnedFd>>,
}

/// What one `recv` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub bytes: usize,
    /// How many descriptors this read brought.
    pub fds: usize,
    /// Some descriptors of this read were dropped (MSG_CTRUNC).
    pub truncated: bool,
}

impl Received {
    /// Whether this read emptied the socket: it was shorter than the buffer,
    /// and it did not end after a message with descriptors, as a read does
    /// whatever may be behind it.
    pub fn emptied(&self, buf_len: usize) -> bool {
        self.bytes < buf_len && self.fds == 0 && !self.truncated
    }
}

impl Decoder {
    /// Adds one read: its bytes, the descriptors it brought, and whether the
    /// kernel dropped some of them (a message's, even when none arrived).
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>, truncated: bool) {
        self.bytes.extend_from_slice(bytes);
        if !fds.is_empty() || truncated {
            self.arrived.push_back(Arrival { fds: fds.into(), truncated });
        }
    }

    /// The descriptors of a message that carries `count`: fewer when the
    /// kernel dropped some of them.
    fn claim(&mut self, count: usize) {
        // What the last message left over (only a malformed one leaves any) is closed.
        self.current.clear();
        while self.current.len() < count {
            let Some(arrival) = self.arrived.front_mut() else { break };
            if arrival.fds.is_empty() {
                let truncated = arrival.truncated;
                self.arrived.pop_front();
                if truncated {
                    break;
                }
                continue;
            }
            let take = (count - self.current.len()).min(arrival.fds.len());
            self.current.extend(arrival.fds.drain(..take));
        }
    }

    /// Decodes every whole record received so far.
    pub fn drain(&mut self, out: &mut Vec<Incoming>) {
        let whole = self.bytes.len() / RECORD_LEN * RECORD_LEN;
        let mut bytes = std::mem::take(&mut self.bytes);
        for chunk in bytes[..whole].chunks_exact(RECORD_LEN) {
            let kind = u32::from_ne_bytes(chunk[..4].try_into().unwrap());
            let count = (kind >> CARRIED_SHIFT) as usize;
            if count > 0 {
                self.claim(count);
            }
            let wanted = fds_carried(kind & KIND_MASK);
            let taken = wanted.min(self.current.len());
            let fds: Vec<OwnedFd> = self.current.drain(..taken).collect();
            let Some(record) = Record::decode(chunk.try_into().unwrap()) else { continue };
            // Too few: lost to a truncated read (or never sent); the ones
            // that did come are closed with `fds`.
            let fds = (taken == wanted).then_some(fds);
            out.push(Incoming { record, fds });
        }
        bytes.drain(..whole);
        self.bytes = bytes;
    }
}

/// Writes `bytes` with `fds` attached, without blocking. Returns the bytes sent:
/// when fewer than all, every fd went with them and the rest must follow alone.
///
/// With descriptors, `bytes` must be whole records, those that carry them
/// among them; `send` marks the first.
pub fn send(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> SysResult<usize> {
    debug_assert!(fds.len() <= MAX_FDS_PER_MSG);
    if fds.is_empty() {
        return socket::sendmsg::<()>(fd, &[IoSlice::new(bytes)], &[], MsgFlags::MSG_DONTWAIT, None).syscall("sendmsg");
    }
    debug_assert!(bytes.len() >= RECORD_LEN && bytes.len().is_multiple_of(RECORD_LEN));
    let (kind, rest) = bytes.split_at(4);
    let kind = opening(kind, fds.len());
    let iov = [IoSlice::new(&kind), IoSlice::new(rest)];
    socket::sendmsg::<()>(fd, &iov, &[ControlMessage::ScmRights(fds)], MsgFlags::MSG_DONTWAIT, None).syscall("sendmsg")
}

/// The kind word of a message's first record, with the count of descriptors the message carries.
fn opening(kind: &[u8], carried: usize) -> [u8; 4] {
    (u32::from_ne_bytes(kind.try_into().unwrap()) | (carried as u32) << CARRIED_SHIFT).to_ne_bytes()
}

/// Reads what is there (blocking or not, as the socket is); zero bytes is end
/// of stream. Received fds are owned and close-on-exec before anything else
/// sees them.
pub fn recv(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> SysResult<Received> {
    recv_with_room(fd, buf, fds, MAX_FDS_PER_MSG)
}

/// `recv` with room for `room` descriptors.
///
/// Our peer never sends more than MAX_FDS_PER_MSG, so a truncated read
/// (MSG_CTRUNC) means we ran out of descriptors while the kernel installed
/// them: it installs what it can, and those are ours to own (and close) even
/// so. nix's `RecvMsg::cmsgs()` refuses to walk a truncated control buffer,
/// hence the walk by hand.
fn recv_with_room(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>, room: usize) -> SysResult<Received> {
    let had = fds.len();
    let fd_len = std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((room * fd_len) as u32) } as usize;
    // u64 elements: the buffer is aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both alive
    // and of the lengths given, for the duration of the call.
    let read = unsafe { libc::recvmsg(fd, &mut msg, sys::recv_cloexec_flags().bits()) };
    let read = nix::errno::Errno::result(read).syscall("recvmsg")?;
    // SAFETY: the kernel filled `control` and set msg_controllen; the first
    // header, if any, lies within it.
    let mut header = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !header.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR only return headers that lie
        // within msg_controllen.
        let (level, kind, len) = unsafe { ((*header).cmsg_level, (*header).cmsg_type, (*header).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let count = len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize) / fd_len;
            // SAFETY: an SCM_RIGHTS payload of `len` bytes holds `count`
            // descriptors, possibly unaligned.
            let raw: Vec<RawFd> = (0..count)
                .map(|i| unsafe { libc::CMSG_DATA(header).cast::<RawFd>().add(i).read_unaligned() })
                .collect();
            fds.extend(sys::adopt_received(&raw));
        }
        // SAFETY: `header` is a valid header within `msg`'s control buffer.
        header = unsafe { libc::CMSG_NXTHDR(&msg, header) };
    }
    Ok(Received { bytes: read as usize, fds: fds.len() - had, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    fn encode_all(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        records.iter().for_each(|r| r.encode(&mut out));
        out
    }

    /// `records` as `send` writes them with `carried` descriptors.
    fn message(records: &[Record], carried: usize) -> Vec<u8> {
        let mut out = encode_all(records);
        let kind = opening(&out[..4], carried);
        out[..4].copy_from_slice(&kind);
        out
    }

    /// Every whole record `d` holds, and each with how many descriptors it
    /// got (`None`: lost).
    fn drained(d: &mut Decoder) -> (Vec<Incoming>, Vec<(Record, Option<usize>)>) {
        let mut out = Vec::new();
        d.drain(&mut out);
        let shapes = out.iter().map(|i| (i.record, i.fds.as_ref().map(|f| f.len()))).collect();
        (out, shapes)
    }

    /// Whether the descriptor `incoming` got is one of the socket whose
    /// other end is `peer`: a byte written there reads through it.
    fn reaches(incoming: &Incoming, peer: &OwnedFd, byte: u8) -> bool {
        nix::unistd::write(peer.as_fd(), &[byte]).unwrap();
        let mut one = [0u8; 1];
        let n = nix::unistd::read(incoming.fds.as_ref().unwrap()[0].as_fd(), &mut one).unwrap();
        n == 1 && one[0] == byte
    }

    #[test]
    fn records_round_trip() {
        let all = [
            Record::Conn { listener: 7, seq: u32::MAX },
            Record::Ack { seq: 3, accepted: true },
            Record::Ack { seq: 4, accepted: false },
            Record::Ready { listener: 1 },
            Record::Gone { listener: 2 },
            Record::Lease { listener: 3, slot: 254 },
            Record::Return { listener: 4 },
            Record::NoLease { listener: 5 },
        ];
        for r in all {
            let mut out = Vec::new();
            r.encode(&mut out);
            assert_eq!(out.len(), RECORD_LEN);
            assert_eq!(Record::decode(out.as_slice().try_into().unwrap()), Some(r));
        }
    }

    #[test]
    fn malformed_records_are_skipped_and_a_conn_sent_without_its_fd_is_lost() {
        let mut bytes = encode_all(&[Record::Ready { listener: 1 }]);
        bytes.extend_from_slice(&[0xff; RECORD_LEN]); // unknown kind
        let mut bad_ack = Vec::new();
        for w in [ACK, 1u32, 9] {
            bad_ack.extend_from_slice(&w.to_ne_bytes());
        }
        bytes.extend_from_slice(&bad_ack);
        bytes.extend(encode_all(&[Record::Conn { listener: 1, seq: 1 }])); // no fd for it
        bytes.extend(encode_all(&[Record::Gone { listener: 1 }]));
        let mut d = Decoder::default();
        d.push(&bytes, vec![], false);
        assert_eq!(
            drained(&mut d).1,
            vec![
                (Record::Ready { listener: 1 }, Some(0)),
                (Record::Conn { listener: 1, seq: 1 }, None),
                (Record::Gone { listener: 1 }, Some(0))
            ]
        );
    }

    #[test]
    fn decoder_handles_split_records_and_pairs_fds_in_order() {
        let (a, b) = sys::stream_pair().unwrap();
        let (x, _y) = sys::stream_pair().unwrap();
        let (sa, sb) = sys::stream_pair().unwrap();
        let ack = encode_all(&[Record::Ack { seq: 5, accepted: true }]);
        let conns = encode_all(&[Record::Conn { listener: 1, seq: 10 }, Record::Conn { listener: 2, seq: 11 }]);
        assert_eq!(send(sa.as_raw_fd(), &ack, &[]).unwrap(), ack.len());
        assert_eq!(send(sa.as_raw_fd(), &conns, &[a.as_raw_fd(), x.as_raw_fd()]).unwrap(), conns.len());
        // Read five bytes at a time: records split across reads, and the
        // descriptors come with a read that starts inside the Ack.
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut total = 0;
        while total < ack.len() + conns.len() {
            let mut buf = [0u8; 5];
            let mut got = Vec::new();
            let n = recv(sb.as_raw_fd(), &mut buf, &mut got).unwrap().bytes;
            total += n;
            d.push(&buf[..n], got, false);
            d.drain(&mut out);
        }
        let got: Vec<(Record, Option<usize>)> =
            out.iter().map(|i| (i.record, i.fds.as_ref().map(|f| f.len()))).collect();
        assert_eq!(
            got,
            vec![
                (Record::Ack { seq: 5, accepted: true }, Some(0)),
                (Record::Conn { listener: 1, seq: 10 }, Some(1)),
                (Record::Conn { listener: 2, seq: 11 }, Some(1)),
            ]
        );
        // The received fds are new descriptors for the same sockets, in order.
        assert!(reaches(&out[1], &b, 1));
        let first = &out[1].fds.as_ref().unwrap()[0];
        let flags = nix::fcntl::fcntl(first.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fds must be close-on-exec");
    }

    #[test]
    fn a_truncated_read_still_owns_the_descriptors_that_did_arrive() {
        let (sa, sb) = sys::stream_pair().unwrap();
        let peers: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| sys::stream_pair().unwrap()).collect();
        let raw: Vec<RawFd> = peers.iter().map(|(p, _)| p.as_raw_fd()).collect();
        let bytes = encode_all(&[
            Record::Conn { listener: 1, seq: 1 },
            Record::Conn { listener: 1, seq: 2 },
            Record::Conn { listener: 1, seq: 3 },
        ]);
        assert_eq!(send(sa.as_raw_fd(), &bytes, &raw).unwrap(), bytes.len());
        // Room for two: the kernel installs two and truncates.
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        let received = recv_with_room(sb.as_raw_fd(), &mut buf, &mut got, 2).unwrap();
        assert!(received.truncated);
        assert_eq!(got.len(), 2, "the two installed descriptors are ours (and closed with us)");
        let mut d = Decoder::default();
        d.push(&buf[..received.bytes], got, true);
        let (out, shapes) = drained(&mut d);
        let fds: Vec<Option<usize>> = shapes.into_iter().map(|(_, n)| n).collect();
        assert_eq!(fds, vec![Some(1), Some(1), None]);
        // In order: the first one is the first socket sent.
        assert!(reaches(&out[0], &peers[0].1, 1));
    }

    #[test]
    fn a_truncated_read_marks_the_conns_that_lost_their_fd() {
        let (a, _b) = sys::stream_pair().unwrap();
        let mut d = Decoder::default();
        // A split record from before: its fd came with the earlier read.
        let before = message(&[Record::Conn { listener: 1, seq: 1 }], 1);
        d.push(&before[..5], vec![a], false);
        // This read completes it, brings a Ready, and a message of three
        // Conns of which only one fd arrived.
        let (x, _y) = sys::stream_pair().unwrap();
        let mut rest = before[5..].to_vec();
        rest.extend(encode_all(&[Record::Ready { listener: 1 }]));
        rest.extend(message(
            &[
                Record::Conn { listener: 1, seq: 2 },
                Record::Conn { listener: 1, seq: 3 },
                Record::Conn { listener: 1, seq: 4 },
            ],
            3,
        ));
        d.push(&rest, vec![x], true);
        assert_eq!(
            drained(&mut d).1,
            vec![
                (Record::Conn { listener: 1, seq: 1 }, Some(1)),
                (Record::Ready { listener: 1 }, Some(0)),
                (Record::Conn { listener: 1, seq: 2 }, Some(1)),
                (Record::Conn { listener: 1, seq: 3 }, None),
                (Record::Conn { listener: 1, seq: 4 }, None),
            ]
        );
    }

    #[test]
    fn a_message_that_lost_descriptors_never_takes_the_next_ones() {
        let (sa, sb) = sys::stream_pair().unwrap();
        let peers: Vec<(OwnedFd, OwnedFd)> = (0..6).map(|_| sys::stream_pair().unwrap()).collect();
        let raw: Vec<RawFd> = peers.iter().map(|(p, _)| p.as_raw_fd()).collect();
        let first = encode_all(&(1..=4).map(|seq| Record::Conn { listener: 1, seq }).collect::<Vec<_>>());
        let second = encode_all(&[Record::Conn { listener: 2, seq: 5 }, Record::Conn { listener: 2, seq: 6 }]);
        assert_eq!(send(sa.as_raw_fd(), &first, &raw[..4]).unwrap(), first.len());
        assert_eq!(send(sa.as_raw_fd(), &second, &raw[4..]).unwrap(), second.len());
        let mut d = Decoder::default();
        // A read that ends two bytes into the second record, with room for
        // two descriptors of four: the kernel truncates.
        let mut buf = [0u8; RECORD_LEN + 2];
        let mut got = Vec::new();
        let received = recv_with_room(sb.as_raw_fd(), &mut buf, &mut got, 2).unwrap();
        assert_eq!((received.bytes, got.len(), received.truncated), (RECORD_LEN + 2, 2, true));
        d.push(&buf[..received.bytes], got, true);
        // The next read brings the first message's rest and the whole second
        // one, with the second one's descriptors (the kernel stops there).
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        let received = recv(sb.as_raw_fd(), &mut buf, &mut got).unwrap();
        let rest = first.len() + second.len() - RECORD_LEN - 2;
        assert_eq!((received.bytes, got.len(), received.truncated), (rest, 2, false));
        d.push(&buf[..received.bytes], got, false);
        let (out, shapes) = drained(&mut d);
        assert_eq!(
            shapes,
            vec![
                (Record::Conn { listener: 1, seq: 1 }, Some(1)),
                (Record::Conn { listener: 1, seq: 2 }, Some(1)),
                (Record::Conn { listener: 1, seq: 3 }, None),
                (Record::Conn { listener: 1, seq: 4 }, None),
                (Record::Conn { listener: 2, seq: 5 }, Some(1)),
                (Record::Conn { listener: 2, seq: 6 }, Some(1)),
            ]
        );
        // Each received descriptor is the socket sent with its record.
        for i in [0, 1, 4, 5] {
            assert!(reaches(&out[i], &peers[i].1, i as u8), "record {i} got another record's descriptor");
        }
    }

    #[test]
    fn descriptors_of_several_messages_in_one_read_go_to_each_by_its_count() {
        // Linux gives each read one message's descriptors at most; a kernel
        // that gave several at once must not confuse the decoder.
        let pairs: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| sys::stream_pair().unwrap()).collect();
        let mut bytes = message(&[Record::Lease { listener: 1, slot: 0 }], 3);
        bytes.extend(message(&[Record::Conn { listener: 2, seq: 7 }], 1));
        let (a, _b) = sys::stream_pair().unwrap();
        let mut fds: Vec<OwnedFd> = pairs.into_iter().map(|(p, _)| p).collect();
        fds.push(a);
        let mut d = Decoder::default();
        d.push(&bytes, fds, false);
        let counts: Vec<Option<usize>> = drained(&mut d).1.into_iter().map(|(_, n)| n).collect();
        assert_eq!(counts, vec![Some(3), Some(1)]);
    }

    #[test]
    fn however_reads_split_and_truncate_a_record_gets_its_own_descriptor_or_none() {
        use std::os::unix::fs::MetadataExt;
        let inode = |fd: &OwnedFd| std::fs::File::from(fd.try_clone().unwrap()).metadata().unwrap().ino();
        // A small generator, so that a failure can be replayed from its seed.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |below: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below
        };
        for _round in 0..40 {
            let (sa, sb) = sys::stream_pair().unwrap();
            let mut sent = Vec::new(); // (seq, inode of the socket sent with it)
            let mut keep = Vec::new();
            for _message in 0..12 {
                let count = 1 + next(5) as usize;
                let mut records = Vec::new();
                let mut raw = Vec::new();
                for _ in 0..count {
                    let (end, peer) = sys::stream_pair().unwrap();
                    let seq = sent.len() as u32;
                    sent.push((seq, inode(&end)));
                    records.push(Record::Conn { listener: 1, seq });
                    raw.push(end.as_raw_fd());
                    keep.push((end, peer));
                }
                let bytes = encode_all(&records);
                assert_eq!(send(sa.as_raw_fd(), &bytes, &raw).unwrap(), bytes.len());
            }
            drop(keep); // the receiving side holds its own references now
            let total = sent.len() * RECORD_LEN;
            let mut d = Decoder::default();
            let mut out = Vec::new();
            let mut read = 0;
            while read < total {
                let mut buf = vec![0u8; 1 + next(40) as usize];
                let mut got = Vec::new();
                // Room for 2 to 8 descriptors (CMSG_SPACE rounds 1 up to 2).
                let r = recv_with_room(sb.as_raw_fd(), &mut buf, &mut got, 2 + next(7) as usize).unwrap();
                read += r.bytes;
                d.push(&buf[..r.bytes], got, r.truncated);
                d.drain(&mut out);
            }
            let seqs: Vec<u32> = out
                .iter()
                .map(|i| match i.record {
                    Record::Conn { seq, .. } => seq,
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            assert_eq!(seqs, (0..sent.len() as u32).collect::<Vec<_>>(), "every record, once, in order");
            for (incoming, (seq, sent_inode)) in out.iter().zip(&sent) {
                if let Some(fds) = &incoming.fds {
                    assert_eq!(inode(&fds[0]), *sent_inode, "record {seq} got another record's descriptor");
                }
            }
            assert!(out.iter().any(|i| i.fds.is_some()));
        }
    }

    #[test]
    fn a_lease_takes_three_descriptors_and_a_return_one() {
        let pairs: Vec<(OwnedFd, OwnedFd)> = (0..4).map(|_| sys::stream_pair().unwrap()).collect();
        let raw: Vec<RawFd> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
        let bytes = encode_all(&[
            Record::Lease { listener: 1, slot: 2 },
            Record::Ready { listener: 1 },
            Record::Return { listener: 1 },
        ]);
        let (sa, sb) = sys::stream_pair().unwrap();
        send(sa.as_raw_fd(), &bytes, &raw).unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        let n = recv(sb.as_raw_fd(), &mut buf, &mut got).unwrap().bytes;
        let mut d = Decoder::default();
        d.push(&buf[..n], got, false);
        let (out, shapes) = drained(&mut d);
        let counts: Vec<Option<usize>> = shapes.into_iter().map(|(_, n)| n).collect();
        assert_eq!(counts, vec![Some(3), Some(0), Some(1)]);
        // The return got the fourth descriptor.
        assert!(reaches(&out[2], &pairs[3].1, 4));
    }

    #[test]
    fn recv_reports_end_of_stream() {
        let (a, b) = sys::stream_pair().unwrap();
        drop(a);
        let mut buf = [0u8; 16];
        assert_eq!(recv(b.as_raw_fd(), &mut buf, &mut Vec::new()).unwrap().bytes, 0);
    }
}
