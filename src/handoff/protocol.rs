//! The handoff wire protocol, version 1: pure encoding and decoding of frames.
//!
//! One frame is one SOCK_SEQPACKET record (the kernel keeps message boundaries), so a
//! frame never needs a stream parser. This module owns the byte layout only; it does not
//! touch sockets or fds (see `fds`). The normative description is
//! `docs/handoff-protocol.md`; keep the two in step.
//!
//! ```text
//! offset size field
//! 0      4    magic     "CUTO"
//! 4      2    version   u16 LE, 1
//! 6      2    kind      u16 LE
//! 8      4    body_len  u32 LE, = frame length - 16
//! 12     4    fd_count  u32 LE, fds attached with SCM_RIGHTS (<= 253)
//! 16     ...  body
//! ```

use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"CUTO";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
/// The largest frame (header included) a peer may send. Fits the default unix socket
/// send buffer, so a SOCK_SEQPACKET send of a full frame never fails with EMSGSIZE.
pub const MAX_FRAME: usize = 65_536;
pub const MAX_BODY: usize = MAX_FRAME - HEADER_LEN;
/// The kernel refuses more than 253 fds in one message (SCM_MAX_FD; 254 gives EINVAL).
pub const MAX_FDS: usize = 253;
/// Bytes a `Connections` body spends per entry besides the state blob (its u32 length).
pub const CONNECTION_OVERHEAD: usize = 4;
/// Bytes of a `Connections` body before the entries (batch u32, count u16).
pub const CONNECTIONS_HEADER: usize = 6;
/// The largest state blob one connection can carry (alone in its batch).
pub const MAX_STATE: usize = MAX_BODY - CONNECTIONS_HEADER - CONNECTION_OVERHEAD;

/// Frame kinds. Numbers are part of the protocol; never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    RequestListeners = 1,
    Listeners = 2,
    Error = 3,
    Connections = 16,
    Ack = 17,
    Done = 18,
    DoneAck = 19,
    Takeover = 32,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::RequestListeners,
            2 => Kind::Listeners,
            3 => Kind::Error,
            16 => Kind::Connections,
            17 => Kind::Ack,
            18 => Kind::Done,
            19 => Kind::DoneAck,
            32 => Kind::Takeover,
            _ => return None,
        })
    }
}

/// Error codes carried by an `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    Malformed = 1,
    UnsupportedVersion = 2,
    NotPermitted = 3,
    UnknownListener = 4,
    TooLarge = 5,
    TooManyFds = 6,
    Unexpected = 7,
    Internal = 8,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::NotPermitted,
            4 => ErrorCode::UnknownListener,
            5 => ErrorCode::TooLarge,
            6 => ErrorCode::TooManyFds,
            7 => ErrorCode::Unexpected,
            _ => ErrorCode::Internal,
        }
    }
}

/// A decoded frame body. fds travel next to it (see `fds::Received`); `fd_count` in
/// the header says how many the sender attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Ask for listeners by name; empty means all of the service's listeners.
    RequestListeners { names: Vec<String> },
    /// The listeners, one fd each, in this order.
    Listeners { names: Vec<String> },
    Error { code: ErrorCode, message: String },
    /// A batch of established connections, one fd and one opaque state blob each.
    Connections { batch: u32, states: Vec<Vec<u8>> },
    /// The receiver took the first `accepted` connections of `batch` and closed the rest.
    Ack { batch: u32, accepted: u16 },
    /// The sender has no more connections to hand over; `total` were sent.
    Done { total: u64 },
    DoneAck { total: u64 },
    /// The next generation asks the current one to drain and hand over its connections.
    Takeover,
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::RequestListeners { .. } => Kind::RequestListeners,
            Message::Listeners { .. } => Kind::Listeners,
            Message::Error { .. } => Kind::Error,
            Message::Connections { .. } => Kind::Connections,
            Message::Ack { .. } => Kind::Ack,
            Message::Done { .. } => Kind::Done,
            Message::DoneAck { .. } => Kind::DoneAck,
            Message::Takeover => Kind::Takeover,
        }
    }

    /// How many fds must travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Listeners { names } => names.len(),
            Message::Connections { states, .. } => states.len(),
            _ => 0,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the frame is {0} bytes, shorter than the 16-byte header (truncated)")]
    Truncated(usize),
    #[error("the frame does not start with the magic \"CUTO\": not a cutover handoff peer")]
    BadMagic,
    #[error("protocol version {0} is not supported (this side speaks version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("the header announces {announced} body bytes but {actual} arrived")]
    LengthMismatch { announced: usize, actual: usize },
    #[error("the frame is larger than {MAX_FRAME} bytes")]
    TooLarge,
    #[error("the frame announces {0} fds; at most {MAX_FDS} fit in one message")]
    TooManyFds(usize),
    #[error("a {kind:?} frame carries {announced} fds where {expected} are needed")]
    FdCountMismatch { kind: Kind, announced: usize, expected: usize },
    #[error("malformed {kind:?} body: {reason}")]
    Malformed { kind: Kind, reason: &'static str },
}

impl FrameError {
    /// The code to report this error to the peer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            FrameError::TooLarge => ErrorCode::TooLarge,
            FrameError::TooManyFds(_) => ErrorCode::TooManyFds,
            _ => ErrorCode::Malformed,
        }
    }
}

/// The header fields, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub body_len: usize,
    pub fd_count: usize,
}

/// Encodes a message into one frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::new();
    match msg {
        Message::RequestListeners { names } | Message::Listeners { names } => {
            put_u16(&mut body, count_u16(names.len(), msg.kind())?);
            for n in names {
                put_str(&mut body, n, msg.kind())?;
            }
        }
        Message::Error { code, message } => {
            put_u16(&mut body, *code as u16);
            // Error texts are informative: cut them rather than fail to report.
            let mut end = message.len().min(1024);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            put_str(&mut body, &message[..end], Kind::Error)?;
        }
        Message::Connections { batch, states } => {
            body.extend_from_slice(&batch.to_le_bytes());
            put_u16(&mut body, count_u16(states.len(), Kind::Connections)?);
            for s in states {
                let len = u32::try_from(s.len()).map_err(|_| FrameError::TooLarge)?;
                body.extend_from_slice(&len.to_le_bytes());
                body.extend_from_slice(s);
            }
        }
        Message::Ack { batch, accepted } => {
            body.extend_from_slice(&batch.to_le_bytes());
            put_u16(&mut body, *accepted);
        }
        Message::Done { total } | Message::DoneAck { total } => body.extend_from_slice(&total.to_le_bytes()),
        Message::Takeover => {}
    }
    if body.len() > MAX_BODY {
        return Err(FrameError::TooLarge);
    }
    let fds = msg.fd_count();
    if fds > MAX_FDS {
        return Err(FrameError::TooManyFds(fds));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&VERSION.to_le_bytes());
    frame.extend_from_slice(&(msg.kind() as u16).to_le_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&(fds as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks the header of a received frame (`frame` is exactly what one recv returned).
pub fn decode_header(frame: &[u8]) -> Result<Header, FrameError> {
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLarge);
    }
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Truncated(frame.len()));
    }
    if frame[0..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let version = u16::from_le_bytes([frame[4], frame[5]]);
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let kind_raw = u16::from_le_bytes([frame[6], frame[7]]);
    let kind = Kind::from_u16(kind_raw).ok_or(FrameError::UnknownKind(kind_raw))?;
    let body_len = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]) as usize;
    let fd_count = u32::from_le_bytes([frame[12], frame[13], frame[14], frame[15]]) as usize;
    if body_len != frame.len() - HEADER_LEN {
        return Err(FrameError::LengthMismatch { announced: body_len, actual: frame.len() - HEADER_LEN });
    }
    if fd_count > MAX_FDS {
        return Err(FrameError::TooManyFds(fd_count));
    }
    Ok(Header { kind, body_len, fd_count })
}

/// Decodes a whole frame.
pub fn decode(frame: &[u8]) -> Result<Message, FrameError> {
    let header = decode_header(frame)?;
    let kind = header.kind;
    let mut r = Reader { buf: &frame[HEADER_LEN..], kind };
    let msg = match kind {
        Kind::RequestListeners | Kind::Listeners => {
            let n = r.u16()? as usize;
            let mut names = Vec::with_capacity(n.min(MAX_FDS));
            for _ in 0..n {
                names.push(r.string()?);
            }
            if kind == Kind::RequestListeners {
                Message::RequestListeners { names }
            } else {
                Message::Listeners { names }
            }
        }
        Kind::Error => {
            let code = ErrorCode::from_u16(r.u16()?);
            Message::Error { code, message: r.string()? }
        }
        Kind::Connections => {
            let batch = r.u32()?;
            let n = r.u16()? as usize;
            let mut states = Vec::with_capacity(n.min(MAX_FDS));
            for _ in 0..n {
                let len = r.u32()? as usize;
                states.push(r.bytes(len)?.to_vec());
            }
            Message::Connections { batch, states }
        }
        Kind::Ack => Message::Ack { batch: r.u32()?, accepted: r.u16()? },
        Kind::Done => Message::Done { total: r.u64()? },
        Kind::DoneAck => Message::DoneAck { total: r.u64()? },
        Kind::Takeover => Message::Takeover,
    };
    if !r.buf.is_empty() {
        return Err(FrameError::Malformed { kind, reason: "bytes after the end of the body" });
    }
    let expected = msg.fd_count();
    if header.fd_count != expected {
        return Err(FrameError::FdCountMismatch { kind, announced: header.fd_count, expected });
    }
    Ok(msg)
}

/// How many bytes a connection with this state adds to a `Connections` body.
pub fn connection_cost(state_len: usize) -> usize {
    CONNECTION_OVERHEAD + state_len
}

fn count_u16(n: usize, kind: Kind) -> Result<u16, FrameError> {
    if n > MAX_FDS {
        return Err(FrameError::TooManyFds(n));
    }
    u16::try_from(n).map_err(|_| FrameError::Malformed { kind, reason: "too many entries" })
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str, kind: Kind) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::Malformed { kind, reason: "a string longer than 65535 bytes" })?;
    put_u16(buf, len);
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Malformed { kind: self.kind, reason: "the body ends inside a field (truncated)" });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let len = self.u16()? as usize;
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::Malformed { kind: self.kind, reason: "a string is not UTF-8" })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let frame = encode(&m).unwrap();
        assert_eq!(decode(&frame).unwrap(), m);
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Message::RequestListeners { names: vec![] });
        roundtrip(Message::RequestListeners { names: vec!["http".into(), "grpc".into()] });
        roundtrip(Message::Listeners { names: vec!["http".into()] });
        roundtrip(Message::Error { code: ErrorCode::NotPermitted, message: "no".into() });
        roundtrip(Message::Connections { batch: 7, states: vec![vec![1, 2, 3], vec![], vec![9; 1000]] });
        roundtrip(Message::Ack { batch: 7, accepted: 3 });
        roundtrip(Message::Done { total: 10_000 });
        roundtrip(Message::DoneAck { total: 10_000 });
        roundtrip(Message::Takeover);
    }

    #[test]
    fn header_layout_is_stable() {
        let f = encode(&Message::Ack { batch: 1, accepted: 2 }).unwrap();
        assert_eq!(&f[..16], &[b'C', b'U', b'T', b'O', 1, 0, 17, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[16..], &[1, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn truncated_and_malformed_frames_are_named() {
        let f = encode(&Message::Listeners { names: vec!["http".into()] }).unwrap();
        assert_eq!(decode(&f[..10]), Err(FrameError::Truncated(10)));
        assert!(matches!(decode(&f[..f.len() - 1]), Err(FrameError::LengthMismatch { .. })));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(FrameError::BadMagic));
        let mut v2 = f.clone();
        v2[4] = 2;
        assert_eq!(decode(&v2), Err(FrameError::UnsupportedVersion(2)));
        let mut kind = f.clone();
        kind[6] = 99;
        assert_eq!(decode(&kind), Err(FrameError::UnknownKind(99)));
        // A string length that runs past the body.
        let mut short = f.clone();
        short[18] = 200;
        assert!(matches!(decode(&short), Err(FrameError::Malformed { .. })));
        // The header must announce exactly the fds the kind needs.
        let mut fds = f.clone();
        fds[12] = 0;
        assert!(matches!(decode(&fds), Err(FrameError::FdCountMismatch { .. })));
        fds[12] = 254;
        assert_eq!(decode(&fds), Err(FrameError::TooManyFds(254)));
        assert_eq!(decode(&vec![0u8; MAX_FRAME + 1]), Err(FrameError::TooLarge));
    }

    #[test]
    fn limits_are_enforced_when_encoding() {
        let names = (0..254).map(|i| format!("l{i}")).collect();
        assert_eq!(encode(&Message::Listeners { names }), Err(FrameError::TooManyFds(254)));
        let big = Message::Connections { batch: 0, states: vec![vec![0; MAX_STATE + 1]] };
        assert_eq!(encode(&big), Err(FrameError::TooLarge));
        let fits = Message::Connections { batch: 0, states: vec![vec![0; MAX_STATE]] };
        assert_eq!(encode(&fits).unwrap().len(), MAX_FRAME);
    }
}
