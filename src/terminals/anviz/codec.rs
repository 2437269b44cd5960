//! Anviz TC-B wire format: frames, the CRC, the 14-byte record and the payloads a gateway needs.
//!
//! Pure code: bytes in, values out. The TCP link and the simulator own the sockets; this module
//! only frames, checks and parses, so every quirk of the protocol is unit-tested here.
//!
//! ```text
//! request : A5 | CH u32 BE | CMD | LEN u16 BE | DATA (0..=400) | CRC16 low, high
//! response: A5 | CH u32 BE | ACK | RET | LEN u16 BE | DATA (0..=400) | CRC16 low, high
//! ```
//!
//! Both ends start exchanges: the agent sends requests and reads answers, but a terminal also
//! sends request-shaped frames of its own (the heartbeat 0x7F, which expects a response-shaped
//! pong). Byte 5 tells the shapes apart: every command is below 0x80 and every answer's ACK is
//! `CMD + 0x80`, so a frame whose byte 5 is 0x80 or more has the 9-byte response header and any
//! other the 8-byte request header ([`is_response_code`]; the public MxLabs/Anviz SDK reads
//! `Anviz.SDK/Responses/Response.cs` the same way). [`AnyFrameDecoder`] decodes such a mixed
//! stream; a decoder for one shape only loses step on a frame of the other (it reads the wrong
//! bytes as LEN).
//!
//! Choices this module documents for both ends of the link:
//! - An empty download (0x40) is answered with `RET = Empty (5)` and `LEN = 0` by the simulator.
//!   [`decode_download_answer`] accepts both that empty payload and `N = 0`, because firmware
//!   variants differ and neither may be mistaken for an error.
//! - A real-time record (0x5F) is pushed by the device as a [`Response`] whose ACK is
//!   [`REALTIME_ACK`] (0xDF) and whose DATA is one 14-byte [`Record`]; it is not an answer to any
//!   request, so a link must be ready to receive it between request and answer.

use std::marker::PhantomData;

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Timelike};
use thiserror::Error;

/// First byte of every frame in both directions.
pub const STX: u8 = 0xA5;
/// The protocol caps DATA at 400 bytes; a larger LEN can only be line noise or a desynchronised
/// stream, so the decoder rejects it instead of waiting for 64 KiB that will never come.
pub const MAX_DATA_LEN: usize = 400;
/// Device id 0 in a request means "whichever device is on this link".
pub const ANY_DEVICE: u32 = 0;
/// Size of one attendance record on the wire.
pub const RECORD_LEN: usize = 14;
/// Most records one download answer may carry (25 × 14 + 1 = 351 bytes fits in 400).
pub const MAX_RECORDS_PER_DOWNLOAD: usize = 25;

const CRC_LEN: usize = 2;
const REQUEST_HEADER_LEN: usize = 8;
const RESPONSE_HEADER_LEN: usize = 9;
const U24_MAX: u32 = 0x00FF_FFFF;
const USER_CODE_MAX: u64 = 0x00FF_FFFF_FFFF;

/// Command codes (the CMD byte of a request; the answer's ACK is `cmd + 0x80`).
pub mod cmd {
    /// Settings block 2: real-time mode switch, repeat-attendance delay.
    pub const GET_SETTINGS: u8 = 0x32;
    pub const SET_SETTINGS: u8 = 0x33;
    pub const GET_CLOCK: u8 = 0x38;
    pub const SET_CLOCK: u8 = 0x39;
    /// Users, fingerprints, passwords, cards, all records, new records.
    pub const GET_COUNTS: u8 = 0x3C;
    pub const DOWNLOAD_RECORDS: u8 = 0x40;
    pub const CLEAR_RECORDS: u8 = 0x4E;
    /// Never requested: the device pushes it (ACK 0xDF) after each verification.
    pub const REALTIME_RECORD: u8 = 0x5F;
    /// Sent by the agent as a request, and by a terminal on its own (request-shaped, LEN 0);
    /// the terminal's heartbeat is answered with [`pong`](super::pong).
    pub const HEARTBEAT: u8 = 0x7F;
    /// Connection authentication (protocol v2.5): DATA is a [`ConnectionPassword`](super::ConnectionPassword).
    pub const AUTHENTICATE: u8 = 0x04;
}

/// ACK byte of the answer to `cmd`.
pub const fn ack_for(cmd: u8) -> u8 {
    cmd.wrapping_add(0x80)
}

/// ACK byte of a real-time record push (0xDF).
pub const REALTIME_ACK: u8 = ack_for(cmd::REALTIME_RECORD);

/// ACK byte of the pong that answers a terminal's heartbeat (0xFF).
pub const PONG_ACK: u8 = ack_for(cmd::HEARTBEAT);

/// True when byte 5 of a frame is an ACK (response shape, 9-byte header), false for a CMD
/// (request shape, 8-byte header).
pub const fn is_response_code(code: u8) -> bool {
    code >= 0x80
}

/// The answer to a terminal's heartbeat: response-shaped, ACK 0xFF, RET 0, LEN 0, carrying the
/// terminal's own CH (MxLabs/Anviz `Anviz.SDK/AnvizStream.cs` answers 0x7F with
/// `Commands/PongCommand.cs`, which `Commands/Command.cs` builds with a RET byte).
pub fn pong(device_id: u32) -> Response {
    Response::answer(device_id, cmd::HEARTBEAT, Ret::Ok, Vec::new())
}

/// The RET byte of a response. When it is not `Ok` the device sends `LEN = 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ret {
    Ok,
    Fail,
    Full,
    Empty,
    NoUser,
    Timeout,
    UserExists,
    FingerprintExists,
    /// A code this module does not know; kept so it can be logged verbatim.
    Other(u8),
}

impl From<u8> for Ret {
    fn from(b: u8) -> Ret {
        match b {
            0x00 => Ret::Ok,
            0x01 => Ret::Fail,
            0x04 => Ret::Full,
            0x05 => Ret::Empty,
            0x06 => Ret::NoUser,
            0x08 => Ret::Timeout,
            0x0A => Ret::UserExists,
            0x0B => Ret::FingerprintExists,
            other => Ret::Other(other),
        }
    }
}

impl From<Ret> for u8 {
    fn from(r: Ret) -> u8 {
        match r {
            Ret::Ok => 0x00,
            Ret::Fail => 0x01,
            Ret::Full => 0x04,
            Ret::Empty => 0x05,
            Ret::NoUser => 0x06,
            Ret::Timeout => 0x08,
            Ret::UserExists => 0x0A,
            Ret::FingerprintExists => 0x0B,
            Ret::Other(b) => b,
        }
    }
}

/// Agent → device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub device_id: u32,
    pub cmd: u8,
    pub data: Vec<u8>,
}

impl Request {
    pub fn new(device_id: u32, cmd: u8, data: impl Into<Vec<u8>>) -> Request {
        Request {
            device_id,
            cmd,
            data: data.into(),
        }
    }
}

/// Device → agent: an answer (`ack = cmd + 0x80`) or a real-time push (`ack = 0xDF`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub device_id: u32,
    pub ack: u8,
    pub ret: Ret,
    pub data: Vec<u8>,
}

impl Response {
    /// The answer to `cmd` from `device_id`.
    pub fn answer(device_id: u32, cmd: u8, ret: Ret, data: impl Into<Vec<u8>>) -> Response {
        Response {
            device_id,
            ack: ack_for(cmd),
            ret,
            data: data.into(),
        }
    }

    /// The frame a device pushes after a verification in real-time mode.
    pub fn realtime_push(device_id: u32, record: &Record) -> Result<Response, PayloadError> {
        Ok(Response {
            device_id,
            ack: REALTIME_ACK,
            ret: Ret::Ok,
            data: record.encode()?.to_vec(),
        })
    }

    /// The command this frame answers (0x5F for a real-time push).
    pub fn cmd(&self) -> u8 {
        self.ack.wrapping_sub(0x80)
    }

    pub fn is_realtime_push(&self) -> bool {
        self.ack == REALTIME_ACK
    }
}

/// Encoding refused: the frame would not be valid on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("frame DATA is {len} bytes; the TC-B protocol allows at most {MAX_DATA_LEN}")]
    DataTooLong { len: usize },
}

/// What the stream decoder threw away. Each one is reported so the link can count rejected
/// frames; decoding continues with the next call.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("skipped {skipped} byte(s) that were not the start of a frame (0xA5)")]
    Garbage { skipped: usize },
    #[error(
        "frame declares LEN {len}, more than the protocol maximum of {MAX_DATA_LEN}; \
         dropped its start byte and resynchronised"
    )]
    Oversize { len: usize },
    #[error(
        "frame CRC is {actual:#06x} but its bytes give {expected:#06x}; \
         dropped its start byte and resynchronised"
    )]
    Crc { expected: u16, actual: u16 },
}

impl FrameError {
    /// True for a frame that was well delimited but invalid (as opposed to stray bytes).
    pub fn is_rejected_frame(&self) -> bool {
        matches!(self, FrameError::Oversize { .. } | FrameError::Crc { .. })
    }
}

/// A payload (DATA) that does not match what its command expects, or a value the wire format
/// cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    #[error("{what}: expected {expected} byte(s), got {actual}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("{what}: {value} does not fit in {bytes} byte(s)")]
    TooLarge {
        what: &'static str,
        value: u64,
        bytes: usize,
    },
    #[error(
        "record time {time} cannot be stored: the device counts u32 seconds from \
         2000-01-02 00:00:00"
    )]
    RecordTimeOutOfRange { time: NaiveDateTime },
    #[error("download: {count} records per packet requested, the device allows 1..=25")]
    DownloadCount { count: usize },
    #[error("download: unknown parameter {0:#04x} (expected 0, 1, 2 or 0x10)")]
    DownloadParam(u8),
    #[error("clear: unknown type {0} (expected 0, 1 or 2)")]
    ClearType(u8),
    #[error("clock bytes {bytes:?} are not a valid date and time")]
    InvalidClock { bytes: [u8; 6] },
    #[error("clock {time} cannot be sent: the device stores years 2000..=2255")]
    ClockOutOfRange { time: NaiveDateTime },
    #[error(
        "connection {what} must be printable ASCII without NUL, at most {} bytes",
        ConnectionPassword::FIELD_LEN
    )]
    Credential { what: &'static str },
}

/// CRC-16/MCRF4XX (reflected poly 0x8408, init 0xFFFF, no final xor) over STX..DATA.
/// Sent low byte first.
pub fn crc16_mcrf4xx(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x8408
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn check_data_len(data: &[u8]) -> Result<u16, EncodeError> {
    match u16::try_from(data.len()) {
        Ok(len) if data.len() <= MAX_DATA_LEN => Ok(len),
        _ => Err(EncodeError::DataTooLong { len: data.len() }),
    }
}

fn append_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16_mcrf4xx(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

pub fn encode_request(req: &Request) -> Result<Vec<u8>, EncodeError> {
    let len = check_data_len(&req.data)?;
    let mut frame = Vec::with_capacity(REQUEST_HEADER_LEN + req.data.len() + CRC_LEN);
    frame.push(STX);
    frame.extend_from_slice(&req.device_id.to_be_bytes());
    frame.push(req.cmd);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&req.data);
    Ok(append_crc(frame))
}

/// Does not enforce "RET ≠ Ok ⇒ LEN = 0": that is the device's convention, and a decoder that
/// rejected it would lose the frame for no benefit.
pub fn encode_response(resp: &Response) -> Result<Vec<u8>, EncodeError> {
    let len = check_data_len(&resp.data)?;
    let mut frame = Vec::with_capacity(RESPONSE_HEADER_LEN + resp.data.len() + CRC_LEN);
    frame.push(STX);
    frame.extend_from_slice(&resp.device_id.to_be_bytes());
    frame.push(resp.ack);
    frame.push(resp.ret.into());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&resp.data);
    Ok(append_crc(frame))
}

mod sealed {
    /// Where LEN sits and how to build the frame once it is complete and CRC-checked.
    pub trait Layout: Sized {
        /// STX through LEN for a frame whose byte 5 (CMD or ACK) is `code`; LEN is always the
        /// last two bytes.
        fn header_len(code: u8) -> usize;
        /// `header` is exactly `header_len(header[5])` bytes (the decoder guarantees it).
        fn from_parts(header: &[u8], data: &[u8]) -> Self;
    }
}

/// A frame type the stream [`Decoder`] can produce: [`Request`], [`Response`] or [`AnyFrame`].
pub trait Frame: sealed::Layout {}

/// Bytes a decoder needs before it knows the header length: STX, CH and CMD/ACK.
const CODE_AT: usize = 5;

fn device_id_at(header: &[u8]) -> u32 {
    u32::from_be_bytes([header[1], header[2], header[3], header[4]])
}

impl sealed::Layout for Request {
    fn header_len(_code: u8) -> usize {
        REQUEST_HEADER_LEN
    }
    fn from_parts(header: &[u8], data: &[u8]) -> Request {
        Request {
            device_id: device_id_at(header),
            cmd: header[5],
            data: data.to_vec(),
        }
    }
}
impl Frame for Request {}

impl sealed::Layout for Response {
    fn header_len(_code: u8) -> usize {
        RESPONSE_HEADER_LEN
    }
    fn from_parts(header: &[u8], data: &[u8]) -> Response {
        Response {
            device_id: device_id_at(header),
            ack: header[5],
            ret: Ret::from(header[6]),
            data: data.to_vec(),
        }
    }
}
impl Frame for Response {}

/// A frame of either shape, told apart by byte 5 (see the module docs): what arrives on a link
/// where both ends may start an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyFrame {
    /// Request-shaped: from a terminal, one it starts itself (a heartbeat).
    Request(Request),
    /// Response-shaped: an answer, a real-time push or a pong.
    Response(Response),
}

impl sealed::Layout for AnyFrame {
    fn header_len(code: u8) -> usize {
        if is_response_code(code) {
            RESPONSE_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        }
    }
    fn from_parts(header: &[u8], data: &[u8]) -> AnyFrame {
        if header.len() == RESPONSE_HEADER_LEN {
            AnyFrame::Response(Response::from_parts(header, data))
        } else {
            AnyFrame::Request(Request::from_parts(header, data))
        }
    }
}
impl Frame for AnyFrame {}

impl AnyFrame {
    /// The CH of the frame.
    pub fn device_id(&self) -> u32 {
        match self {
            AnyFrame::Request(r) => r.device_id,
            AnyFrame::Response(r) => r.device_id,
        }
    }
}

pub fn encode_any(frame: &AnyFrame) -> Result<Vec<u8>, EncodeError> {
    match frame {
        AnyFrame::Request(r) => encode_request(r),
        AnyFrame::Response(r) => encode_response(r),
    }
}

/// Turns a TCP byte stream into frames, whatever the read boundaries are.
///
/// Resynchronisation: bytes before an STX are skipped and reported as [`FrameError::Garbage`].
/// A candidate frame with LEN > 400 or a bad CRC is reported, and only its STX byte is dropped,
/// so a real frame that starts inside the rejected bytes is still found. The price: a 0xA5 inside
/// garbage is taken as a frame start and the decoder waits until enough bytes arrive to check
/// it; the link's answer timeout bounds that wait.
pub struct Decoder<F> {
    buf: Vec<u8>,
    /// Bytes before `start` are consumed; compacted on the next `push`.
    start: usize,
    _frame: PhantomData<fn() -> F>,
}

pub type RequestDecoder = Decoder<Request>;
pub type ResponseDecoder = Decoder<Response>;
/// Both shapes on one stream: what the agent reads from a terminal, and the simulator from the
/// agent (requests and pongs).
pub type AnyFrameDecoder = Decoder<AnyFrame>;

impl<F: Frame> Default for Decoder<F> {
    fn default() -> Self {
        Decoder {
            buf: Vec::new(),
            start: 0,
            _frame: PhantomData,
        }
    }
}

impl<F: Frame> Decoder<F> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes as read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet form a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, or the next thing that was thrown away; `None` when more bytes
    /// are needed. Call until `None` after every `push`.
    pub fn next_frame(&mut self) -> Option<Result<F, FrameError>> {
        let pending = &self.buf[self.start..];
        let first = *pending.first()?;
        if first != STX {
            let skipped = pending
                .iter()
                .position(|&b| b == STX)
                .unwrap_or(pending.len());
            self.start += skipped;
            return Some(Err(FrameError::Garbage { skipped }));
        }
        let header_len = F::header_len(*pending.get(CODE_AT)?);
        if pending.len() < header_len {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([
            pending[header_len - 2],
            pending[header_len - 1],
        ]));
        if len > MAX_DATA_LEN {
            self.start += 1;
            return Some(Err(FrameError::Oversize { len }));
        }
        let body_len = header_len + len;
        if pending.len() < body_len + CRC_LEN {
            return None;
        }
        let expected = crc16_mcrf4xx(&pending[..body_len]);
        let actual = u16::from_le_bytes([pending[body_len], pending[body_len + 1]]);
        if expected != actual {
            self.start += 1;
            return Some(Err(FrameError::Crc { expected, actual }));
        }
        let frame = F::from_parts(&pending[..header_len], &pending[header_len..body_len]);
        self.start += body_len + CRC_LEN;
        Some(Ok(frame))
    }
}

/// The device's record epoch. Every known implementation counts from 2000-01-02, not
/// 2000-01-01 — a vendor quirk that must be kept or all times shift by one day.
pub const RECORD_EPOCH: NaiveDateTime = match NaiveDate::from_ymd_opt(2000, 1, 2) {
    Some(d) => d.and_time(NaiveTime::MIN),
    None => panic!("2000-01-02 is a valid date"),
};

/// One attendance record (14 bytes on the wire). Times are the terminal's local wall clock:
/// there is no time zone on the wire, the agent keeps one per terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Record {
    /// 5 bytes BE.
    pub user_code: u64,
    pub local_time: NaiveDateTime,
    /// Verification method: bit3 card, bit2 password, bit1 FP2, bit0 FP1.
    pub backup_code: u8,
    /// Bit 7 door opened, low 4 bits attendance state.
    pub record_type: u8,
    /// 3 bytes BE.
    pub work_code: u32,
}

impl Record {
    /// 0 in, 1 out, 2 break, ... (low 4 bits of the record type).
    pub fn attendance_state(&self) -> u8 {
        self.record_type & 0x0F
    }

    pub fn door_opened(&self) -> bool {
        self.record_type & 0x80 != 0
    }

    pub fn decode(bytes: &[u8; RECORD_LEN]) -> Record {
        let user_code = bytes[..5]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let secs = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        Record {
            user_code,
            // u32 seconds (< 137 years) from 2000 cannot overflow NaiveDateTime.
            local_time: RECORD_EPOCH + TimeDelta::seconds(i64::from(secs)),
            backup_code: bytes[9],
            record_type: bytes[10],
            work_code: u24_from(&bytes[11..14]),
        }
    }

    /// Decodes a record from a slice that must be exactly 14 bytes (e.g. a real-time push).
    pub fn from_slice(bytes: &[u8]) -> Result<Record, PayloadError> {
        let arr: &[u8; RECORD_LEN] = bytes.try_into().map_err(|_| PayloadError::Length {
            what: "record",
            expected: RECORD_LEN,
            actual: bytes.len(),
        })?;
        Ok(Record::decode(arr))
    }

    /// Sub-second parts of `local_time` are dropped: the device stores whole seconds.
    pub fn encode(&self) -> Result<[u8; RECORD_LEN], PayloadError> {
        if self.user_code > USER_CODE_MAX {
            return Err(PayloadError::TooLarge {
                what: "record user code",
                value: self.user_code,
                bytes: 5,
            });
        }
        let out_of_range = PayloadError::RecordTimeOutOfRange {
            time: self.local_time,
        };
        if self.local_time < RECORD_EPOCH {
            return Err(out_of_range);
        }
        let secs = u32::try_from((self.local_time - RECORD_EPOCH).num_seconds())
            .map_err(|_| out_of_range)?;
        let work_code = u24_to(self.work_code, "record work code")?;
        let mut out = [0u8; RECORD_LEN];
        out[..5].copy_from_slice(&self.user_code.to_be_bytes()[3..]);
        out[5..9].copy_from_slice(&secs.to_be_bytes());
        out[9] = self.backup_code;
        out[10] = self.record_type;
        out[11..].copy_from_slice(&work_code);
        Ok(out)
    }
}

fn u24_from(b: &[u8]) -> u32 {
    b.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x))
}

fn u24_to(v: u32, what: &'static str) -> Result<[u8; 3], PayloadError> {
    if v > U24_MAX {
        return Err(PayloadError::TooLarge {
            what,
            value: u64::from(v),
            bytes: 3,
        });
    }
    let b = v.to_be_bytes();
    Ok([b[1], b[2], b[3]])
}

fn expect_len(what: &'static str, data: &[u8], expected: usize) -> Result<(), PayloadError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(PayloadError::Length {
            what,
            expected,
            actual: data.len(),
        })
    }
}

/// Answer to 0x3C: six 3-byte BE amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub users: u32,
    pub fingerprints: u32,
    pub passwords: u32,
    pub cards: u32,
    pub all_records: u32,
    pub new_records: u32,
}

impl Counts {
    pub const LEN: usize = 18;

    pub fn encode(&self) -> Result<[u8; Counts::LEN], PayloadError> {
        let fields = [
            (self.users, "counts users"),
            (self.fingerprints, "counts fingerprints"),
            (self.passwords, "counts passwords"),
            (self.cards, "counts cards"),
            (self.all_records, "counts all records"),
            (self.new_records, "counts new records"),
        ];
        let mut out = [0u8; Counts::LEN];
        for (chunk, (value, what)) in out.chunks_exact_mut(3).zip(fields) {
            chunk.copy_from_slice(&u24_to(value, what)?);
        }
        Ok(out)
    }

    pub fn decode(data: &[u8]) -> Result<Counts, PayloadError> {
        expect_len("counts (0x3C answer)", data, Counts::LEN)?;
        let v: Vec<u32> = data.chunks_exact(3).map(u24_from).collect();
        Ok(Counts {
            users: v[0],
            fingerprints: v[1],
            passwords: v[2],
            cards: v[3],
            all_records: v[4],
            new_records: v[5],
        })
    }
}

/// First byte of a 0x40 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownloadParam {
    /// Continue after the last packet returned on this download.
    Next,
    /// All records, from the oldest.
    All,
    /// Records still flagged new, from the oldest of them.
    New,
    /// The last packet again (after a lost or corrupt answer).
    ResendLast,
}

impl DownloadParam {
    pub fn code(self) -> u8 {
        match self {
            DownloadParam::Next => 0x00,
            DownloadParam::All => 0x01,
            DownloadParam::New => 0x02,
            DownloadParam::ResendLast => 0x10,
        }
    }

    pub fn from_code(code: u8) -> Result<DownloadParam, PayloadError> {
        match code {
            0x00 => Ok(DownloadParam::Next),
            0x01 => Ok(DownloadParam::All),
            0x02 => Ok(DownloadParam::New),
            0x10 => Ok(DownloadParam::ResendLast),
            other => Err(PayloadError::DownloadParam(other)),
        }
    }
}

/// DATA of a 0x40 request: `[param, n]`, n in 1..=25.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadRequest {
    pub param: DownloadParam,
    pub count: u8,
}

fn check_download_count(count: usize) -> Result<(), PayloadError> {
    if (1..=MAX_RECORDS_PER_DOWNLOAD).contains(&count) {
        Ok(())
    } else {
        Err(PayloadError::DownloadCount { count })
    }
}

impl DownloadRequest {
    pub fn encode(&self) -> Result<[u8; 2], PayloadError> {
        check_download_count(usize::from(self.count))?;
        Ok([self.param.code(), self.count])
    }

    pub fn decode(data: &[u8]) -> Result<DownloadRequest, PayloadError> {
        expect_len("download request", data, 2)?;
        let param = DownloadParam::from_code(data[0])?;
        check_download_count(usize::from(data[1]))?;
        Ok(DownloadRequest {
            param,
            count: data[1],
        })
    }
}

/// DATA of a 0x40 answer: `N` then N records. Use only for a non-empty packet; an empty result
/// is answered `RET Empty, LEN 0` (see the module docs).
pub fn encode_download_answer(records: &[Record]) -> Result<Vec<u8>, PayloadError> {
    check_download_count(records.len())?;
    let mut out = Vec::with_capacity(1 + records.len() * RECORD_LEN);
    // In range: check_download_count bounds it to 25.
    out.push(records.len() as u8);
    for r in records {
        out.extend_from_slice(&r.encode()?);
    }
    Ok(out)
}

/// Accepts an empty payload (RET Empty, LEN 0) and `N = 0` alike as "no records".
pub fn decode_download_answer(data: &[u8]) -> Result<Vec<Record>, PayloadError> {
    let Some((&n, rest)) = data.split_first() else {
        return Ok(Vec::new());
    };
    let n = usize::from(n);
    if n > MAX_RECORDS_PER_DOWNLOAD {
        return Err(PayloadError::DownloadCount { count: n });
    }
    expect_len("download answer records", rest, n * RECORD_LEN)?;
    Ok(rest
        .chunks_exact(RECORD_LEN)
        .filter_map(|c| <&[u8; RECORD_LEN]>::try_from(c).ok())
        .map(Record::decode)
        .collect())
}

/// DATA of a 0x4E request: `[type, N u24 BE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearRequest {
    /// Type 0: delete every record.
    AllRecords,
    /// Type 1: keep the records, drop every new-flag.
    AllNewFlags,
    /// Type 2: drop the new-flag of the N oldest new records. The at-least-once acknowledgement:
    /// the agent clears exactly what it downloaded and committed.
    NewFlags(u32),
}

impl ClearRequest {
    pub fn encode(&self) -> Result<[u8; 4], PayloadError> {
        let (kind, n) = match *self {
            ClearRequest::AllRecords => (0, 0),
            ClearRequest::AllNewFlags => (1, 0),
            ClearRequest::NewFlags(n) => (2, n),
        };
        let n = u24_to(n, "clear count")?;
        Ok([kind, n[0], n[1], n[2]])
    }

    pub fn decode(data: &[u8]) -> Result<ClearRequest, PayloadError> {
        expect_len("clear request", data, 4)?;
        match data[0] {
            0 => Ok(ClearRequest::AllRecords),
            1 => Ok(ClearRequest::AllNewFlags),
            2 => Ok(ClearRequest::NewFlags(u24_from(&data[1..4]))),
            other => Err(PayloadError::ClearType(other)),
        }
    }
}

/// DATA of a 0x4E answer from the simulator: how many records or flags were cleared (u24 BE).
pub fn encode_clear_answer(cleared: u32) -> Result<[u8; 3], PayloadError> {
    u24_to(cleared, "clear answer count")
}

/// `None` for an empty payload: firmware that does not report the amount is not an error.
pub fn decode_clear_answer(data: &[u8]) -> Result<Option<u32>, PayloadError> {
    if data.is_empty() {
        return Ok(None);
    }
    expect_len("clear answer", data, 3)?;
    Ok(Some(u24_from(data)))
}

/// DATA of a 0x04 request (connection authentication, protocol v2.5): the user name, then the
/// password, each ASCII in a 12-byte field padded with zeros. Layout and the factory user
/// "admin" from MxLabs/Anviz `Anviz.SDK/Commands/SetConnectionPassword.cs` and
/// `Anviz.SDK/AnvizManager.cs`. The terminal answers RET Ok, or an error RET for a wrong
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionPassword {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for ConnectionPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPassword")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ConnectionPassword {
    pub const LEN: usize = 2 * Self::FIELD_LEN;
    pub const FIELD_LEN: usize = 12;
    /// The user the terminal's connection password belongs to on factory firmware.
    pub const DEFAULT_USER: &'static str = "admin";

    /// The factory user with `password`.
    pub fn new(password: impl Into<String>) -> ConnectionPassword {
        ConnectionPassword {
            user: Self::DEFAULT_USER.to_owned(),
            password: password.into(),
        }
    }

    pub fn encode(&self) -> Result<[u8; ConnectionPassword::LEN], PayloadError> {
        let mut out = [0u8; Self::LEN];
        for (field, (value, what)) in out
            .chunks_exact_mut(Self::FIELD_LEN)
            .zip([(&self.user, "user"), (&self.password, "password")])
        {
            let bytes = value.as_bytes();
            if bytes.len() > Self::FIELD_LEN || !bytes.iter().all(|b| (0x20..0x7F).contains(b)) {
                return Err(PayloadError::Credential { what });
            }
            field[..bytes.len()].copy_from_slice(bytes);
        }
        Ok(out)
    }

    /// Trailing zero padding is not part of a field.
    pub fn decode(data: &[u8]) -> Result<ConnectionPassword, PayloadError> {
        expect_len("connection password", data, Self::LEN)?;
        let field = |b: &[u8], what| {
            let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
            match std::str::from_utf8(&b[..end]) {
                Ok(s) if s.is_ascii() => Ok(s.to_owned()),
                _ => Err(PayloadError::Credential { what }),
            }
        };
        Ok(ConnectionPassword {
            user: field(&data[..Self::FIELD_LEN], "user")?,
            password: field(&data[Self::FIELD_LEN..], "password")?,
        })
    }
}

/// Clock payload (0x38 answer, 0x39 request): `[YY-2000, M, D, h, m, s]`. Sub-seconds dropped.
pub fn encode_clock(t: NaiveDateTime) -> Result<[u8; 6], PayloadError> {
    let yy =
        u8::try_from(t.year() - 2000).map_err(|_| PayloadError::ClockOutOfRange { time: t })?;
    // Month, day, hour, minute and second are all < 256 by construction of NaiveDateTime.
    Ok([
        yy,
        t.month() as u8,
        t.day() as u8,
        t.hour() as u8,
        t.minute() as u8,
        t.second() as u8,
    ])
}

pub fn decode_clock(data: &[u8]) -> Result<NaiveDateTime, PayloadError> {
    let bytes: [u8; 6] = data.try_into().map_err(|_| PayloadError::Length {
        what: "clock",
        expected: 6,
        actual: data.len(),
    })?;
    let [yy, mo, d, h, mi, s] = bytes;
    NaiveDate::from_ymd_opt(2000 + i32::from(yy), u32::from(mo), u32::from(d))
        .and_then(|date| date.and_hms_opt(u32::from(h), u32::from(mi), u32::from(s)))
        .ok_or(PayloadError::InvalidClock { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .and_then(|x| x.and_hms_opt(h, mi, s))
            .expect("test date is valid")
    }

    fn sample_record(i: u64) -> Record {
        Record {
            user_code: 0x12_3456_7890 + i,
            local_time: dt(2024, 3, 15, 8, 30, 5) + TimeDelta::seconds(i as i64 * 61),
            backup_code: 0x08,
            record_type: 0x81,
            work_code: 0x0A_BC_DE,
        }
    }

    fn get_time_frame() -> Vec<u8> {
        encode_request(&Request::new(1, cmd::GET_CLOCK, Vec::new())).expect("encodes")
    }

    fn clock_answer(device_id: u32) -> Response {
        let data = encode_clock(dt(2024, 5, 6, 7, 8, 9)).expect("clock in range");
        Response::answer(device_id, cmd::GET_CLOCK, Ret::Ok, data.to_vec())
    }

    fn drain<F: Frame>(dec: &mut Decoder<F>) -> Vec<Result<F, FrameError>> {
        std::iter::from_fn(|| dec.next_frame()).collect()
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16_mcrf4xx(b"123456789"), 0x6F91);
    }

    #[test]
    fn get_time_to_device_1_matches_documented_bytes() {
        assert_eq!(
            get_time_frame(),
            [0xA5, 0x00, 0x00, 0x00, 0x01, 0x38, 0x00, 0x00, 0x28, 0xCA]
        );
    }

    #[test]
    fn ret_codes_round_trip() {
        for b in 0..=u8::MAX {
            assert_eq!(u8::from(Ret::from(b)), b);
        }
        assert_eq!(Ret::from(0x05), Ret::Empty);
        assert_eq!(Ret::from(0x0B), Ret::FingerprintExists);
        assert_eq!(Ret::from(0x02), Ret::Other(0x02));
    }

    #[test]
    fn request_and_response_round_trip() {
        let req = Request::new(0xDEAD_BEEF, cmd::DOWNLOAD_RECORDS, vec![2, 25]);
        let mut dec = RequestDecoder::new();
        dec.push(&encode_request(&req).expect("encodes"));
        assert_eq!(drain(&mut dec), vec![Ok(req)]);

        let resp = Response::answer(7, cmd::HEARTBEAT, Ret::Fail, Vec::new());
        assert_eq!(resp.ack, 0xFF);
        assert_eq!(resp.cmd(), cmd::HEARTBEAT);
        let mut dec = ResponseDecoder::new();
        dec.push(&encode_response(&resp).expect("encodes"));
        assert_eq!(drain(&mut dec), vec![Ok(resp)]);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn data_longer_than_400_is_refused() {
        let ok = Request::new(1, cmd::SET_SETTINGS, vec![0; MAX_DATA_LEN]);
        assert!(encode_request(&ok).is_ok());
        let too_long = Request::new(1, cmd::SET_SETTINGS, vec![0; MAX_DATA_LEN + 1]);
        assert_eq!(
            encode_request(&too_long),
            Err(EncodeError::DataTooLong { len: 401 })
        );
        let resp = Response::answer(1, cmd::GET_SETTINGS, Ret::Ok, vec![0; 70_000]);
        assert_eq!(
            encode_response(&resp),
            Err(EncodeError::DataTooLong { len: 70_000 })
        );
    }

    #[test]
    fn split_reads_byte_by_byte() {
        let frame = encode_response(&clock_answer(3)).expect("encodes");
        let mut dec = ResponseDecoder::new();
        for (i, b) in frame.iter().enumerate() {
            assert!(dec.next_frame().is_none(), "no frame before byte {i}");
            dec.push(std::slice::from_ref(b));
        }
        assert_eq!(drain(&mut dec), vec![Ok(clock_answer(3))]);
    }

    #[test]
    fn coalesced_frames_in_one_read() {
        let mut bytes = Vec::new();
        for id in 1..=5 {
            bytes.extend(encode_response(&clock_answer(id)).expect("encodes"));
        }
        let mut dec = ResponseDecoder::new();
        // One and a half reads: the tail of frame 3 arrives with the second push.
        let cut = bytes.len() / 2;
        dec.push(&bytes[..cut]);
        let mut got = drain(&mut dec);
        dec.push(&bytes[cut..]);
        got.extend(drain(&mut dec));
        let want: Vec<_> = (1..=5).map(|id| Ok(clock_answer(id))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn garbage_is_skipped_and_counted() {
        let mut bytes = vec![0x00, 0x13, 0xFF];
        bytes.extend(get_time_frame());
        bytes.extend([0x42, 0x42]);
        bytes.extend(get_time_frame());
        let mut dec = RequestDecoder::new();
        dec.push(&bytes);
        let req = Request::new(1, cmd::GET_CLOCK, Vec::new());
        assert_eq!(
            drain(&mut dec),
            vec![
                Err(FrameError::Garbage { skipped: 3 }),
                Ok(req.clone()),
                Err(FrameError::Garbage { skipped: 2 }),
                Ok(req),
            ]
        );
    }

    #[test]
    fn garbage_without_any_stx_is_dropped_whole() {
        let mut dec = RequestDecoder::new();
        dec.push(&[1, 2, 3, 4]);
        assert_eq!(
            drain(&mut dec),
            vec![Err(FrameError::Garbage { skipped: 4 })]
        );
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn bad_crc_is_reported_then_next_frame_decodes() {
        let mut bad = encode_response(&clock_answer(1)).expect("encodes");
        let n = bad.len();
        let good_crc = u16::from_le_bytes([bad[n - 2], bad[n - 1]]);
        bad[n - 2] ^= 0x01;
        let mut bytes = bad;
        bytes.extend(encode_response(&clock_answer(2)).expect("encodes"));

        let mut dec = ResponseDecoder::new();
        dec.push(&bytes);
        let got = drain(&mut dec);
        assert_eq!(
            got.first(),
            Some(&Err(FrameError::Crc {
                expected: good_crc,
                actual: good_crc ^ 0x01
            }))
        );
        assert_eq!(got.last(), Some(&Ok(clock_answer(2))));
        assert!(got[1..got.len() - 1]
            .iter()
            .all(|r| matches!(r, Err(FrameError::Garbage { .. }))));
    }

    #[test]
    fn frame_hidden_inside_a_rejected_candidate_is_found() {
        // A stray STX whose "LEN" swallows a real frame: CRC fails, then the real frame decodes
        // because only the stray STX byte was dropped.
        let real = get_time_frame();
        let mut bytes = vec![STX, 0, 0, 0, 9, 0x38, 0x00, real.len() as u8];
        bytes.extend(&real);
        bytes.extend([0x00, 0x00]);
        let mut dec = RequestDecoder::new();
        dec.push(&bytes);
        let got = drain(&mut dec);
        assert!(matches!(got[0], Err(FrameError::Crc { .. })), "{got:?}");
        assert!(got.contains(&Ok(Request::new(1, cmd::GET_CLOCK, Vec::new()))));
        assert!(got[0].as_ref().is_err_and(FrameError::is_rejected_frame));
    }

    #[test]
    fn oversize_len_is_rejected_without_waiting() {
        let mut bytes = vec![STX, 0, 0, 0, 1, 0x40, 0x01, 0x91]; // LEN 401
        bytes.extend(get_time_frame());
        let mut dec = RequestDecoder::new();
        dec.push(&bytes);
        let got = drain(&mut dec);
        assert_eq!(got[0], Err(FrameError::Oversize { len: 401 }));
        assert_eq!(got[1], Err(FrameError::Garbage { skipped: 7 }));
        assert_eq!(got[2], Ok(Request::new(1, cmd::GET_CLOCK, Vec::new())));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn record_epoch_is_the_second_of_january() {
        let mut bytes = [0u8; RECORD_LEN];
        assert_eq!(
            Record::decode(&bytes).local_time,
            dt(2000, 1, 2, 0, 0, 0),
            "0 seconds is 2000-01-02, the vendor quirk"
        );
        bytes[8] = 61;
        assert_eq!(Record::decode(&bytes).local_time, dt(2000, 1, 2, 0, 1, 1));
    }

    #[test]
    fn record_round_trip_and_field_layout() {
        let r = sample_record(0);
        let bytes = r.encode().expect("encodes");
        assert_eq!(&bytes[..5], &[0x12, 0x34, 0x56, 0x78, 0x90]);
        assert_eq!(bytes[9], 0x08);
        assert_eq!(bytes[10], 0x81);
        assert_eq!(&bytes[11..], &[0x0A, 0xBC, 0xDE]);
        assert_eq!(Record::decode(&bytes), r);
        assert_eq!(Record::from_slice(&bytes), Ok(r));
        assert!(r.door_opened());
        assert_eq!(r.attendance_state(), 1);
        let plain = Record {
            record_type: 0x02,
            ..r
        };
        assert!(!plain.door_opened());
        assert_eq!(plain.attendance_state(), 2);
    }

    #[test]
    fn record_limits_are_errors() {
        let r = sample_record(0);
        let before = Record {
            local_time: dt(2000, 1, 1, 23, 59, 59),
            ..r
        };
        assert!(matches!(
            before.encode(),
            Err(PayloadError::RecordTimeOutOfRange { .. })
        ));
        let last = RECORD_EPOCH + TimeDelta::seconds(i64::from(u32::MAX));
        let max = Record {
            local_time: last,
            ..r
        };
        assert_eq!(Record::decode(&max.encode().expect("u32::MAX fits")), max);
        let beyond = Record {
            local_time: last + TimeDelta::seconds(1),
            ..r
        };
        assert!(matches!(
            beyond.encode(),
            Err(PayloadError::RecordTimeOutOfRange { .. })
        ));
        let big_user = Record {
            user_code: 1 << 40,
            ..r
        };
        assert!(matches!(
            big_user.encode(),
            Err(PayloadError::TooLarge { bytes: 5, .. })
        ));
        let big_work = Record {
            work_code: 1 << 24,
            ..r
        };
        assert!(matches!(
            big_work.encode(),
            Err(PayloadError::TooLarge { bytes: 3, .. })
        ));
        assert!(matches!(
            Record::from_slice(&[0; 13]),
            Err(PayloadError::Length {
                expected: 14,
                actual: 13,
                ..
            })
        ));
    }

    #[test]
    fn realtime_push_frame() {
        let r = sample_record(4);
        let push = Response::realtime_push(9, &r).expect("encodes");
        assert_eq!(push.ack, 0xDF);
        assert!(push.is_realtime_push());
        assert_eq!(push.cmd(), cmd::REALTIME_RECORD);
        let mut dec = ResponseDecoder::new();
        dec.push(&encode_response(&push).expect("encodes"));
        let got = drain(&mut dec);
        assert_eq!(got, vec![Ok(push)]);
        let data = &got[0].as_ref().expect("decoded").data;
        assert_eq!(Record::from_slice(data), Ok(r));
    }

    #[test]
    fn counts_round_trip_and_layout() {
        let c = Counts {
            users: 1,
            fingerprints: 2,
            passwords: 3,
            cards: 4,
            all_records: 0x01_02_03,
            new_records: 0xFF_FF_FF,
        };
        let bytes = c.encode().expect("fits");
        assert_eq!(&bytes[12..], &[0x01, 0x02, 0x03, 0xFF, 0xFF, 0xFF]);
        assert_eq!(Counts::decode(&bytes), Ok(c));
        assert!(matches!(
            Counts::decode(&bytes[..17]),
            Err(PayloadError::Length { expected: 18, .. })
        ));
        let too_big = Counts {
            new_records: 1 << 24,
            ..c
        };
        assert!(matches!(
            too_big.encode(),
            Err(PayloadError::TooLarge { .. })
        ));
    }

    #[test]
    fn download_request_round_trip_and_validation() {
        for param in [
            DownloadParam::Next,
            DownloadParam::All,
            DownloadParam::New,
            DownloadParam::ResendLast,
        ] {
            let req = DownloadRequest { param, count: 25 };
            let bytes = req.encode().expect("valid");
            assert_eq!(DownloadRequest::decode(&bytes), Ok(req));
        }
        assert_eq!(
            DownloadRequest {
                param: DownloadParam::New,
                count: 25
            }
            .encode(),
            Ok([2, 25])
        );
        let too_many = DownloadRequest {
            param: DownloadParam::All,
            count: 26,
        };
        assert_eq!(
            too_many.encode(),
            Err(PayloadError::DownloadCount { count: 26 })
        );
        assert_eq!(
            DownloadRequest::decode(&[2, 0]),
            Err(PayloadError::DownloadCount { count: 0 })
        );
        assert_eq!(
            DownloadRequest::decode(&[3, 5]),
            Err(PayloadError::DownloadParam(3))
        );
        assert!(matches!(
            DownloadRequest::decode(&[2]),
            Err(PayloadError::Length { .. })
        ));
    }

    #[test]
    fn download_answer_round_trip_and_validation() {
        let records: Vec<Record> = (0..25).map(sample_record).collect();
        let bytes = encode_download_answer(&records).expect("25 records fit");
        assert_eq!(bytes.len(), 1 + 25 * 14);
        assert!(bytes.len() <= MAX_DATA_LEN);
        assert_eq!(decode_download_answer(&bytes), Ok(records.clone()));

        let too_many: Vec<Record> = (0..26).map(sample_record).collect();
        assert_eq!(
            encode_download_answer(&too_many),
            Err(PayloadError::DownloadCount { count: 26 })
        );
        assert_eq!(decode_download_answer(&[]), Ok(Vec::new()));
        assert_eq!(decode_download_answer(&[0]), Ok(Vec::new()));
        assert!(matches!(
            decode_download_answer(&bytes[..bytes.len() - 1]),
            Err(PayloadError::Length { .. })
        ));
        assert_eq!(
            decode_download_answer(&[26]),
            Err(PayloadError::DownloadCount { count: 26 })
        );
    }

    #[test]
    fn clear_request_round_trip_and_validation() {
        for req in [
            ClearRequest::AllRecords,
            ClearRequest::AllNewFlags,
            ClearRequest::NewFlags(0x01_02_03),
        ] {
            assert_eq!(ClearRequest::decode(&req.encode().expect("fits")), Ok(req));
        }
        assert_eq!(ClearRequest::NewFlags(60).encode(), Ok([2, 0, 0, 60]));
        assert!(matches!(
            ClearRequest::NewFlags(1 << 24).encode(),
            Err(PayloadError::TooLarge { .. })
        ));
        assert_eq!(
            ClearRequest::decode(&[3, 0, 0, 0]),
            Err(PayloadError::ClearType(3))
        );
        assert!(matches!(
            ClearRequest::decode(&[2, 0, 0]),
            Err(PayloadError::Length { .. })
        ));
        assert_eq!(decode_clear_answer(&[]), Ok(None));
        assert_eq!(
            decode_clear_answer(&encode_clear_answer(35).expect("fits")),
            Ok(Some(35))
        );
        assert!(decode_clear_answer(&[1, 2]).is_err());
    }

    #[test]
    fn clock_round_trip_and_validation() {
        let t = dt(2031, 12, 31, 23, 59, 58);
        let bytes = encode_clock(t).expect("in range");
        assert_eq!(bytes, [31, 12, 31, 23, 59, 58]);
        assert_eq!(decode_clock(&bytes), Ok(t));
        assert_eq!(encode_clock(dt(2255, 1, 1, 0, 0, 0)).map(|b| b[0]), Ok(255));
        assert!(matches!(
            encode_clock(dt(1999, 12, 31, 0, 0, 0)),
            Err(PayloadError::ClockOutOfRange { .. })
        ));
        assert!(matches!(
            encode_clock(dt(2256, 1, 1, 0, 0, 0)),
            Err(PayloadError::ClockOutOfRange { .. })
        ));
        for bad in [
            [24, 2, 30, 0, 0, 0],
            [24, 13, 1, 0, 0, 0],
            [24, 1, 1, 24, 0, 0],
            [24, 1, 1, 0, 60, 0],
            [24, 1, 1, 0, 0, 60],
        ] {
            assert_eq!(
                decode_clock(&bad),
                Err(PayloadError::InvalidClock { bytes: bad })
            );
        }
        assert!(matches!(
            decode_clock(&bytes[..5]),
            Err(PayloadError::Length { .. })
        ));
    }

    fn decode_all<F: Frame>(bytes: &[u8]) -> Vec<Result<F, FrameError>> {
        let mut dec = Decoder::<F>::new();
        dec.push(bytes);
        let got = drain(&mut dec);
        assert_eq!(dec.buffered(), 0, "nothing left over");
        got
    }

    /// Complete frames from public TC-B implementations, checked against this codec in both
    /// directions (decode, then encode back to the same bytes). Facts only; no code was taken.
    mod public_vectors {
        use super::*;

        fn hex(s: &str) -> Vec<u8> {
            s.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                .collect()
        }

        fn request_vector(bytes: &str, want: Request) {
            let bytes = hex(bytes);
            assert_eq!(decode_all::<Request>(&bytes), vec![Ok(want.clone())]);
            assert_eq!(
                decode_all::<AnyFrame>(&bytes),
                vec![Ok(AnyFrame::Request(want.clone()))]
            );
            assert_eq!(encode_request(&want).expect("encodes"), bytes);
        }

        fn response_vector(bytes: &str, want: Response) {
            let bytes = hex(bytes);
            assert_eq!(decode_all::<Response>(&bytes), vec![Ok(want.clone())]);
            assert_eq!(
                decode_all::<AnyFrame>(&bytes),
                vec![Ok(AnyFrame::Response(want.clone()))]
            );
            assert_eq!(encode_response(&want).expect("encodes"), bytes);
        }

        // benperiton/anviz-protocol, Src/Node/lib/Anviz/Client.js (getInfo: "Req" / "Res").
        #[test]
        fn get_settings_exchange_from_benperiton_anviz_protocol() {
            request_vector(
                "A5 00 00 00 01 32 00 00 52 B9",
                Request::new(1, cmd::GET_SETTINGS, Vec::new()),
            );
            response_vector(
                "A5 00 00 00 01 B2 00 00 0F 01 80 00 01 01 01 00 05 00 00 64 00 00 05 00 3A A7",
                Response::answer(
                    1,
                    cmd::GET_SETTINGS,
                    Ret::Ok,
                    hex("01 80 00 01 01 01 00 05 00 00 64 00 00 05 00"),
                ),
            );
        }

        // benperiton/anviz-protocol, Src/Node/lib/Anviz/Client.js (getDatetime: "Req" / "Res").
        #[test]
        fn get_clock_exchange_from_benperiton_anviz_protocol() {
            request_vector(
                "A5 00 00 00 01 38 00 00 28 CA",
                Request::new(1, cmd::GET_CLOCK, Vec::new()),
            );
            let answer = Response::answer(1, cmd::GET_CLOCK, Ret::Ok, hex("0E 07 0F 0C 10 1C"));
            response_vector(
                "A5 00 00 00 01 B8 00 00 06 0E 07 0F 0C 10 1C 71 38",
                answer.clone(),
            );
            assert_eq!(decode_clock(&answer.data), Ok(dt(2014, 7, 15, 12, 16, 28)));
        }

        // benperiton/anviz-protocol, Src/Node/lib/Anviz/Client.js (getUsers: "Req" / "Res"):
        // a download refused with RET 1 and LEN 0.
        #[test]
        fn refused_download_from_benperiton_anviz_protocol() {
            let req = DownloadRequest {
                param: DownloadParam::Next,
                count: 25,
            };
            request_vector(
                "A5 00 00 00 01 40 00 02 00 19 8E F3",
                Request::new(
                    1,
                    cmd::DOWNLOAD_RECORDS,
                    req.encode().expect("valid").to_vec(),
                ),
            );
            response_vector(
                "A5 00 00 00 01 C0 01 00 00 AF 65",
                Response::answer(1, cmd::DOWNLOAD_RECORDS, Ret::Fail, Vec::new()),
            );
        }

        // The device heartbeat and its pong. No captured bytes were found in public code; the
        // layout is MxLabs/Anviz: Anviz.SDK/Responses/Response.cs reads an 8-byte header when
        // byte 5 < 0x80, Anviz.SDK/AnvizStream.cs answers ResponseCode 0x7F with
        // Commands/PongCommand.cs (0xFF, no data), which Commands/Command.cs builds with a RET
        // byte (0) for codes above 0x80 and the heartbeat's own device id. The CRC is the one
        // the vectors above check.
        #[test]
        fn device_heartbeat_and_pong_after_mxlabs_anviz() {
            request_vector(
                "A5 00 00 00 01 7F 00 00 5B 40",
                Request::new(1, cmd::HEARTBEAT, Vec::new()),
            );
            response_vector("A5 00 00 00 01 FF 00 00 00 78 C1", pong(1));
            assert_eq!(pong(1).ack, PONG_ACK);
        }

        // Connection authentication: layout and default credentials from MxLabs/Anviz
        // Anviz.SDK/Commands/SetConnectionPassword.cs (user at 0, password at 12, 24 bytes)
        // and Anviz.SDK/AnvizManager.cs ("admin" / "12345").
        #[test]
        fn connection_password_after_mxlabs_anviz() {
            let cred = ConnectionPassword::new("12345");
            let data = cred.encode().expect("fits");
            request_vector(
                "A5 00 00 00 01 04 00 18 61 64 6D 69 6E 00 00 00 00 00 00 00 \
                 31 32 33 34 35 00 00 00 00 00 00 00 96 F2",
                Request::new(1, cmd::AUTHENTICATE, data.to_vec()),
            );
            assert_eq!(ConnectionPassword::decode(&data), Ok(cred));
        }
    }

    #[test]
    fn connection_password_limits() {
        assert!(ConnectionPassword::new("123456789012").encode().is_ok());
        for bad in ["1234567890123", "pässword", "tab\there"] {
            assert_eq!(
                ConnectionPassword::new(bad).encode(),
                Err(PayloadError::Credential { what: "password" }),
                "{bad:?}"
            );
        }
        assert!(ConnectionPassword::decode(&[0; 23]).is_err());
        assert!(!format!("{:?}", ConnectionPassword::new("hidden")).contains("hidden"));
    }

    /// A terminal's heartbeat, a real-time push and an answer back to back, fed one byte at a
    /// time: the mixed decoder gives all three; a response-only decoder reads the heartbeat's
    /// CRC as LEN and loses step (the bug behind "no answer to command 0x3C").
    #[test]
    fn heartbeat_between_push_and_answer_keeps_step() {
        let heartbeat = Request::new(1, cmd::HEARTBEAT, Vec::new());
        let push = Response::realtime_push(1, &sample_record(1)).expect("encodes");
        let counts = Response::answer(1, cmd::GET_COUNTS, Ret::Ok, vec![0; Counts::LEN]);
        let mut bytes = encode_request(&heartbeat).expect("encodes");
        bytes.extend(encode_response(&push).expect("encodes"));
        bytes.extend(encode_response(&counts).expect("encodes"));
        bytes.extend(encode_request(&heartbeat).expect("encodes"));

        let mut dec = AnyFrameDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            dec.push(std::slice::from_ref(b));
            got.extend(drain(&mut dec));
        }
        assert_eq!(
            got,
            vec![
                Ok(AnyFrame::Request(heartbeat.clone())),
                Ok(AnyFrame::Response(push)),
                Ok(AnyFrame::Response(counts.clone())),
                Ok(AnyFrame::Request(heartbeat)),
            ]
        );
        assert_eq!(dec.buffered(), 0);

        let old = decode_all_lossy::<Response>(&bytes);
        assert!(
            !old.contains(&Ok(counts)),
            "a response-only decoder was expected to lose the answer: {old:?}"
        );
    }

    fn decode_all_lossy<F: Frame>(bytes: &[u8]) -> Vec<Result<F, FrameError>> {
        let mut dec = Decoder::<F>::new();
        dec.push(bytes);
        drain(&mut dec)
    }

    #[test]
    fn any_frame_shape_follows_byte_five() {
        for code in 0..=u8::MAX {
            let mut bytes = vec![STX, 0, 0, 0, 3, code];
            let want = if is_response_code(code) {
                bytes.extend([0, 0, 0]);
                AnyFrame::Response(Response {
                    device_id: 3,
                    ack: code,
                    ret: Ret::Ok,
                    data: Vec::new(),
                })
            } else {
                bytes.extend([0, 0]);
                AnyFrame::Request(Request::new(3, code, Vec::new()))
            };
            let crc = crc16_mcrf4xx(&bytes);
            bytes.extend(crc.to_le_bytes());
            assert_eq!(decode_all::<AnyFrame>(&bytes), vec![Ok(want.clone())]);
            assert_eq!(encode_any(&want).expect("encodes"), bytes);
            assert_eq!(want.device_id(), 3);
        }
    }
}
