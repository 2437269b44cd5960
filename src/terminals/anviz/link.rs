//! A live TC-B session with one terminal, in either connection mode.
//!
//! Per link:
//! - real-time records (0x5F pushes, ACK 0xDF) are committed to the store at once;
//! - backfill with acknowledgement: read the count of new records (0x3C), download them
//!   ("new only", ≤ 25 per packet), commit them durably, and only then clear exactly that many
//!   new-record flags (0x4E type 2). A crash between download and clear re-downloads them next
//!   time, and content-derived ids make that harmless. A store that refuses them (full) means no
//!   clear: the records stay on the device;
//! - a request every `keepalive` (the count, which also says whether backfill is due);
//! - clock sync: the drift is measured at connect and every `clock_sync_interval`, and the clock
//!   is set when it exceeds `max_clock_drift_secs`;
//! - every request has a timeout; a broken link reconnects with backoff. Each terminal runs in
//!   its own task, so one broken terminal never stalls another;
//! - the terminal starts exchanges too: its heartbeat (a request-shaped 0x7F) is answered with
//!   a pong at once by the reader, between any request and its answer; other commands it
//!   starts are ignored, and neither counts as a rejected frame;
//! - with `password_file` set, the connection password (0x04) goes first; a refusal ends the
//!   link with an error that says so;
//! - every frame's device id (CH) is checked against `device_id` (unless that is 0): a frame
//!   from another device is refused — its records are not stored — counted, logged, and the
//!   link ends with an error naming both ids.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::codec::{
    self, cmd, AnyFrame, AnyFrameDecoder, ClearRequest, ConnectionPassword, Counts, DownloadParam,
    DownloadRequest, FrameError, Record, Request, Response, Ret,
};
use crate::backoff::Backoff;
use crate::config::{AnvizMode, TerminalConfig};
use crate::ingest::Ingest;
use crate::metrics::TerminalHealth;
use crate::model::{local_to_instant, Direction, NewClocking, Source};
use crate::store::StoreError;

/// How long a record cleared by backfill is remembered, so that a late real-time push of it is
/// not taken for a record still flagged on the terminal.
const CLEARED_KEPT: Duration = Duration::from_secs(120);
/// Records downloaded per commit-and-clear round.
const ROUND: usize = 500;
/// Backfill progress is logged this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no answer to command 0x{cmd:02X} within {timeout:?}")]
    Timeout { cmd: u8, timeout: Duration },
    #[error("connection closed")]
    Closed,
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
    #[error("terminal answered command 0x{cmd:02X} with {ret:?}")]
    Refused { cmd: u8, ret: Ret },
    #[error("terminal sent an unreadable payload: {0}")]
    Payload(#[from] codec::PayloadError),
    #[error("store refused the records: {0}")]
    Store(#[from] StoreError),
    #[error(
        "terminal refused the connection password (command 0x04 answered {ret:?}); \
         check terminals[].password_file"
    )]
    PasswordRefused { ret: Ret },
    #[error(
        "a frame came from device id {got}, but this terminal is device_id {expected}; \
         its frames are refused (check terminals[].device_id)"
    )]
    ForeignDevice { expected: u32, got: u32 },
}

/// Frames queued for the socket: requests and pongs, written whole by one task so they never
/// interleave.
const OUTGOING: usize = 64;
/// A refused foreign frame is logged the first time and then every this many.
const FOREIGN_LOG_EVERY: u64 = 100;

pub struct AnvizLink {
    term: TerminalConfig,
    ingest: Ingest,
    health: Arc<TerminalHealth>,
    /// Frames refused for a foreign device id, over the link's life (logged as `foreign_frames`).
    foreign_frames: Arc<AtomicU64>,
}

impl AnvizLink {
    pub fn new(term: TerminalConfig, ingest: Ingest, health: Arc<TerminalHealth>) -> AnvizLink {
        AnvizLink {
            term,
            ingest,
            health,
            foreign_frames: Arc::default(),
        }
    }

    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        match self.term.anviz {
            Some(AnvizMode::Connect(addr)) => self.run_connect(addr, shutdown).await,
            Some(AnvizMode::Listen(addr)) => self.run_listen(addr, shutdown).await,
            None => {}
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
    }

    /// Server mode on the terminal: the agent connects to it.
    async fn run_connect(self, addr: SocketAddr, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.backoff();
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            let connect =
                tokio::time::timeout(self.term.link.request_timeout, TcpStream::connect(addr));
            let result = tokio::select! {
                r = connect => match r {
                    Ok(Ok(stream)) => {
                        backoff.reset();
                        failures = 0;
                        self.session(stream, addr, &mut shutdown).await
                    }
                    Ok(Err(e)) => Err(LinkError::Io(e)),
                    Err(_) => Err(LinkError::Timeout { cmd: 0, timeout: self.term.link.request_timeout }),
                },
                _ = shutdown.changed() => break,
            };
            if let Err(e) = result {
                failures += 1;
                self.note_failure(&e, addr, failures);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Client mode on the terminal: it connects to the agent. A new connection replaces an old
    /// one (the terminal reconnected while the agent still held a half-dead link).
    async fn run_listen(self, addr: SocketAddr, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.backoff();
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::error!(terminal = %self.term.id, %addr, error = %e, "cannot listen for the terminal; retrying");
                    self.health
                        .set_error(Some(format!("cannot listen on {addr}: {e}")));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        tracing::info!(terminal = %self.term.id, %addr, "waiting for the terminal to connect");
        let mut pending: Option<(TcpStream, SocketAddr)> = None;
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            let (stream, peer) = match pending.take() {
                Some(p) => p,
                None => tokio::select! {
                    r = listener.accept() => match r {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(terminal = %self.term.id, error = %e, "accept failed");
                            continue;
                        }
                    },
                    _ = shutdown.changed() => break,
                },
            };
            let mut session_shutdown = shutdown.clone();
            let session = self.session(stream, peer, &mut session_shutdown);
            tokio::pin!(session);
            let result = loop {
                tokio::select! {
                    r = &mut session => break r,
                    r = listener.accept() => {
                        if let Ok(p) = r {
                            tracing::info!(terminal = %self.term.id, peer = %p.1, "terminal reconnected; replacing the old link");
                            pending = Some(p);
                            break Ok(());
                        }
                    }
                }
            };
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    self.note_failure(&e, peer, failures);
                }
            }
        }
    }

    fn note_failure(&self, e: &LinkError, peer: SocketAddr, failures: u32) {
        self.health.set_error(Some(e.to_string()));
        // The first failure and then every 30th: a terminal that is switched off must not
        // flood the journal.
        if failures == 1 || failures.is_multiple_of(30) {
            tracing::warn!(terminal = %self.term.id, %peer, error = %e, failures, "terminal link down; records stay on the terminal");
        } else {
            tracing::debug!(terminal = %self.term.id, %peer, error = %e, failures, "terminal link attempt failed");
        }
    }

    async fn session(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let (resp_tx, responses) = mpsc::channel(64);
        let (push_tx, pushes) = mpsc::channel(1024);
        let (out_tx, out_rx) = mpsc::channel(OUTGOING);
        let writer_task = tokio::spawn(write_frames(writer, out_rx));
        let reader_task = tokio::spawn(read_frames(
            reader,
            Reader {
                terminal: self.term.id.clone(),
                device_id: self.term.device_id,
                answers: resp_tx,
                pushes: push_tx,
                out: out_tx.clone(),
                health: self.health.clone(),
                foreign_frames: self.foreign_frames.clone(),
            },
        ));
        let mut conn = Conn {
            out: out_tx,
            answers: responses,
            device_id: self.term.device_id,
            timeout: self.term.link.request_timeout,
        };
        self.health.connected.store(true, Ordering::Relaxed);
        self.health.connects.fetch_add(1, Ordering::Relaxed);
        self.health.set_error(None);
        tracing::info!(terminal = %self.term.id, %peer, "terminal link up");
        let result = self.serve(&mut conn, pushes, shutdown).await;
        self.health.connected.store(false, Ordering::Relaxed);
        reader_task.abort();
        writer_task.abort();
        result
    }

    async fn serve(
        &self,
        conn: &mut Conn,
        mut pushes: mpsc::Receiver<Record>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let timing = self.term.link;
        if let Some(password) = &self.term.password {
            let data = ConnectionPassword::new(password.expose()).encode()?;
            let resp = conn.request(cmd::AUTHENTICATE, data.to_vec()).await?;
            if resp.ret != Ret::Ok {
                return Err(LinkError::PasswordRefused { ret: resp.ret });
            }
        }
        self.sync_clock(conn).await?;
        let mut backfill_due = true;
        // Real-time records committed since the last clear; they still carry their new-flag.
        let mut unacked_pushes = 0usize;
        // Records a backfill downloaded and cleared, with when: a real-time push of one of them
        // may still arrive (queued, or sent by the terminal after the download answer) and must
        // not count as unacknowledged, or a later clear-by-count would clear a record nobody
        // stored. Kept for CLEARED_KEPT.
        let mut cleared: HashMap<Record, Instant> = HashMap::new();
        let mut keepalive = tokio::time::interval(timing.keepalive);
        let mut backfill_tick = tokio::time::interval(timing.backfill_interval);
        let mut clock_tick = tokio::time::interval(timing.clock_sync_interval);
        for t in [&mut keepalive, &mut backfill_tick, &mut clock_tick] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t.reset();
        }
        loop {
            if backfill_due {
                backfill_due = false;
                match self
                    .acknowledge(conn, &mut unacked_pushes, &mut cleared)
                    .await
                {
                    Ok(_) => {}
                    // The store refused: leave the records on the device, retry later.
                    Err(LinkError::Store(e)) => {
                        tracing::warn!(terminal = %self.term.id, error = %e, "backfill paused: the store refused the records; they stay on the terminal");
                        self.health.set_error(Some(e.to_string()));
                    }
                    Err(e) => return Err(e),
                }
            }
            tokio::select! {
                first = pushes.recv() => {
                    let Some(first) = first else { return Err(LinkError::Closed) };
                    let mut records = vec![first];
                    while let Ok(r) = pushes.try_recv() {
                        records.push(r);
                    }
                    let n = records.len() as u64;
                    let still_flagged = records
                        .iter()
                        .filter(|r| cleared.remove(*r).is_none())
                        .count();
                    match self.commit(records).await {
                        Ok(()) => {
                            self.health.realtime_records.fetch_add(n, Ordering::Relaxed);
                            unacked_pushes += still_flagged;
                        }
                        Err(e) => {
                            tracing::warn!(terminal = %self.term.id, error = %e, "real-time records not stored; they stay on the terminal for backfill");
                        }
                    }
                    // Pushed records keep their new-flag on the device: clear them by backfill.
                    backfill_due = true;
                }
                _ = keepalive.tick() => {
                    let counts = self.counts(conn).await?;
                    backfill_due = counts.new_records > 0;
                }
                _ = backfill_tick.tick() => backfill_due = true,
                _ = clock_tick.tick() => self.sync_clock(conn).await?,
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    async fn counts(&self, conn: &mut Conn) -> Result<Counts, LinkError> {
        let resp = conn.ok(cmd::GET_COUNTS, Vec::new()).await?;
        let counts = Counts::decode(&resp.data)?;
        self.health
            .device_backlog
            .store(u64::from(counts.new_records), Ordering::Relaxed);
        Ok(counts)
    }

    /// Bring the device's new-flags to zero. When the only new records are the real-time ones
    /// already committed, they are exactly the N oldest new records, so clearing N acknowledges
    /// them without downloading them again. Anything else (records made while the link was down,
    /// a push lost to a bad frame) takes the full download-commit-clear path.
    async fn acknowledge(
        &self,
        conn: &mut Conn,
        unacked_pushes: &mut usize,
        cleared: &mut HashMap<Record, Instant>,
    ) -> Result<usize, LinkError> {
        cleared.retain(|_, at| at.elapsed() < CLEARED_KEPT);
        if *unacked_pushes > 0 {
            let counts = self.counts(conn).await?;
            if counts.new_records as usize == *unacked_pushes {
                let n = *unacked_pushes;
                conn.ok(
                    cmd::CLEAR_RECORDS,
                    ClearRequest::NewFlags(n as u32).encode()?.to_vec(),
                )
                .await?;
                *unacked_pushes = 0;
                self.health.device_backlog.store(0, Ordering::Relaxed);
                return Ok(n);
            }
        }
        let n = self.backfill(conn, cleared).await?;
        *unacked_pushes = 0;
        Ok(n)
    }

    /// Download, commit, then acknowledge, round after round until the device has nothing new.
    /// Every record cleared goes into `cleared`.
    async fn backfill(
        &self,
        conn: &mut Conn,
        cleared: &mut HashMap<Record, Instant>,
    ) -> Result<usize, LinkError> {
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut total = 0usize;
        let mut announced = None;
        loop {
            let counts = self.counts(conn).await?;
            let waiting = counts.new_records as usize;
            if waiting == 0 {
                break;
            }
            if announced.is_none() && waiting > ROUND {
                announced = Some(waiting);
                tracing::info!(terminal = %self.term.id, records = waiting, "backfill started");
            }
            let records = self.download_new(conn, waiting.min(ROUND)).await?;
            if records.is_empty() {
                // The count said "new" but the download gave nothing: do not spin.
                tracing::warn!(terminal = %self.term.id, reported = waiting, "terminal reports new records but returns none");
                break;
            }
            let n = records.len();
            self.commit(records.clone()).await?;
            // Only now, with the records durable, may the terminal forget them.
            let answer = conn
                .ok(
                    cmd::CLEAR_RECORDS,
                    ClearRequest::NewFlags(n as u32).encode()?.to_vec(),
                )
                .await?;
            let now = Instant::now();
            cleared.extend(records.into_iter().map(|r| (r, now)));
            if let Ok(Some(c)) = codec::decode_clear_answer(&answer.data) {
                if c as usize != n {
                    tracing::warn!(terminal = %self.term.id, asked = n, cleared = c, "terminal cleared a different number of flags");
                }
            }
            self.health
                .backfilled_records
                .fetch_add(n as u64, Ordering::Relaxed);
            total += n;
            if let Some(all) = announced {
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    let rate = total as f64 / started.elapsed().as_secs_f64().max(0.001);
                    let left = waiting.saturating_sub(n);
                    tracing::info!(
                        terminal = %self.term.id,
                        done = total,
                        of = all,
                        rate_per_s = rate.round() as u64,
                        eta_s = (left as f64 / rate.max(1.0)).round() as u64,
                        "backfill progress"
                    );
                }
            }
        }
        if announced.is_some() || total > 0 {
            tracing::info!(
                terminal = %self.term.id,
                records = total,
                secs = started.elapsed().as_secs_f64(),
                "backfill done"
            );
        }
        Ok(total)
    }

    async fn download_new(&self, conn: &mut Conn, want: usize) -> Result<Vec<Record>, LinkError> {
        let mut records = Vec::with_capacity(want);
        let mut param = DownloadParam::New;
        while records.len() < want {
            let count = (want - records.len()).min(codec::MAX_RECORDS_PER_DOWNLOAD) as u8;
            let req = DownloadRequest { param, count }.encode()?;
            let resp = conn.request(cmd::DOWNLOAD_RECORDS, req.to_vec()).await?;
            match resp.ret {
                Ret::Ok => {}
                Ret::Empty => break,
                ret => {
                    return Err(LinkError::Refused {
                        cmd: cmd::DOWNLOAD_RECORDS,
                        ret,
                    })
                }
            }
            let batch = codec::decode_download_answer(&resp.data)?;
            if batch.is_empty() {
                break;
            }
            let short = batch.len() < count as usize;
            records.extend(batch);
            if short {
                break;
            }
            param = DownloadParam::Next;
        }
        Ok(records)
    }

    /// Store records durably as clockings of this terminal.
    async fn commit(&self, records: Vec<Record>) -> Result<(), LinkError> {
        if let Some(newest) = records.iter().map(|r| r.local_time).max() {
            let at = local_to_instant(newest, self.term.timezone);
            self.health
                .last_record_ms
                .fetch_max(at.timestamp_millis(), Ordering::Relaxed);
        }
        let batch = records
            .into_iter()
            .map(|r| record_to_clocking(&self.term, &r))
            .collect();
        self.ingest.submit(batch).await?;
        Ok(())
    }

    async fn sync_clock(&self, conn: &mut Conn) -> Result<(), LinkError> {
        let resp = conn.ok(cmd::GET_CLOCK, Vec::new()).await?;
        let device = codec::decode_clock(&resp.data)?;
        let now = Utc::now().with_timezone(&self.term.timezone).naive_local();
        let drift = (device - now).num_seconds();
        self.health.clock_drift_secs.store(drift, Ordering::Relaxed);
        if drift.unsigned_abs() > u64::from(self.term.link.max_clock_drift_secs) {
            let now = Utc::now().with_timezone(&self.term.timezone).naive_local();
            conn.ok(cmd::SET_CLOCK, codec::encode_clock(now)?.to_vec())
                .await?;
            self.health.clock_sets.fetch_add(1, Ordering::Relaxed);
            self.health.clock_drift_secs.store(0, Ordering::Relaxed);
            tracing::info!(terminal = %self.term.id, drift_secs = drift, "terminal clock was off; set it");
        }
        Ok(())
    }
}

/// A record as a clocking of `term`: its wall clock read in the terminal's zone, its direction
/// from the attendance state unless the terminal fixes it. The terminal id scopes the record, so
/// the same user code on two terminals gives two clockings.
pub fn record_to_clocking(term: &TerminalConfig, r: &Record) -> NewClocking {
    let direction = term.direction.unwrap_or(match r.attendance_state() {
        0 => Direction::In,
        1 => Direction::Out,
        _ => Direction::Unknown,
    });
    NewClocking {
        terminal: term.id.clone(),
        badge: r.user_code.to_string(),
        occurred_at: local_to_instant(r.local_time, term.timezone),
        direction,
        status: None,
        person: None,
        source: Source::Anviz,
    }
}

struct Conn {
    out: mpsc::Sender<Vec<u8>>,
    answers: mpsc::Receiver<Inbound>,
    device_id: u32,
    timeout: Duration,
}

/// What the reader hands to the request in flight.
enum Inbound {
    Answer(Response),
    /// A frame from another device id arrived: the link talks to the wrong terminal.
    Foreign {
        device_id: u32,
    },
}

impl Conn {
    async fn request(&mut self, command: u8, data: Vec<u8>) -> Result<Response, LinkError> {
        let frame = codec::encode_request(&Request {
            device_id: self.device_id,
            cmd: command,
            data,
        })
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        tokio::time::timeout_at(deadline, self.out.send(frame))
            .await
            .map_err(|_| LinkError::Timeout {
                cmd: command,
                timeout: self.timeout,
            })?
            .map_err(|_| LinkError::Closed)?;
        let want = codec::ack_for(command);
        loop {
            match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Ok(Some(Inbound::Answer(resp))) if resp.ack == want => return Ok(resp),
                // A late answer to an earlier request: skip it.
                Ok(Some(Inbound::Answer(resp))) => {
                    tracing::debug!(ack = resp.ack, want, "skipping an unexpected answer");
                }
                Ok(Some(Inbound::Foreign { device_id })) => {
                    return Err(LinkError::ForeignDevice {
                        expected: self.device_id,
                        got: device_id,
                    })
                }
                Ok(None) => return Err(LinkError::Closed),
                Err(_) => {
                    return Err(LinkError::Timeout {
                        cmd: command,
                        timeout: self.timeout,
                    })
                }
            }
        }
    }

    /// A request whose answer must be RET ok.
    async fn ok(&mut self, command: u8, data: Vec<u8>) -> Result<Response, LinkError> {
        let resp = self.request(command, data).await?;
        if resp.ret != Ret::Ok {
            return Err(LinkError::Refused {
                cmd: command,
                ret: resp.ret,
            });
        }
        Ok(resp)
    }
}

/// One socket writer: requests from [`Conn`] and pongs from the reader.
async fn write_frames(mut writer: OwnedWriteHalf, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = writer.write_all(&frame).await {
            // The reader sees the socket end too and closes the session.
            tracing::debug!(error = %e, "writing to the terminal failed");
            return;
        }
    }
}

/// Where the reader sends what it decodes.
struct Reader {
    terminal: String,
    device_id: u32,
    answers: mpsc::Sender<Inbound>,
    pushes: mpsc::Sender<Record>,
    out: mpsc::Sender<Vec<u8>>,
    health: Arc<TerminalHealth>,
    foreign_frames: Arc<AtomicU64>,
}

impl Reader {
    /// Device id 0 in the configuration accepts whichever terminal is on the link.
    fn is_foreign(&self, device_id: u32) -> bool {
        self.device_id != codec::ANY_DEVICE && device_id != self.device_id
    }

    /// Refuse a frame from another device: counted, logged, reported, never stored. `false`
    /// when the session is gone.
    fn refuse_foreign(&self, frame: &AnyFrame) -> bool {
        let got = frame.device_id();
        let n = self.foreign_frames.fetch_add(1, Ordering::Relaxed) + 1;
        let err = LinkError::ForeignDevice {
            expected: self.device_id,
            got,
        };
        if n == 1 || n.is_multiple_of(FOREIGN_LOG_EVERY) {
            tracing::warn!(terminal = %self.terminal, device_id = got, expected = self.device_id, foreign_frames = n, "refused a frame from another device id; its records are not stored");
        }
        self.health.set_error(Some(err.to_string()));
        // One notice is enough for the request in flight; a full queue already holds one.
        !matches!(
            self.answers.try_send(Inbound::Foreign { device_id: got }),
            Err(mpsc::error::TrySendError::Closed(_))
        )
    }

    /// A command the terminal started. `false` when the session is gone.
    fn device_request(&self, req: &Request) -> bool {
        if req.cmd != cmd::HEARTBEAT {
            tracing::debug!(terminal = %self.terminal, cmd = req.cmd, "ignoring a command the terminal started");
            return true;
        }
        let Ok(frame) = codec::encode_response(&codec::pong(req.device_id)) else {
            return true;
        };
        match self.out.try_send(frame) {
            Ok(()) => true,
            // The queue holds OUTGOING frames; a terminal that outruns it gets its next pong.
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(terminal = %self.terminal, "heartbeat not answered: the link's send queue is full");
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Decode the byte stream; answer heartbeats; real-time pushes and answers go to their own
/// channels; rejected frames are counted and skipped (the decoder resynchronises on the next
/// STX).
async fn read_frames(mut reader: OwnedReadHalf, to: Reader) {
    let mut decoder = AnyFrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        while let Some(frame) = decoder.next_frame() {
            let alive = match frame {
                Ok(f) if to.is_foreign(f.device_id()) => to.refuse_foreign(&f),
                Ok(AnyFrame::Request(req)) => to.device_request(&req),
                Ok(AnyFrame::Response(resp)) if resp.is_realtime_push() => {
                    match Record::from_slice(&resp.data) {
                        Ok(r) => to.pushes.send(r).await.is_ok(),
                        Err(e) => {
                            to.health.frames_rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "unreadable real-time record");
                            true
                        }
                    }
                }
                Ok(AnyFrame::Response(resp)) => {
                    to.answers.send(Inbound::Answer(resp)).await.is_ok()
                }
                Err(FrameError::Garbage { skipped }) => {
                    to.health
                        .garbage_bytes
                        .fetch_add(skipped as u64, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    to.health.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "rejected a frame from the terminal");
                    true
                }
            };
            if !alive {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LinkTiming;
    use chrono::NaiveDate;

    fn term(direction: Option<Direction>) -> TerminalConfig {
        TerminalConfig {
            id: "gate".into(),
            kind: crate::config::TerminalKind::Anviz,
            anviz: None,
            device_id: 1,
            timezone: chrono_tz::Europe::Brussels,
            zone_from: None,
            zone_to: None,
            direction,
            link: LinkTiming::default(),
            crosschex_serial: None,
            aktion_c4: None,
            password: None,
            protime_person_ref: None,
        }
    }

    fn record(state: u8, time: &str) -> Record {
        Record {
            user_code: 4711,
            local_time: NaiveDate::from_ymd_opt(2026, 10, 25)
                .unwrap()
                .and_time(time.parse().unwrap()),
            backup_code: 8,
            record_type: 0x80 | state,
            work_code: 0,
        }
    }

    #[test]
    fn direction_from_attendance_state_unless_fixed() {
        let t = term(None);
        assert_eq!(
            record_to_clocking(&t, &record(0, "08:00:00")).direction,
            Direction::In
        );
        assert_eq!(
            record_to_clocking(&t, &record(1, "08:00:00")).direction,
            Direction::Out
        );
        assert_eq!(
            record_to_clocking(&t, &record(2, "08:00:00")).direction,
            Direction::Unknown
        );
        let fixed = term(Some(Direction::Out));
        assert_eq!(
            record_to_clocking(&fixed, &record(0, "08:00:00")).direction,
            Direction::Out
        );
    }

    #[test]
    fn wall_clock_is_read_in_the_terminal_zone_across_dst() {
        let t = term(None);
        // 25 Oct 2026: Brussels leaves summer time at 03:00 (+02:00 → +01:00).
        let before = record_to_clocking(&t, &record(0, "01:30:00"));
        assert_eq!(before.occurred_at.to_rfc3339(), "2026-10-25T01:30:00+02:00");
        let overlap = record_to_clocking(&t, &record(0, "02:30:00"));
        assert_eq!(
            overlap.occurred_at.to_rfc3339(),
            "2026-10-25T02:30:00+02:00"
        );
        let after = record_to_clocking(&t, &record(0, "03:30:00"));
        assert_eq!(after.occurred_at.to_rfc3339(), "2026-10-25T03:30:00+01:00");
        assert_eq!(before.badge, "4711");
        assert_eq!(before.source, Source::Anviz);
    }
}
