//! A simulated Anviz TC-B terminal (the device side) over real TCP, for tests and `badgegate demo`.
//!
//! It speaks the wire format of [`codec`] and keeps what a terminal keeps: records with their
//! new-flags, a clock, a settings block. Faults are injected by calling methods, so tests wait on
//! events (a frame, a closed link) instead of timing.
//!
//! Behaviour the agent can rely on when talking to the simulator (real firmware may differ):
//! - **Empty download**: a 0x40 request that finds nothing is answered `RET Empty (5)`, `LEN 0`.
//!   A download request with an unknown parameter or n outside 1..=25, or "next packet" before
//!   any download started on that link, is answered `RET Fail`.
//! - **Download position** is kept per link (real firmware keeps one per device), so concurrent
//!   test clients do not disturb each other.
//! - **Foreign device id**: a request whose CH is neither this device's id nor 0 is ignored —
//!   no answer, as a device sharing an RS-485 bus stays silent — and counted in
//!   [`SimStats::foreign_requests`]. Answers always carry this device's id, also to CH 0.
//! - **Clear (0x4E)** answers `RET Ok` with DATA = how many records (type 0) or new-flags (types
//!   1, 2) it cleared, u24 BE. Type 2 clears the N oldest flags, never more than exist.
//! - **Unknown commands** and undecodable payloads are answered `RET Fail`, `LEN 0`.
//! - **Invalid frames** from the agent are skipped by resynchronising and counted
//!   ([`SimStats::frames_rejected`], [`SimStats::garbage_bytes`]).
//! - **Real-time push** (ACK 0xDF) goes to every open link, server and client mode alike; pushed
//!   records keep their new-flag until the agent clears it.
//! - **`corrupt_next_crc`** applies to every frame the device sends, answers and pushes.
//! - **Idle timeout** counts from the last bytes received from the agent.
//! - **Heartbeat** ([`Simulator::set_heartbeat`]): every link sends the device-initiated
//!   request-shaped 0x7F (8-byte header, LEN 0) at that interval and counts it
//!   ([`SimStats::heartbeats_sent`]); a pong from the agent (response-shaped, ACK 0xFF) is counted
//!   in [`SimStats::pongs_received`]. Frames from the agent are decoded by shape (byte 5), so a
//!   pong never desynchronises the device.
//! - **Connection password** ([`SimulatorConfig::password`]): 0x04 with user "admin" and that
//!   password is answered `RET Ok` and unlocks the link; any other is answered `RET Fail`
//!   ([`SimStats::auth_failed`]). Until a link is unlocked every other request is answered
//!   `RET Fail`. Without a password, 0x04 is answered `RET Ok`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{Local, NaiveDateTime, TimeDelta};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::terminals::anviz::codec::{
    self, cmd, AnyFrame, AnyFrameDecoder, ClearRequest, ConnectionPassword, Counts, DownloadParam,
    DownloadRequest, FrameError, Record, Request, Response, Ret,
};

/// First and longest pause between client-mode connection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// The CH this device answers to (besides 0).
    pub device_id: u32,
    /// Simulated clock = system local time + this offset; a terminal clock is rarely right.
    pub clock_offset: TimeDelta,
    /// Connection password (0x04) every link must present before anything else.
    pub password: Option<String>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            device_id: 1,
            clock_offset: TimeDelta::zero(),
            password: None,
        }
    }
}

/// Counters for assertions and the demo's status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Links opened, server and client mode.
    pub links_opened: u64,
    /// Requests addressed to this device (answered, successfully or not).
    pub requests_served: u64,
    /// Records sent in download answers.
    pub records_sent: u64,
    pub clears_received: u64,
    /// Real-time push frames sent (one per record per open link).
    pub realtime_pushes: u64,
    /// Frames from the agent with a bad CRC or LEN > 400.
    pub frames_rejected: u64,
    /// Bytes from the agent skipped while looking for a frame start.
    pub garbage_bytes: u64,
    /// Requests for another device id, ignored.
    pub foreign_requests: u64,
    /// Frames sent with a deliberately wrong CRC.
    pub corrupted_crcs: u64,
    /// Clear requests swallowed by [`Simulator::block_clears`].
    pub clears_blocked: u64,
    /// Links dropped by the idle timeout.
    pub idle_drops: u64,
    /// Records `add_record` refused because the wire cannot carry them.
    pub records_refused: u64,
    /// Device-initiated heartbeats (0x7F) sent.
    pub heartbeats_sent: u64,
    /// Pongs (ACK 0xFF) received from the agent.
    pub pongs_received: u64,
    /// Response-shaped frames from the agent other than pongs.
    pub unexpected_responses: u64,
    /// Connection passwords (0x04) accepted and refused.
    pub auth_ok: u64,
    pub auth_failed: u64,
    /// Requests refused because the link had not presented the password.
    pub auth_required: u64,
}

/// Cheap to clone; all clones drive the same device. Call [`Simulator::stop`] when done: the
/// background tasks keep the device alive otherwise.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("device_id", &self.inner.device_id)
            .field("links", &self.link_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    device_id: u32,
    password: Option<String>,
    state: Mutex<State>,
    /// Number of open links, for [`Simulator::wait_for_links`].
    link_count: watch::Sender<usize>,
}

struct State {
    /// Oldest first, as the device stores them.
    records: Vec<Stored>,
    next_seq: u64,
    clock_offset: TimeDelta,
    settings: Vec<u8>,
    corrupt_crcs: usize,
    /// Clear requests are swallowed (neither applied nor answered) while set.
    block_clears: bool,
    answer_delay: Duration,
    idle_timeout: Option<Duration>,
    heartbeat: Option<Duration>,
    links: HashMap<u64, LinkHandle>,
    next_link_id: u64,
    listeners: Vec<ListenerHandle>,
    connectors: Vec<JoinHandle<()>>,
    stats: SimStats,
}

struct Stored {
    /// Increasing, never reused: download positions survive deletions.
    seq: u64,
    record: Record,
    new: bool,
}

struct LinkHandle {
    events: mpsc::UnboundedSender<LinkEvent>,
    /// `None` for the instant between registering the link and spawning its task; dropping
    /// `events` still closes such a link.
    task: Option<JoinHandle<()>>,
}

enum LinkEvent {
    /// An encoded frame to send (real-time push).
    Push(Vec<u8>),
    /// The idle timeout or heartbeat changed: recompute the deadlines.
    Wake,
}

struct ListenerHandle {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Per-link download state.
#[derive(Default)]
struct Session {
    cursor: Option<Cursor>,
    last_packet: Vec<Record>,
    /// The connection password was presented (or none is required).
    unlocked: bool,
}

#[derive(Clone, Copy)]
struct Cursor {
    new_only: bool,
    /// Sequence number of the last record returned; 0 = from the start.
    after_seq: u64,
}

impl Simulator {
    pub fn new(cfg: SimulatorConfig) -> Simulator {
        let state = State {
            records: Vec::new(),
            next_seq: 1,
            clock_offset: cfg.clock_offset,
            settings: Vec::new(),
            corrupt_crcs: 0,
            block_clears: false,
            answer_delay: Duration::ZERO,
            idle_timeout: None,
            heartbeat: None,
            links: HashMap::new(),
            next_link_id: 0,
            listeners: Vec::new(),
            connectors: Vec::new(),
            stats: SimStats::default(),
        };
        Simulator {
            inner: Arc::new(Inner {
                device_id: cfg.device_id,
                password: cfg.password,
                state: Mutex::new(state),
                link_count: watch::Sender::new(0),
            }),
        }
    }

    pub fn device_id(&self) -> u32 {
        self.inner.device_id
    }

    /// Server mode: the device listens and the agent connects. Returns the bound address (use
    /// port 0 to let the OS pick one).
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let listener = bind(addr)?;
        let bound = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(Arc::clone(&self.inner), listener));
        self.inner
            .lock()
            .listeners
            .push(ListenerHandle { addr: bound, task });
        tracing::debug!(device_id = self.inner.device_id, %bound, "simulated terminal listening");
        Ok(bound)
    }

    /// Client mode: the device connects out to the agent (needed for real-time push) and
    /// reconnects with a short backoff whenever the link ends, until [`Simulator::stop`].
    pub fn connect_to(&self, agent_addr: SocketAddr) {
        let task = tokio::spawn(connect_loop(Arc::clone(&self.inner), agent_addr));
        self.inner.lock().connectors.push(task);
    }

    /// Stores a record with its new-flag set and, if `push_realtime`, pushes it on every open
    /// link. A record the wire cannot carry is refused with a warning and counted in
    /// [`SimStats::records_refused`]; use [`Simulator::try_add_record`] to get the error.
    pub fn add_record(&self, r: Record, push_realtime: bool) {
        if let Err(e) = self.try_add_record(r, push_realtime) {
            tracing::warn!(error = %e, "simulated terminal refused a record");
            self.inner.lock().stats.records_refused += 1;
        }
    }

    pub fn try_add_record(
        &self,
        r: Record,
        push_realtime: bool,
    ) -> Result<(), codec::PayloadError> {
        let push = Response::realtime_push(self.inner.device_id, &r)?;
        let mut st = self.inner.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.records.push(Stored {
            seq,
            record: r,
            new: true,
        });
        if push_realtime {
            let ids: Vec<u64> = st.links.keys().copied().collect();
            for id in ids {
                let Some(frame) = st.encode_outgoing(&push) else {
                    break;
                };
                if let Some(link) = st.links.get(&id) {
                    // A closed receiver means the link is going away; nothing to deliver to.
                    if link.events.send(LinkEvent::Push(frame)).is_ok() {
                        st.stats.realtime_pushes += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records whose new-flag is still set.
    pub fn new_count(&self) -> usize {
        self.inner.lock().records.iter().filter(|s| s.new).count()
    }

    pub fn total_count(&self) -> usize {
        self.inner.lock().records.len()
    }

    /// All stored records, oldest first.
    pub fn records(&self) -> Vec<Record> {
        self.inner.lock().records.iter().map(|s| s.record).collect()
    }

    /// Sets the simulated device clock (it keeps running from `t`).
    pub fn set_clock(&self, t: NaiveDateTime) {
        self.inner.lock().set_clock(t);
    }

    pub fn clock(&self) -> NaiveDateTime {
        self.inner.lock().clock()
    }

    /// Closes every open link now; client-mode connectors reconnect after their backoff.
    pub fn drop_links(&self) {
        self.inner.drop_links();
    }

    /// The next `n` frames the device sends carry a wrong CRC.
    pub fn corrupt_next_crc(&self, n: usize) {
        self.inner.lock().corrupt_crcs = n;
    }

    /// Delay before each answer (not before real-time pushes).
    /// While `true`, clear requests (0x4E) are swallowed: not applied, not answered. Lets a test
    /// stop an agent between "downloaded and committed" and "flags cleared".
    pub fn block_clears(&self, block: bool) {
        self.inner.lock().block_clears = block;
    }

    /// Send raw bytes (garbage, a truncated frame) on every open link.
    pub fn inject_raw(&self, bytes: &[u8]) {
        let st = self.inner.lock();
        for link in st.links.values() {
            let _ = link.events.send(LinkEvent::Push(bytes.to_vec()));
        }
    }

    pub fn set_answer_delay(&self, d: Duration) {
        self.inner.lock().answer_delay = d;
    }

    /// Drops links that received nothing for longer than `d` (real firmware: about 30 min).
    /// Applies to open links at once.
    pub fn set_idle_timeout(&self, d: Option<Duration>) {
        let st = &mut *self.inner.lock();
        st.idle_timeout = d;
        for link in st.links.values() {
            // A closed receiver means the link is already ending.
            let _ = link.events.send(LinkEvent::Wake);
        }
    }

    /// Every link sends a device heartbeat (0x7F) this often; `None` stops them. Applies to
    /// open links at once.
    pub fn set_heartbeat(&self, every: Option<Duration>) {
        let st = &mut *self.inner.lock();
        st.heartbeat = every;
        for link in st.links.values() {
            // A closed receiver means the link is already ending.
            let _ = link.events.send(LinkEvent::Wake);
        }
    }

    /// A power cycle: links drop, the listening sockets close and reopen on the same addresses.
    /// Records, new-flags, clock and settings are kept, as in the terminal's flash and RTC.
    /// Client-mode connectors reconnect on their own. A failure to re-bind is logged.
    pub async fn restart(&self) {
        let listeners = std::mem::take(&mut self.inner.lock().listeners);
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
        join_aborted(listeners.into_iter().map(|l| l.task).collect()).await;
        self.inner.drop_links();
        for addr in addrs {
            if let Err(e) = self.listen(addr).await {
                tracing::error!(%addr, error = %e, "simulated terminal could not listen again after restart");
            }
        }
    }

    /// Stops listening and connecting and closes every link. Stored data is kept; `listen` and
    /// `connect_to` may be called again.
    pub async fn stop(&self) {
        let (listeners, connectors) = {
            let mut st = self.inner.lock();
            (
                std::mem::take(&mut st.listeners),
                std::mem::take(&mut st.connectors),
            )
        };
        let tasks = listeners.into_iter().map(|l| l.task).chain(connectors);
        // After this no task can open a new link, so dropping the links below catches them all.
        join_aborted(tasks.collect()).await;
        self.inner.drop_links();
    }

    pub fn stats(&self) -> SimStats {
        self.inner.lock().stats
    }

    /// Open links right now.
    pub fn link_count(&self) -> usize {
        *self.inner.link_count.borrow()
    }

    /// Resolves once at least `n` links are open: lets a test push only when the agent is there.
    pub async fn wait_for_links(&self, n: usize) {
        let mut rx = self.inner.link_count.subscribe();
        // Cannot fail: `self` keeps the sender alive.
        let _ = rx.wait_for(|&count| count >= n).await;
    }
}

impl Inner {
    /// Never held across an `.await`, and nothing that might drop a link task (spawn, abort)
    /// runs under it, because a link's cleanup takes this lock.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent-enough test state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn drop_links(&self) {
        let links: Vec<LinkHandle> = {
            let mut st = self.lock();
            let links = st.links.drain().map(|(_, link)| link).collect();
            self.link_count.send_replace(0);
            links
        };
        for link in links {
            // Aborting closes the socket even mid-write; dropping `events` covers a link whose
            // task was not recorded yet.
            if let Some(task) = link.task {
                task.abort();
            }
        }
    }

    /// Registers and spawns a link; the receiver resolves when the link has ended.
    fn open_link(self: &Arc<Self>, stream: TcpStream) -> oneshot::Receiver<()> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        let id = {
            let mut st = self.lock();
            let id = st.next_link_id;
            st.next_link_id += 1;
            st.links.insert(
                id,
                LinkHandle {
                    events: events_tx,
                    task: None,
                },
            );
            st.stats.links_opened += 1;
            self.link_count.send_replace(st.links.len());
            id
        };
        let guard = LinkGuard {
            inner: Arc::clone(self),
            id,
            _ended: ended_tx,
        };
        let task = tokio::spawn(run_link(Arc::clone(self), stream, events_rx, guard));
        if let Some(link) = self.lock().links.get_mut(&id) {
            link.task = Some(task);
        }
        ended_rx
    }

    /// The encoded answer to `req` and the delay before sending it; `None` when the device
    /// stays silent (foreign device id).
    fn serve(&self, session: &mut Session, req: &Request) -> Option<(Vec<u8>, Duration)> {
        let mut st = self.lock();
        if req.device_id != codec::ANY_DEVICE && req.device_id != self.device_id {
            st.stats.foreign_requests += 1;
            tracing::debug!(
                to = req.device_id,
                me = self.device_id,
                "ignoring request for another device"
            );
            return None;
        }
        if req.cmd == cmd::CLEAR_RECORDS && st.block_clears {
            st.stats.clears_blocked += 1;
            return None;
        }
        st.stats.requests_served += 1;
        let (ret, data) = if req.cmd == cmd::AUTHENTICATE {
            self.authenticate(&mut st, session, req)
        } else if !session.unlocked && self.password.is_some() {
            st.stats.auth_required += 1;
            (Ret::Fail, Vec::new())
        } else {
            st.answer(session, req)
        };
        let resp = Response::answer(self.device_id, req.cmd, ret, data);
        let frame = st.encode_outgoing(&resp)?;
        Some((frame, st.answer_delay))
    }

    fn authenticate(&self, st: &mut State, session: &mut Session, req: &Request) -> (Ret, Vec<u8>) {
        let Some(want) = &self.password else {
            return (Ret::Ok, Vec::new());
        };
        let ok = ConnectionPassword::decode(&req.data)
            .is_ok_and(|got| got.user == ConnectionPassword::DEFAULT_USER && &got.password == want);
        session.unlocked |= ok;
        if ok {
            st.stats.auth_ok += 1;
            (Ret::Ok, Vec::new())
        } else {
            st.stats.auth_failed += 1;
            (Ret::Fail, Vec::new())
        }
    }

    /// A frame the agent sent in response shape: a pong, or something a device never asked for.
    fn agent_response(&self, resp: &Response) {
        let stats = &mut self.lock().stats;
        if resp.ack == codec::PONG_ACK {
            stats.pongs_received += 1;
        } else {
            tracing::debug!(
                ack = resp.ack,
                "simulated terminal got a response it never asked for"
            );
            stats.unexpected_responses += 1;
        }
    }

    /// An encoded device heartbeat, counted.
    fn heartbeat_frame(&self) -> Option<Vec<u8>> {
        let frame =
            codec::encode_request(&Request::new(self.device_id, cmd::HEARTBEAT, Vec::new()))
                .ok()?;
        self.lock().stats.heartbeats_sent += 1;
        Some(frame)
    }

    fn count_rejected(&self, e: &FrameError) {
        tracing::debug!(error = %e, "simulated terminal skipped invalid input");
        let stats = &mut self.lock().stats;
        match e {
            FrameError::Garbage { skipped } => stats.garbage_bytes += *skipped as u64,
            FrameError::Oversize { .. } | FrameError::Crc { .. } => stats.frames_rejected += 1,
        }
    }
}

impl State {
    fn clock(&self) -> NaiveDateTime {
        Local::now().naive_local() + self.clock_offset
    }

    fn set_clock(&mut self, t: NaiveDateTime) {
        self.clock_offset = t - Local::now().naive_local();
    }

    /// RET and DATA for a request addressed to this device.
    fn answer(&mut self, session: &mut Session, req: &Request) -> (Ret, Vec<u8>) {
        let fail = (Ret::Fail, Vec::new());
        match req.cmd {
            cmd::GET_COUNTS => self.counts().map_or(fail, |c| (Ret::Ok, c.to_vec())),
            cmd::DOWNLOAD_RECORDS => match DownloadRequest::decode(&req.data) {
                Ok(dl) => self.download(session, dl),
                Err(_) => fail,
            },
            cmd::CLEAR_RECORDS => match ClearRequest::decode(&req.data) {
                Ok(clear) => {
                    self.stats.clears_received += 1;
                    let cleared = u32::try_from(self.clear(clear)).unwrap_or(u32::MAX);
                    codec::encode_clear_answer(cleared).map_or(fail, |d| (Ret::Ok, d.to_vec()))
                }
                Err(_) => fail,
            },
            cmd::GET_CLOCK => {
                codec::encode_clock(self.clock()).map_or(fail, |d| (Ret::Ok, d.to_vec()))
            }
            cmd::SET_CLOCK => match codec::decode_clock(&req.data) {
                Ok(t) => {
                    self.set_clock(t);
                    (Ret::Ok, Vec::new())
                }
                Err(_) => fail,
            },
            cmd::GET_SETTINGS => (Ret::Ok, self.settings.clone()),
            cmd::SET_SETTINGS => {
                self.settings.clone_from(&req.data);
                (Ret::Ok, Vec::new())
            }
            cmd::HEARTBEAT => (Ret::Ok, Vec::new()),
            _ => fail,
        }
    }

    fn counts(&self) -> Result<[u8; Counts::LEN], codec::PayloadError> {
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let users: HashSet<u64> = self.records.iter().map(|s| s.record.user_code).collect();
        Counts {
            users: to_u32(users.len()),
            fingerprints: 0,
            passwords: 0,
            cards: 0,
            all_records: to_u32(self.records.len()),
            new_records: to_u32(self.records.iter().filter(|s| s.new).count()),
        }
        .encode()
    }

    fn download(&mut self, session: &mut Session, req: DownloadRequest) -> (Ret, Vec<u8>) {
        let cursor = match req.param {
            DownloadParam::ResendLast => None,
            DownloadParam::All => Some(Cursor {
                new_only: false,
                after_seq: 0,
            }),
            DownloadParam::New => Some(Cursor {
                new_only: true,
                after_seq: 0,
            }),
            DownloadParam::Next => match session.cursor {
                Some(c) => Some(c),
                None => return (Ret::Fail, Vec::new()),
            },
        };
        if let Some(cursor) = cursor {
            let packet: Vec<&Stored> = self
                .records
                .iter()
                .filter(|s| s.seq > cursor.after_seq && (s.new || !cursor.new_only))
                .take(usize::from(req.count))
                .collect();
            session.cursor = Some(Cursor {
                after_seq: packet.last().map_or(cursor.after_seq, |s| s.seq),
                ..cursor
            });
            session.last_packet = packet.iter().map(|s| s.record).collect();
        }
        self.stats.records_sent += session.last_packet.len() as u64;
        packet_answer(&session.last_packet)
    }

    /// How many records (type 0) or new-flags were cleared.
    fn clear(&mut self, req: ClearRequest) -> usize {
        match req {
            ClearRequest::AllRecords => {
                let n = self.records.len();
                self.records.clear();
                n
            }
            ClearRequest::AllNewFlags => self.clear_new_flags(usize::MAX),
            ClearRequest::NewFlags(n) => {
                self.clear_new_flags(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// Clears the `n` oldest new-flags: the agent acknowledges exactly what it downloaded,
    /// and records that arrived meanwhile stay new.
    fn clear_new_flags(&mut self, n: usize) -> usize {
        let mut cleared = 0;
        for s in self.records.iter_mut().filter(|s| s.new).take(n) {
            s.new = false;
            cleared += 1;
        }
        cleared
    }

    /// Encodes a frame for the wire, applying a pending CRC corruption.
    fn encode_outgoing(&mut self, resp: &Response) -> Option<Vec<u8>> {
        let mut frame = match codec::encode_response(resp) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(error = %e, "simulated terminal built a frame it cannot encode");
                return None;
            }
        };
        if self.corrupt_crcs > 0 {
            if let [.., lo, hi] = frame.as_mut_slice() {
                // Inverting both bytes guarantees a mismatch whatever the CRC was.
                *lo ^= 0xFF;
                *hi ^= 0xFF;
                self.corrupt_crcs -= 1;
                self.stats.corrupted_crcs += 1;
            }
        }
        Some(frame)
    }
}

fn packet_answer(records: &[Record]) -> (Ret, Vec<u8>) {
    if records.is_empty() {
        return (Ret::Empty, Vec::new());
    }
    match codec::encode_download_answer(records) {
        Ok(data) => (Ret::Ok, data),
        Err(_) => (Ret::Fail, Vec::new()),
    }
}

/// Removes a link from the registry however its task ends, including abort; dropping
/// `_ended` tells a client-mode connector to reconnect.
struct LinkGuard {
    inner: Arc<Inner>,
    id: u64,
    _ended: oneshot::Sender<()>,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.links.remove(&self.id);
        self.inner.link_count.send_replace(st.links.len());
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted device must get its port back while its old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(64)
}

async fn join_aborted(tasks: Vec<JoinHandle<()>>) {
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        // Cancelled is the expected outcome; waiting guarantees the sockets are closed.
        let _ = task.await;
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tracing::debug!(%peer, "agent connected to simulated terminal");
                // Server-mode links end on their own; nobody waits for them.
                drop(inner.open_link(stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "simulated terminal failed to accept");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

async fn connect_loop(inner: Arc<Inner>, agent: SocketAddr) {
    let mut backoff = RECONNECT_MIN;
    loop {
        match TcpStream::connect(agent).await {
            Ok(stream) => {
                tracing::debug!(%agent, "simulated terminal connected to agent");
                backoff = RECONNECT_MIN;
                // Resolves (with an error: nothing is ever sent) when the link has ended.
                let _ = inner.open_link(stream).await;
            }
            Err(e) => tracing::debug!(%agent, error = %e, "simulated terminal cannot reach agent"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

async fn run_link(
    inner: Arc<Inner>,
    stream: TcpStream,
    mut events: mpsc::UnboundedReceiver<LinkEvent>,
    _guard: LinkGuard,
) {
    // Frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let mut decoder = AnyFrameDecoder::new();
    let mut session = Session::default();
    let mut buf = [0u8; 1024];
    let mut last_heard = Instant::now();
    let mut last_beat = Instant::now();
    loop {
        let (idle_deadline, beat_at) = {
            let st = inner.lock();
            (
                st.idle_timeout.map(|d| last_heard + d),
                st.heartbeat.map(|d| last_beat + d),
            )
        };
        tokio::select! {
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(error = %e, "simulated terminal link read failed");
                        return;
                    }
                };
                last_heard = Instant::now();
                decoder.push(&buf[..n]);
                while let Some(item) = decoder.next_frame() {
                    match item {
                        Ok(AnyFrame::Response(resp)) => inner.agent_response(&resp),
                        Ok(AnyFrame::Request(req)) => {
                            let Some((frame, delay)) = inner.serve(&mut session, &req) else {
                                continue;
                            };
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            if writer.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => inner.count_rejected(&e),
                    }
                }
            }
            event = events.recv() => match event {
                Some(LinkEvent::Push(frame)) => {
                    if writer.write_all(&frame).await.is_err() {
                        return;
                    }
                }
                Some(LinkEvent::Wake) => {}
                // Unregistered by drop_links, restart or stop.
                None => return,
            },
            () = expiry(beat_at) => {
                last_beat = Instant::now();
                if let Some(frame) = inner.heartbeat_frame() {
                    if writer.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            }
            () = expiry(idle_deadline) => {
                tracing::debug!("simulated terminal dropped an idle link");
                inner.lock().stats.idle_drops += 1;
                return;
            }
        }
    }
}

/// Resolves at `deadline`, never without one.
async fn expiry(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminals::anviz::codec::{ack_for, encode_request, ResponseDecoder};
    use chrono::NaiveDate;
    use std::future::Future;

    const DEVICE: u32 = 7;
    /// Bound on every wait; generous because CI machines are shared.
    const WAIT: Duration = Duration::from_secs(10);

    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(WAIT, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn dt(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .and_then(|x| x.and_hms_opt(h, mi, s))
            .expect("test date is valid")
    }

    /// Seven distinct users, one minute apart.
    fn record(i: u64) -> Record {
        Record {
            user_code: 1000 + i % 7,
            local_time: dt(2024, 11, 4, 7, 0, 0) + TimeDelta::minutes(i as i64),
            backup_code: 0x08,
            record_type: (i % 2) as u8,
            work_code: 0,
        }
    }

    fn simulator() -> Simulator {
        Simulator::new(SimulatorConfig {
            device_id: DEVICE,
            ..SimulatorConfig::default()
        })
    }

    /// The agent side, reduced to what the tests need.
    struct Agent {
        stream: TcpStream,
        decoder: ResponseDecoder,
    }

    impl Agent {
        async fn connect(addr: SocketAddr) -> Agent {
            let stream = within("connect", TcpStream::connect(addr))
                .await
                .expect("connect to simulator");
            Agent::from_stream(stream)
        }

        fn from_stream(stream: TcpStream) -> Agent {
            Agent {
                stream,
                decoder: ResponseDecoder::new(),
            }
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            within("write", self.stream.write_all(bytes))
                .await
                .expect("write to simulator");
        }

        async fn send(&mut self, device_id: u32, cmd: u8, data: &[u8]) {
            let bytes = encode_request(&Request::new(device_id, cmd, data)).expect("encodes");
            self.send_raw(&bytes).await;
        }

        /// Next decoded item, `None` once the device closed the link.
        async fn next_item(&mut self) -> Option<Result<Response, FrameError>> {
            within("a frame from the simulator", async {
                loop {
                    if let Some(item) = self.decoder.next_frame() {
                        return Some(item);
                    }
                    let mut buf = [0u8; 512];
                    match self.stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.decoder.push(&buf[..n]),
                    }
                }
            })
            .await
        }

        async fn next_frame(&mut self) -> Response {
            match self.next_item().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => panic!("unexpected invalid frame: {e}"),
                None => panic!("simulator closed the link"),
            }
        }

        async fn call(&mut self, cmd: u8, data: &[u8]) -> Response {
            self.send(DEVICE, cmd, data).await;
            let resp = self.next_frame().await;
            assert_eq!(resp.ack, ack_for(cmd), "answer to {cmd:#04x}: {resp:?}");
            assert_eq!(resp.device_id, DEVICE);
            resp
        }

        async fn counts(&mut self) -> Counts {
            let resp = self.call(cmd::GET_COUNTS, &[]).await;
            assert_eq!(resp.ret, Ret::Ok);
            Counts::decode(&resp.data).expect("counts payload")
        }

        async fn download(&mut self, param: DownloadParam, count: u8) -> (Ret, Vec<Record>) {
            let data = DownloadRequest { param, count }.encode().expect("valid");
            let resp = self.call(cmd::DOWNLOAD_RECORDS, &data).await;
            let records = codec::decode_download_answer(&resp.data).expect("download payload");
            (resp.ret, records)
        }

        async fn clear(&mut self, req: ClearRequest) -> Option<u32> {
            let resp = self
                .call(cmd::CLEAR_RECORDS, &req.encode().expect("valid"))
                .await;
            assert_eq!(resp.ret, Ret::Ok);
            codec::decode_clear_answer(&resp.data).expect("clear payload")
        }

        async fn closed(&mut self) {
            while self.next_item().await.is_some() {}
        }
    }

    #[tokio::test]
    async fn download_and_clear_cycle_over_several_batches() {
        let sim = simulator();
        let all: Vec<Record> = (0..60).map(record).collect();
        for r in &all {
            sim.add_record(*r, false);
        }
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;

        let c = agent.counts().await;
        assert_eq!((c.users, c.all_records, c.new_records), (7, 60, 60));

        let mut downloaded = Vec::new();
        let (ret, first) = agent.download(DownloadParam::New, 25).await;
        assert_eq!((ret, first.len()), (Ret::Ok, 25));
        downloaded.extend(first);
        let (ret, second) = agent.download(DownloadParam::Next, 25).await;
        assert_eq!((ret, second.len()), (Ret::Ok, 25));
        downloaded.extend(second);
        let (ret, third) = agent.download(DownloadParam::Next, 25).await;
        assert_eq!((ret, third.len()), (Ret::Ok, 10));
        assert_eq!(
            agent.download(DownloadParam::ResendLast, 25).await,
            (Ret::Ok, third.clone())
        );
        downloaded.extend(third);
        assert_eq!(downloaded, all, "oldest first, nothing skipped or repeated");

        // Empty result: RET Empty with LEN 0.
        let resp = agent
            .call(cmd::DOWNLOAD_RECORDS, &[DownloadParam::Next.code(), 25])
            .await;
        assert_eq!((resp.ret, resp.data.len()), (Ret::Empty, 0));

        // Records arriving between download and acknowledgement must stay new.
        sim.add_record(record(60), false);
        sim.add_record(record(61), false);
        assert_eq!(agent.clear(ClearRequest::NewFlags(60)).await, Some(60));
        assert_eq!(sim.new_count(), 2);
        assert_eq!(agent.counts().await.new_records, 2);
        assert_eq!(
            agent.download(DownloadParam::New, 25).await,
            (Ret::Ok, vec![record(60), record(61)])
        );

        // "All" ignores the flags.
        let (_, from_start) = agent.download(DownloadParam::All, 25).await;
        assert_eq!(from_start, all[..25]);

        assert_eq!(agent.clear(ClearRequest::AllNewFlags).await, Some(2));
        assert_eq!(sim.new_count(), 0);
        assert_eq!(
            agent.download(DownloadParam::New, 25).await,
            (Ret::Empty, Vec::new())
        );
        assert_eq!(agent.clear(ClearRequest::AllRecords).await, Some(62));
        assert_eq!(sim.total_count(), 0);

        let stats = sim.stats();
        assert_eq!(stats.clears_received, 3);
        // 60 in three packets, 10 resent, 2 new, 25 from the start.
        assert_eq!(stats.records_sent, 60 + 10 + 2 + 25);
        sim.stop().await;
    }

    #[tokio::test]
    async fn corrupt_crc_answer_is_rejected_and_a_retry_works() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        sim.corrupt_next_crc(1);

        agent.send(DEVICE, cmd::GET_CLOCK, &[]).await;
        loop {
            match agent.next_item().await {
                Some(Err(FrameError::Crc { expected, actual })) => {
                    assert_ne!(expected, actual);
                    break;
                }
                Some(Err(FrameError::Garbage { .. })) => {}
                other => panic!("expected a CRC rejection, got {other:?}"),
            }
        }

        agent.send(DEVICE, cmd::GET_CLOCK, &[]).await;
        let answer = loop {
            match agent.next_item().await {
                Some(Ok(frame)) => break frame,
                // Leftovers of the corrupt frame.
                Some(Err(_)) => {}
                None => panic!("simulator closed the link"),
            }
        };
        assert_eq!((answer.ack, answer.ret), (ack_for(cmd::GET_CLOCK), Ret::Ok));
        let device_time = codec::decode_clock(&answer.data).expect("clock payload");
        let drift = (sim.clock() - device_time).num_seconds();
        assert!((0..=5).contains(&drift), "clock answer off by {drift}s");
        assert_eq!(sim.stats().corrupted_crcs, 1);
        sim.stop().await;
    }

    // The shipping runtime: links and the test run on different threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_keeps_records_and_flags() {
        let sim = simulator();
        for i in 0..5 {
            sim.add_record(record(i), false);
        }
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        assert_eq!(agent.clear(ClearRequest::NewFlags(2)).await, Some(2));

        sim.restart().await;
        agent.closed().await;

        let mut agent = Agent::connect(addr).await;
        let c = agent.counts().await;
        assert_eq!((c.all_records, c.new_records), (5, 3));
        assert_eq!(
            agent.download(DownloadParam::New, 25).await,
            (Ret::Ok, (2..5).map(record).collect())
        );
        assert_eq!(sim.records(), (0..5).map(record).collect::<Vec<_>>());
        sim.stop().await;
    }

    // The shipping runtime: links and the test run on different threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn realtime_push_reaches_every_open_link() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut a = Agent::connect(addr).await;
        let mut b = Agent::connect(addr).await;
        within("two links", sim.wait_for_links(2)).await;

        sim.add_record(record(1), true);
        for agent in [&mut a, &mut b] {
            let push = agent.next_frame().await;
            assert!(push.is_realtime_push(), "{push:?}");
            assert_eq!(
                (push.ack, push.ret, push.device_id),
                (0xDF, Ret::Ok, DEVICE)
            );
            assert_eq!(Record::from_slice(&push.data), Ok(record(1)));
        }
        assert_eq!(
            sim.new_count(),
            1,
            "a pushed record stays new until cleared"
        );

        // Without push, the next frame on the link is the answer to our own request.
        sim.add_record(record(2), false);
        assert_eq!(a.call(cmd::HEARTBEAT, &[]).await.ret, Ret::Ok);
        assert_eq!(sim.stats().realtime_pushes, 2);
        sim.stop().await;
    }

    // The shipping runtime: links and the test run on different threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_mode_connects_and_reconnects_after_a_drop() {
        let agent_listener = TcpListener::bind(localhost()).await.expect("bind");
        let agent_addr = agent_listener.local_addr().expect("addr");
        let sim = simulator();
        sim.connect_to(agent_addr);

        let (stream, _) = within("the device to connect", agent_listener.accept())
            .await
            .expect("accept");
        let mut agent = Agent::from_stream(stream);
        assert_eq!(agent.counts().await.all_records, 0);
        within("the link to register", sim.wait_for_links(1)).await;
        sim.add_record(record(3), true);
        assert_eq!(
            Record::from_slice(&agent.next_frame().await.data),
            Ok(record(3))
        );

        sim.drop_links();
        agent.closed().await;
        let (stream, _) = within("the device to reconnect", agent_listener.accept())
            .await
            .expect("accept");
        let mut agent = Agent::from_stream(stream);
        assert_eq!(agent.counts().await.new_records, 1);
        assert_eq!(sim.stats().links_opened, 2);

        sim.stop().await;
        agent.closed().await;
    }

    #[tokio::test]
    async fn requests_for_another_device_are_ignored() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        agent.send(DEVICE + 1, cmd::GET_COUNTS, &[]).await;
        agent.send(codec::ANY_DEVICE, cmd::HEARTBEAT, &[]).await;
        let first = agent.next_frame().await;
        assert_eq!(
            first.ack,
            ack_for(cmd::HEARTBEAT),
            "foreign request got an answer"
        );
        assert_eq!(first.device_id, DEVICE);
        assert_eq!(sim.stats().foreign_requests, 1);
        sim.stop().await;
    }

    #[tokio::test]
    async fn invalid_input_is_skipped_and_bad_requests_fail() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;

        let mut bad_crc =
            encode_request(&Request::new(DEVICE, cmd::GET_COUNTS, vec![])).expect("encodes");
        if let Some(last) = bad_crc.last_mut() {
            *last ^= 0x55;
        }
        let mut bytes = vec![0x00, 0x11, 0x22];
        bytes.extend(bad_crc);
        bytes.extend([codec::STX, 0, 0, 0, 7, cmd::SET_SETTINGS, 0x02, 0x00]); // LEN 512
        agent.send_raw(&bytes).await;
        assert_eq!(agent.call(cmd::HEARTBEAT, &[]).await.ret, Ret::Ok);
        let stats = sim.stats();
        assert_eq!(stats.frames_rejected, 2);
        assert!(stats.garbage_bytes >= 3);
        assert_eq!(stats.requests_served, 1);

        let unknown = agent.call(0x55, &[1, 2, 3]).await;
        assert_eq!((unknown.ret, unknown.data.len()), (Ret::Fail, 0));
        assert_eq!(
            agent.call(cmd::DOWNLOAD_RECORDS, &[2, 26]).await.ret,
            Ret::Fail
        );
        assert_eq!(
            agent.call(cmd::DOWNLOAD_RECORDS, &[0, 25]).await.ret,
            Ret::Fail
        );
        assert_eq!(agent.call(cmd::CLEAR_RECORDS, &[2, 0]).await.ret, Ret::Fail);
        assert_eq!(
            agent.call(cmd::SET_CLOCK, &[24, 2, 30, 0, 0, 0]).await.ret,
            Ret::Fail
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn clock_and_settings_over_the_wire() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;

        let t = dt(2030, 6, 1, 12, 0, 0);
        let set = agent
            .call(cmd::SET_CLOCK, &codec::encode_clock(t).expect("in range"))
            .await;
        assert_eq!(set.ret, Ret::Ok);
        let drift = (sim.clock() - t).num_seconds();
        assert!((0..=5).contains(&drift), "device clock off by {drift}s");

        sim.set_clock(dt(2025, 1, 2, 3, 4, 5));
        let got = agent.call(cmd::GET_CLOCK, &[]).await;
        let device_time = codec::decode_clock(&got.data).expect("clock payload");
        let drift = (device_time - dt(2025, 1, 2, 3, 4, 5)).num_seconds();
        assert!((0..=5).contains(&drift), "clock answer off by {drift}s");

        assert_eq!(agent.call(cmd::SET_SETTINGS, &[1, 30]).await.ret, Ret::Ok);
        assert_eq!(agent.call(cmd::GET_SETTINGS, &[]).await.data, vec![1, 30]);
        sim.stop().await;
    }

    #[tokio::test]
    async fn idle_timeout_applies_to_open_links() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        within("the link", sim.wait_for_links(1)).await;
        sim.set_idle_timeout(Some(Duration::from_millis(50)));
        agent.closed().await;
        assert_eq!(sim.stats().idle_drops, 1);
        sim.stop().await;
    }

    #[tokio::test]
    async fn answer_delay_is_applied() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        sim.set_answer_delay(Duration::from_millis(100));
        let started = Instant::now();
        agent.call(cmd::HEARTBEAT, &[]).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        sim.stop().await;
    }

    #[tokio::test]
    async fn stop_closes_links_and_the_listener() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        within("the link", sim.wait_for_links(1)).await;
        sim.stop().await;
        agent.closed().await;
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
        assert_eq!(sim.link_count(), 0);
    }

    #[tokio::test]
    async fn heartbeats_are_request_shaped_and_pongs_are_counted() {
        let sim = simulator();
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        within("the link", sim.wait_for_links(1)).await;
        sim.set_heartbeat(Some(Duration::from_millis(10)));
        let mut decoder = AnyFrameDecoder::new();
        let beat = within("a heartbeat", async {
            loop {
                if let Some(item) = decoder.next_frame() {
                    return item;
                }
                let mut buf = [0u8; 64];
                let n = stream.read(&mut buf).await.expect("read");
                decoder.push(&buf[..n]);
            }
        })
        .await;
        assert_eq!(
            beat,
            Ok(AnyFrame::Request(Request::new(
                DEVICE,
                cmd::HEARTBEAT,
                Vec::new()
            )))
        );
        sim.set_heartbeat(None);
        let pong = codec::encode_response(&codec::pong(DEVICE)).expect("encodes");
        within("write", stream.write_all(&pong))
            .await
            .expect("write");
        let mut agent = Agent::from_stream(stream);
        // The pong did not desynchronise the device: the next request is answered.
        within("the pong", async {
            while sim.stats().pongs_received == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert_eq!(agent.counts().await.all_records, 0);
        assert_eq!(sim.stats().frames_rejected, 0);
        sim.stop().await;
    }

    #[tokio::test]
    async fn a_password_unlocks_the_link() {
        let sim = Simulator::new(SimulatorConfig {
            device_id: DEVICE,
            password: Some("s3cret".into()),
            ..SimulatorConfig::default()
        });
        let addr = sim.listen(localhost()).await.expect("listen");
        let mut agent = Agent::connect(addr).await;
        let cred = |p: &str| ConnectionPassword::new(p).encode().expect("fits");
        assert_eq!(agent.call(cmd::GET_COUNTS, &[]).await.ret, Ret::Fail);
        assert_eq!(
            agent.call(cmd::AUTHENTICATE, &cred("nope")).await.ret,
            Ret::Fail
        );
        assert_eq!(
            agent.call(cmd::AUTHENTICATE, &cred("s3cret")).await.ret,
            Ret::Ok
        );
        assert_eq!(agent.counts().await.all_records, 0);
        let stats = sim.stats();
        assert_eq!(
            (stats.auth_required, stats.auth_failed, stats.auth_ok),
            (1, 1, 1)
        );
        sim.stop().await;
    }
}
