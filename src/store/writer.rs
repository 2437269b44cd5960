//! The single writer: group commit.
//!
//! Every write to the store (new clockings, sink confirmations, state values) is sent to one OS
//! thread. It takes everything that queued up while the previous transaction was committing and
//! writes it in ONE transaction, so N concurrent ingests cost one fsync, not N.
//!
//! Durability: every transaction anybody waits for (ingest, changes, confirmations with a reply)
//! is committed with `Durability::Immediate` (fsync'd) before anyone hears of it: "accepted"
//! means on disk. Group commit keeps the fsync count at one per batch, however many requests
//! the batch holds.
//!
//! The one exception is a batch of nothing but fire-and-forget confirmations (the MQTT sink's
//! PUBACKs): it is committed without an fsync, and made durable by the next durable commit, at
//! the latest [`UNDURABLE_MAX_AGE`] or [`UNDURABLE_MAX_CONFIRMS`] confirmations later. Readers
//! see it at once. A crash or power loss can only undo such confirmations, never a clocking:
//! those clockings are sent again (at-least-once; subscribers deduplicate on `id`). Draining a
//! backlog at 100,000 PUBACKs/s otherwise costs hundreds of fsyncs a second, which is most of
//! the writer's time on a gateway.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;
use redb::{Durability, ReadableTable};
use tokio::sync::{oneshot, watch};

use super::tables::{self, TableWrite};
use super::{
    file_len, SinkId, Store, StoreError, IDS, ID_EXPIRY, META, META_NEXT_SEQ, OUTBOX, STATE,
};
use crate::model::{AccessStatus, Clocking, ClockingId, PresenceTransition};

/// Housekeeping (forgetting expired ids) runs when the writer has been idle this long.
const IDLE: Duration = Duration::from_millis(500);
/// Confirmations committed without an fsync are made durable at the latest this much later...
pub const UNDURABLE_MAX_AGE: Duration = Duration::from_millis(100);
/// ...or once this many of them are waiting, whichever comes first: what a crash can re-deliver
/// beyond the publishes in flight.
pub const UNDURABLE_MAX_CONFIRMS: usize = 4096;
/// Files smaller than this are not worth compacting.
const COMPACT_MIN_BYTES: u64 = 32 * 1024 * 1024;
/// How often an idle writer considers compacting the file.
const COMPACT_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Upper bound on clockings in one transaction, to keep commit latency bounded.
const MAX_BATCH_CLOCKINGS: usize = 20_000;
/// Local decisions are kept this long for comparing with what a cloud mirror reports.
const DECISIONS_KEPT_DAYS: i64 = 7;

/// The result of storing one clocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestOutcome {
    pub id: ClockingId,
    /// False when the id was already stored or remembered: nothing new was written.
    pub stored: bool,
    /// The status it was stored with (None for a duplicate: nothing was decided).
    pub status: Option<AccessStatus>,
}

/// What the writer asks of the access engine. The writer serializes everything, so the engine
/// decides each clocking in arrival order, seeing every earlier decision, and its rows go into
/// the same transaction as the clocking: a crash never leaves presence and clockings disagreeing.
pub trait AccessHook: Send + 'static {
    /// A clocking about to be stored (never a duplicate), in arrival order. With `decide` the
    /// engine gives it its status; it may fill in the person. Rows to write go to `out` (rows of
    /// earlier clockings of this batch are still there, the rest are in the tables `reads` sees).
    fn clocking(
        &mut self,
        c: &mut Clocking,
        decide: bool,
        reads: &dyn AccessReads,
        out: &mut Vec<TableWrite>,
    );
    /// Presence transitions of the other gateways of the site; answers how many were newer.
    fn remote(&mut self, transitions: &[PresenceTransition], out: &mut Vec<TableWrite>) -> u64;
    /// The batch was committed (true), or nothing of it was written (false): undo.
    fn finished(&mut self, committed: bool);
}

/// What the access engine may read inside the writer's transaction.
pub trait AccessReads {
    /// The local decisions recorded at `terminal` in the unix minute `minute`: (badge, value).
    fn decisions_at(&self, terminal: &str, minute: i64) -> Vec<(String, Vec<u8>)>;
}

struct TxnReads<'a>(&'a redb::WriteTransaction);

impl AccessReads for TxnReads<'_> {
    fn decisions_at(&self, terminal: &str, minute: i64) -> Vec<(String, Vec<u8>)> {
        tables::decisions_at(self.0, terminal, minute).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading local decisions failed");
            Vec::new()
        })
    }
}

pub(crate) enum Op {
    Ingest {
        clockings: Vec<Clocking>,
        /// Per clocking: the access engine decides its status (else it is the given one).
        decide: Vec<bool>,
        state: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Result<Vec<IngestOutcome>, StoreError>>,
    },
    Confirm {
        sink: SinkId,
        seqs: Vec<u64>,
        reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    },
    Change {
        change: Change,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

/// Small changes that go through the writer like everything else.
#[derive(Debug, Clone)]
pub enum Change {
    /// Nothing: answered once everything queued before it is committed.
    Barrier,
    /// Store a state value (watermark, token, …).
    PutState { key: String, value: Vec<u8> },
    /// The sink cannot ever deliver this clocking (the destination rejected it): set it aside
    /// with the reason instead of blocking the queue. It stays in the store until replayed.
    DeadLetter {
        sink: SinkId,
        seq: u64,
        reason: String,
    },
    /// Put every dead letter of the sink back in its queue (after the config was fixed).
    /// Answers how many.
    Replay { sink: SinkId },
    /// Rows of the state tables (people, shifts, acknowledged transitions).
    Tables(Vec<TableWrite>),
    /// Presence transitions of the other gateways, handed to the [`AccessHook`] (which applies
    /// the newer ones); answers how many were.
    RemotePresence(Vec<PresenceTransition>),
    /// These badges (badge, person) gained a person: the UnknownBadge clockings held for them
    /// are queued again for `sink` with it. Answers how many.
    RequeueHeld {
        sink: SinkId,
        badges: Vec<(String, String)>,
    },
}

/// A clocking set aside by a sink.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DeadLetter {
    pub reason: String,
    pub at_ms: i64,
}

/// The sending side, cloned into every producer and sink.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Op>,
    committed: watch::Receiver<u64>,
    last_error: Arc<Mutex<Option<String>>>,
    unsynced: Arc<std::sync::atomic::AtomicU64>,
}

impl WriterHandle {
    /// Confirmations committed but not yet fsync'd (see the module docs): what a power loss
    /// right now could send again.
    pub fn unsynced_confirmations(&self) -> u64 {
        self.unsynced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Store clockings durably (and optional state values in the same transaction). Returns after
    /// the fsync'd commit, with one outcome per clocking in the same order.
    pub async fn ingest(
        &self,
        clockings: Vec<Clocking>,
        state: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        self.ingest_deciding(clockings, Vec::new(), state).await
    }

    /// [`ingest`](Self::ingest), where the access engine decides the status of each clocking
    /// whose `decide` flag is set (in the writer, in arrival order).
    pub async fn ingest_deciding(
        &self,
        clockings: Vec<Clocking>,
        decide: Vec<bool>,
        state: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Ingest {
                clockings,
                decide,
                state,
                reply,
            })
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Record that `sink` confirmed these clockings; fire and forget.
    pub fn confirm(&self, sink: SinkId, seqs: Vec<u64>) -> Result<(), StoreError> {
        self.tx
            .send(Op::Confirm {
                sink,
                seqs,
                reply: None,
            })
            .map_err(|_| StoreError::Stopped)
    }

    /// Record confirmations and wait until they are committed.
    pub async fn confirm_and_wait(&self, sink: SinkId, seqs: Vec<u64>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Confirm {
                sink,
                seqs,
                reply: Some(reply),
            })
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Wait until everything sent to the writer so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.change(Change::Barrier).await.map(|_| ())
    }

    /// Apply a change durably; answers a count where the change has one (replay), else 0.
    pub async fn change(&self, change: Change) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Change { change, reply })
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Why the last commit failed, or None when it succeeded: the store is writable.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// The shared slot behind [`WriterHandle::last_error`], without the sending side.
    pub fn last_error_slot(&self) -> Arc<Mutex<Option<String>>> {
        self.last_error.clone()
    }

    /// Highest seq committed so far; changes whenever new clockings are stored.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Owns the writer thread. Dropping every [`WriterHandle`] and calling [`Writer::join`] finishes
/// the queued work and makes it durable.
pub struct Writer {
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(
        store: Arc<Store>,
        dedupe_days: u32,
        max_bytes: Option<u64>,
    ) -> (Writer, WriterHandle) {
        Writer::start_with_access(store, dedupe_days, max_bytes, None)
    }

    /// A writer that has the access engine decide and record presence with every commit.
    pub fn start_with_access(
        store: Arc<Store>,
        dedupe_days: u32,
        max_bytes: Option<u64>,
        access: Option<Box<dyn AccessHook>>,
    ) -> (Writer, WriterHandle) {
        let (tx, rx) = mpsc::channel();
        let next = read_next_seq(&store).unwrap_or(0);
        let (committed_tx, committed) = watch::channel(next.saturating_sub(1));
        let last_error = Arc::new(Mutex::new(None));
        let unsynced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut state = WriterState {
            last_error: last_error.clone(),
            unsynced: unsynced.clone(),
            store,
            next_seq: next,
            dedupe_secs: u64::from(dedupe_days) * 86_400,
            max_bytes,
            cached_used: None,
            committed: committed_tx,
            last_prune: Instant::now(),
            last_compact_check: Instant::now(),
            reopen_pending: false,
            undurable: None,
            last_op: Instant::now(),
            access,
        };
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || state.run(rx))
            .ok();
        (
            Writer { thread },
            WriterHandle {
                tx,
                committed,
                last_error,
                unsynced,
            },
        )
    }

    /// Wait for the writer to finish everything queued (all handles must be dropped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_next_seq(store: &Store) -> Result<u64, StoreError> {
    let db = store.db()?;
    let txn = db.begin_read().map_err(StoreError::from_redb)?;
    let meta = txn.open_table(META).map_err(StoreError::from_redb)?;
    Ok(meta
        .get(META_NEXT_SEQ)
        .map_err(StoreError::from_redb)?
        .map_or(1, |v| v.value()))
}

struct WriterState {
    store: Arc<Store>,
    last_error: Arc<Mutex<Option<String>>>,
    next_seq: u64,
    dedupe_secs: u64,
    max_bytes: Option<u64>,
    /// (bytes in use, when measured): measuring walks the database, so it is cached briefly.
    cached_used: Option<(u64, Instant)>,
    committed: watch::Sender<u64>,
    last_prune: Instant,
    last_compact_check: Instant,
    access: Option<Box<dyn AccessHook>>,
    /// A commit failed with an I/O error that left the database refusing all work: reopen it
    /// before the next write and on every idle tick until that succeeds.
    reopen_pending: bool,
    /// Confirmations committed without an fsync: since when, and how many.
    undurable: Option<(Instant, usize)>,
    /// How many of them, for the health endpoint.
    unsynced: Arc<std::sync::atomic::AtomicU64>,
    /// When the last operation arrived (housekeeping waits for [`IDLE`] without one).
    last_op: Instant,
}

impl WriterState {
    fn run(&mut self, rx: mpsc::Receiver<Op>) {
        loop {
            let wait = match self.undurable {
                Some((since, _)) => UNDURABLE_MAX_AGE.saturating_sub(since.elapsed()),
                None => IDLE.saturating_sub(self.last_op.elapsed()),
            };
            let first = match rx.recv_timeout(wait) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    if self.undurable.is_some() {
                        self.make_durable();
                    } else if self.last_op.elapsed() >= IDLE {
                        self.idle();
                        self.last_op = Instant::now();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.make_durable();
                    break;
                }
            };
            self.last_op = Instant::now();
            let mut ops = vec![first];
            let mut clockings = op_clockings(&ops[0]);
            while clockings < MAX_BATCH_CLOCKINGS {
                match rx.try_recv() {
                    Ok(op) => {
                        clockings += op_clockings(&op);
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(ops);
        }
    }

    /// Make confirmations committed without an fsync durable (an empty durable commit carries
    /// every earlier commit to disk). On failure they stay pending and this is retried.
    fn make_durable(&mut self) {
        if self.undurable.is_none() {
            return;
        }
        let result = self.store.db().and_then(|db| {
            let txn = db.begin_write()?;
            txn.commit().map_err(StoreError::from_redb)
        });
        match result {
            Ok(()) => {
                self.undurable = None;
                self.unsynced.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "making confirmations durable failed; will retry");
                // Retry after another full interval, not in a tight loop.
                if let Some((since, _)) = self.undurable.as_mut() {
                    *since = Instant::now();
                }
            }
        }
    }

    /// Whether this batch must be fsync'd: anything but fire-and-forget confirmations is, and so
    /// are those once enough of them, or old enough ones, are waiting.
    fn batch_durability(&self, ops: &[Op]) -> (Durability, usize) {
        let mut confirms = 0;
        for op in ops {
            match op {
                Op::Confirm {
                    seqs, reply: None, ..
                } => confirms += seqs.len(),
                _ => return (Durability::Immediate, confirms),
            }
        }
        let (age, waiting) = self
            .undurable
            .map_or((Duration::ZERO, 0), |(since, n)| (since.elapsed(), n));
        if waiting + confirms >= UNDURABLE_MAX_CONFIRMS || age >= UNDURABLE_MAX_AGE {
            (Durability::Immediate, confirms)
        } else {
            (Durability::None, confirms)
        }
    }

    fn idle(&mut self) {
        if self.reopen_pending {
            self.reopen();
        }
        if self.last_compact_check.elapsed() > COMPACT_CHECK_EVERY {
            self.last_compact_check = Instant::now();
            match self.store.compact_if_worthwhile(COMPACT_MIN_BYTES) {
                Ok(Some((before, after))) => {
                    tracing::info!(
                        before_bytes = before,
                        after_bytes = after,
                        "store compacted after the backlog drained"
                    )
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "store compaction failed; will retry"),
            }
        }
        if self.last_prune.elapsed() > Duration::from_secs(3600) {
            self.last_prune = Instant::now();
            if let Err(e) = self.prune_ids() {
                tracing::warn!(error = %e, "pruning remembered ids failed; will retry");
            }
        }
    }

    /// Reopen the database if it refuses all work since an I/O error (e.g. a full disk).
    fn reopen(&mut self) {
        if !self.store.needs_reopen() {
            self.reopen_pending = false;
            return;
        }
        match self.store.reopen() {
            Ok(()) => self.reopen_pending = false,
            Err(e) => tracing::warn!(error = %e, "reopening the store failed; will retry"),
        }
    }

    fn commit_batch(&mut self, ops: Vec<Op>) {
        let seq_before = self.next_seq;
        let mut ops = ops;
        if self.reopen_pending {
            self.reopen();
        }
        let result = self.write(&mut ops);
        if result.is_err() && self.store.needs_reopen() {
            self.reopen_pending = true;
            self.reopen();
        }
        if let Some(hook) = self.access.as_mut() {
            hook.finished(result.is_ok());
        }
        if let Ok(mut g) = self.last_error.lock() {
            *g = result.as_ref().err().map(|e| e.to_string());
        }
        match result {
            Ok((outcomes, counts)) => {
                let mut outcomes = outcomes.into_iter();
                let mut counts = counts.into_iter();
                for op in ops {
                    match op {
                        Op::Ingest { reply, .. } => {
                            let _ = reply.send(Ok(outcomes.next().unwrap_or_default()));
                        }
                        Op::Confirm { reply, .. } => {
                            if let Some(r) = reply {
                                let _ = r.send(Ok(()));
                            }
                        }
                        Op::Change { reply, .. } => {
                            let _ = reply.send(Ok(counts.next().unwrap_or(0)));
                        }
                    }
                }
                if self.next_seq != seq_before {
                    self.committed.send_replace(self.next_seq - 1);
                }
            }
            Err(e) => {
                // Nothing of this transaction was written: every requester hears why.
                self.next_seq = seq_before;
                tracing::error!(error = %e, "store commit failed");
                for op in ops {
                    match op {
                        Op::Ingest { reply, .. } => {
                            let _ = reply.send(Err(clone_err(&e)));
                        }
                        Op::Confirm { reply, .. } => {
                            if let Some(r) = reply {
                                let _ = r.send(Err(clone_err(&e)));
                            }
                        }
                        Op::Change { reply, .. } => {
                            let _ = reply.send(Err(clone_err(&e)));
                        }
                    }
                }
            }
        }
    }

    /// One transaction for the whole batch. Returns the outcomes of each ingest op and the count
    /// of each change op, in order.
    #[allow(clippy::type_complexity)]
    fn write(&mut self, ops: &mut [Op]) -> Result<(Vec<Vec<IngestOutcome>>, Vec<u64>), StoreError> {
        let new_clockings: usize = ops.iter().map(op_clockings).sum();
        if new_clockings > 0 {
            self.check_space(new_clockings)?;
        }
        let (durability, confirms) = self.batch_durability(ops);
        let db = self.store.db()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let sinks = self.store.sinks().to_vec();
        let mut results = Vec::new();
        let mut counts = Vec::new();
        let mut table_rows: Vec<TableWrite> = Vec::new();
        {
            let mut outbox = txn.open_table(OUTBOX).map_err(StoreError::from_redb)?;
            let mut ids = txn.open_table(IDS).map_err(StoreError::from_redb)?;
            let mut expiry = txn.open_table(ID_EXPIRY).map_err(StoreError::from_redb)?;
            let mut state_t = txn.open_table(STATE).map_err(StoreError::from_redb)?;
            // The configured sinks first (indexed like `sinks`), then the orphaned ones: never
            // written here, but a clocking they still hold keeps its body in the outbox.
            let holders: Vec<SinkId> = sinks.iter().chain(self.store.orphans()).copied().collect();
            let mut pending: Vec<_> = holders
                .iter()
                .map(|s| txn.open_table(s.table()))
                .collect::<Result<_, _>>()
                .map_err(StoreError::from_redb)?;
            let mut dead: Vec<_> = holders
                .iter()
                .map(|s| txn.open_table(s.dead_table()))
                .collect::<Result<_, _>>()
                .map_err(StoreError::from_redb)?;
            let expires = (Utc::now().timestamp().max(0) as u64) + self.dedupe_secs;
            for op in ops.iter_mut() {
                match op {
                    Op::Ingest {
                        clockings,
                        decide,
                        state,
                        ..
                    } => {
                        let mut outcomes = Vec::with_capacity(clockings.len());
                        for (i, c) in clockings.iter_mut().enumerate() {
                            if ids.get(c.id.0).map_err(StoreError::from_redb)?.is_some() {
                                outcomes.push(IngestOutcome {
                                    id: c.id,
                                    stored: false,
                                    status: None,
                                });
                                continue;
                            }
                            if let Some(hook) = self.access.as_mut() {
                                let d = decide.get(i).copied().unwrap_or(false);
                                hook.clocking(c, d, &TxnReads(&txn), &mut table_rows);
                            }
                            let seq = self.next_seq;
                            self.next_seq += 1;
                            // No echo: a clocking is not queued for the sink it came from. One
                            // that no sink takes is only remembered (its id dedupes re-reads).
                            let takers: Vec<usize> = (0..sinks.len())
                                .filter(|&i| sinks[i].takes(c.source))
                                .collect();
                            if !takers.is_empty() {
                                let bytes = postcard::to_allocvec(&*c).map_err(|e| {
                                    StoreError::Io(format!("encoding clocking: {e}"))
                                })?;
                                outbox
                                    .insert(seq, bytes.as_slice())
                                    .map_err(StoreError::from_redb)?;
                            }
                            ids.insert(c.id.0, seq).map_err(StoreError::from_redb)?;
                            expiry
                                .insert((expires, c.id.0), ())
                                .map_err(StoreError::from_redb)?;
                            for i in takers {
                                pending[i].insert(seq, ()).map_err(StoreError::from_redb)?;
                            }
                            outcomes.push(IngestOutcome {
                                id: c.id,
                                stored: true,
                                status: Some(c.status),
                            });
                        }
                        for (k, v) in state {
                            state_t
                                .insert(k.as_str(), v.as_slice())
                                .map_err(StoreError::from_redb)?;
                        }
                        results.push(outcomes);
                    }
                    Op::Confirm { sink, seqs, .. } => {
                        let Some(idx) = sinks.iter().position(|s| s == sink) else {
                            continue;
                        };
                        if holders.len() == 1 {
                            // The only sink: a contiguous run of confirmed seqs leaves both tables
                            // as one range removal (a cursor pass, not one descent per key). A
                            // dead letter is never confirmed, so no run spans one.
                            for (lo, hi) in runs(seqs) {
                                pending[idx]
                                    .retain_in(lo..=hi, |_, _| false)
                                    .map_err(StoreError::from_redb)?;
                                outbox
                                    .retain_in(lo..=hi, |_, _| false)
                                    .map_err(StoreError::from_redb)?;
                            }
                            continue;
                        }
                        for &seq in seqs.iter() {
                            pending[idx].remove(seq).map_err(StoreError::from_redb)?;
                            if !still_needed(&pending, &dead, seq)? {
                                outbox.remove(seq).map_err(StoreError::from_redb)?;
                            }
                        }
                    }
                    Op::Change { change, .. } => {
                        let count = match change {
                            Change::Barrier => 0,
                            Change::PutState { key, value } => {
                                state_t
                                    .insert(key.as_str(), value.as_slice())
                                    .map_err(StoreError::from_redb)?;
                                0
                            }
                            Change::DeadLetter { sink, seq, reason } => {
                                let Some(idx) = sinks.iter().position(|s| s == sink) else {
                                    counts.push(0);
                                    continue;
                                };
                                if pending[idx]
                                    .remove(*seq)
                                    .map_err(StoreError::from_redb)?
                                    .is_some()
                                {
                                    let entry = DeadLetter {
                                        reason: reason.clone(),
                                        at_ms: Utc::now().timestamp_millis(),
                                    };
                                    let bytes = postcard::to_allocvec(&entry)
                                        .map_err(|e| StoreError::Io(e.to_string()))?;
                                    dead[idx]
                                        .insert(*seq, bytes.as_slice())
                                        .map_err(StoreError::from_redb)?;
                                    1
                                } else {
                                    0
                                }
                            }
                            Change::Replay { sink } => {
                                let Some(idx) = sinks.iter().position(|s| s == sink) else {
                                    counts.push(0);
                                    continue;
                                };
                                let seqs: Vec<u64> = dead[idx]
                                    .iter()
                                    .map_err(StoreError::from_redb)?
                                    .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                                    .collect();
                                for &seq in &seqs {
                                    dead[idx].remove(seq).map_err(StoreError::from_redb)?;
                                    pending[idx]
                                        .insert(seq, ())
                                        .map_err(StoreError::from_redb)?;
                                }
                                seqs.len() as u64
                            }
                            Change::Tables(rows) => {
                                table_rows.append(rows);
                                0
                            }
                            Change::RemotePresence(transitions) => match self.access.as_mut() {
                                Some(hook) => hook.remote(transitions, &mut table_rows),
                                None => 0,
                            },
                            Change::RequeueHeld { sink, badges } => {
                                // The UnknownBadge rows of this batch must be in the table first.
                                tables::apply(&txn, &std::mem::take(&mut table_rows))?;
                                let target = sinks.iter().position(|s| s == sink);
                                let mut n = 0;
                                for (badge, person) in badges.iter() {
                                    for bytes in tables::take_unknown(&txn, badge)? {
                                        let Some(idx) = target else { continue };
                                        let Ok(mut c) = postcard::from_bytes::<Clocking>(&bytes)
                                        else {
                                            continue;
                                        };
                                        c.person = Some(person.clone());
                                        let seq = self.next_seq;
                                        self.next_seq += 1;
                                        let bytes = postcard::to_allocvec(&c).map_err(|e| {
                                            StoreError::Io(format!("encoding clocking: {e}"))
                                        })?;
                                        outbox
                                            .insert(seq, bytes.as_slice())
                                            .map_err(StoreError::from_redb)?;
                                        pending[idx]
                                            .insert(seq, ())
                                            .map_err(StoreError::from_redb)?;
                                        n += 1;
                                    }
                                }
                                n
                            }
                        };
                        counts.push(count);
                    }
                }
            }
            let mut meta = txn.open_table(META).map_err(StoreError::from_redb)?;
            meta.insert(META_NEXT_SEQ, self.next_seq)
                .map_err(StoreError::from_redb)?;
        }
        tables::apply(&txn, &table_rows)?;
        txn.commit().map_err(StoreError::from_redb)?;
        self.undurable = match durability {
            // A durable commit carries every earlier one to disk.
            Durability::Immediate => None,
            _ => {
                let (since, n) = self.undurable.unwrap_or((Instant::now(), 0));
                Some((since, n + confirms))
            }
        };
        self.unsynced.store(
            self.undurable.map_or(0, |(_, n)| n as u64),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some((used, _)) = self.cached_used.as_mut() {
            *used += new_clockings as u64 * 200;
        }
        Ok((results, counts))
    }

    /// Refuse new clockings once the configured cap is reached. The file only grows (freed pages
    /// are reused, not returned), so the file size is a cheap first test and the real usage is
    /// measured only when the file is at the cap.
    fn check_space(&mut self, incoming: usize) -> Result<(), StoreError> {
        let Some(max) = self.max_bytes else {
            return Ok(());
        };
        let estimate = incoming as u64 * 200;
        if file_len(self.store.path()) + estimate <= max {
            return Ok(());
        }
        let used = match self.cached_used {
            Some((used, at)) if at.elapsed() < Duration::from_secs(2) => used,
            _ => {
                let db = self.store.db()?;
                let txn = db.begin_write()?;
                let stats = txn.stats().map_err(StoreError::from_redb)?;
                let used = stats.allocated_pages() * stats.page_size() as u64;
                txn.abort().map_err(StoreError::from_redb)?;
                self.cached_used = Some((used, Instant::now()));
                used
            }
        };
        if used + estimate > max {
            return Err(StoreError::Full(format!(
                "{used} of {max} bytes allowed by agent.store_max_mb in use"
            )));
        }
        Ok(())
    }

    /// Forget ids whose dedupe window has passed, unless their clocking is still undelivered.
    fn prune_ids(&mut self) -> Result<(), StoreError> {
        let now = Utc::now().timestamp().max(0) as u64;
        let db = self.store.db()?;
        let txn = db.begin_write()?;
        {
            let mut expiry = txn.open_table(ID_EXPIRY).map_err(StoreError::from_redb)?;
            let mut ids = txn.open_table(IDS).map_err(StoreError::from_redb)?;
            let outbox = txn.open_table(OUTBOX).map_err(StoreError::from_redb)?;
            let expired: Vec<(u64, [u8; 16])> = expiry
                .range(..(now, [0u8; 16]))
                .map_err(StoreError::from_redb)?
                .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                .collect();
            for (at, id) in expired {
                let seq = ids
                    .get(id)
                    .map_err(StoreError::from_redb)?
                    .map(|v| v.value());
                if let Some(seq) = seq {
                    if outbox.get(seq).map_err(StoreError::from_redb)?.is_some() {
                        continue;
                    }
                }
                ids.remove(id).map_err(StoreError::from_redb)?;
                expiry.remove((at, id)).map_err(StoreError::from_redb)?;
            }
        }
        let now_ms = Utc::now().timestamp_millis();
        tables::prune(
            &txn,
            now_ms - DECISIONS_KEPT_DAYS * 86_400_000,
            now_ms - (self.dedupe_secs as i64) * 1000,
        )?;
        txn.commit().map_err(StoreError::from_redb)
    }
}

/// Does any sink still need clocking `seq` (pending, or set aside as a dead letter)?
fn still_needed(
    pending: &[redb::Table<'_, u64, ()>],
    dead: &[redb::Table<'_, u64, &[u8]>],
    seq: u64,
) -> Result<bool, StoreError> {
    for t in pending {
        if t.get(seq).map_err(StoreError::from_redb)?.is_some() {
            return Ok(true);
        }
    }
    for t in dead {
        if t.get(seq).map_err(StoreError::from_redb)?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sorted, de-duplicated seqs as inclusive runs of consecutive numbers.
fn runs(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == s => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

fn op_clockings(op: &Op) -> usize {
    match op {
        Op::Ingest { clockings, .. } => clockings.len(),
        _ => 0,
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Full(s) => StoreError::Full(s.clone()),
        StoreError::Io(s) => StoreError::Io(s.clone()),
        StoreError::Decode(s) => StoreError::Decode(s.clone()),
        StoreError::Stopped => StoreError::Stopped,
        StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
        StoreError::Corrupted { path, detail } => StoreError::Corrupted {
            path: path.clone(),
            detail: detail.clone(),
        },
        StoreError::MovedAside { path, kept, detail } => StoreError::MovedAside {
            path: path.clone(),
            kept: kept.clone(),
            detail: detail.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessStatus, Direction, NewClocking, Source};

    fn clocking(badge: &str, minute: u32) -> Clocking {
        let tz: chrono_tz::Tz = "Europe/Brussels".parse().unwrap();
        let at =
            chrono::DateTime::parse_from_rfc3339(&format!("2026-05-04T08:{minute:02}:00+02:00"))
                .unwrap();
        Clocking::from_new(
            "site",
            tz,
            NewClocking {
                terminal: "gate".into(),
                badge: badge.into(),
                occurred_at: at,
                direction: Direction::In,
                status: None,
                person: None,
                source: Source::Http,
            },
            AccessStatus::AccessOk,
            Utc::now(),
        )
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn ingest_dedupe_confirm_and_delete_across_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt, SinkId::Protime]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let a = clocking("1", 0);
            let b = clocking("2", 1);
            let out = h
                .ingest(vec![a.clone(), b.clone(), a.clone()], vec![])
                .await
                .unwrap();
            assert_eq!(
                out.iter().map(|o| o.stored).collect::<Vec<_>>(),
                vec![true, true, false]
            );
            let again = h.ingest(vec![b.clone()], vec![]).await.unwrap();
            assert!(!again[0].stored, "a later duplicate is not stored again");

            let mqtt = store.pending(SinkId::Mqtt, None, 10).unwrap();
            assert_eq!(
                mqtt.iter().map(|(_, c)| c.id).collect::<Vec<_>>(),
                vec![a.id, b.id]
            );
            let first_seq = mqtt[0].0;

            h.confirm_and_wait(SinkId::Mqtt, vec![first_seq])
                .await
                .unwrap();
            assert_eq!(store.pending(SinkId::Mqtt, None, 10).unwrap().len(), 1);
            // Still pending for protime: the clocking stays in the outbox.
            assert_eq!(store.stats().unwrap().clockings_stored, 2);
            h.confirm_and_wait(SinkId::Protime, vec![first_seq])
                .await
                .unwrap();
            assert_eq!(store.stats().unwrap().clockings_stored, 1);
            // Its id is still remembered after delivery.
            assert!(store.contains_id(&a.id).unwrap());
            let out = h.ingest(vec![a.clone()], vec![]).await.unwrap();
            assert!(!out[0].stored);
        });
        drop(h);
        writer.join();
    }

    #[test]
    fn fire_and_forget_confirmations_are_seen_at_once_and_durable_by_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let all: Vec<Clocking> = (0..10).map(|i| clocking(&format!("c{i}"), i)).collect();
            h.ingest(all, vec![]).await.unwrap();
            let seqs: Vec<u64> = store
                .pending(SinkId::Mqtt, None, 100)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            h.confirm(SinkId::Mqtt, seqs[..6].to_vec()).unwrap();
            // Readers see the confirmation once it is committed, fsync'd or not.
            h.flush().await.unwrap();
            assert_eq!(store.pending(SinkId::Mqtt, None, 100).unwrap().len(), 4);
            h.confirm(SinkId::Mqtt, seqs[6..8].to_vec()).unwrap();
        });
        drop(h);
        writer.join();
        drop(store);
        // Reopened from the file: everything confirmed before the shutdown is gone.
        let store = Store::open(dir.path(), &[SinkId::Mqtt]).unwrap();
        assert_eq!(store.pending(SinkId::Mqtt, None, 100).unwrap().len(), 2);
    }

    #[test]
    fn pending_reads_skip_entries_only_another_sink_still_needs() {
        // MQTT confirms all but every 25th of 200 clockings; Protime confirms none. Reading
        // MQTT's pending entries must step over long runs of Protime-only outbox entries.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt, SinkId::Protime]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let all: Vec<Clocking> = (0..200)
                .map(|i| clocking(&format!("b{i}"), (i % 60) as u32))
                .collect();
            let out = h.ingest(all.clone(), vec![]).await.unwrap();
            assert!(out.iter().all(|o| o.stored));
            let seqs: Vec<u64> = store
                .pending(SinkId::Mqtt, None, 1000)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            assert_eq!(seqs.len(), 200);
            let (keep, done): (Vec<_>, Vec<_>) =
                seqs.iter().enumerate().partition(|(i, _)| i % 25 == 0);
            h.confirm_and_wait(SinkId::Mqtt, done.iter().map(|(_, s)| **s).collect())
                .await
                .unwrap();
            let want: Vec<_> = keep.iter().map(|(i, s)| (**s, all[*i].id)).collect();
            let got: Vec<_> = store
                .pending(SinkId::Mqtt, None, 1000)
                .unwrap()
                .into_iter()
                .map(|(s, c)| (s, c.id))
                .collect();
            assert_eq!(got, want);
            // From a cursor, and with a limit.
            let after = store.pending(SinkId::Mqtt, Some(want[2].0), 3).unwrap();
            assert_eq!(
                after.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                want[3..6].iter().map(|(s, _)| *s).collect::<Vec<_>>()
            );
            assert_eq!(
                store.pending(SinkId::Protime, None, 1000).unwrap().len(),
                200
            );
        });
        drop(h);
        writer.join();
    }

    #[test]
    fn a_clocking_is_not_queued_for_the_sink_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt, SinkId::Protime]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let local = clocking("1", 0);
            let mirrored = Clocking {
                source: Source::Protime,
                ..clocking("2", 1)
            };
            let out = h
                .ingest(vec![local.clone(), mirrored.clone()], vec![])
                .await
                .unwrap();
            assert!(out.iter().all(|o| o.stored));
            let ids = |sink| -> Vec<_> {
                store
                    .pending(sink, None, 10)
                    .unwrap()
                    .into_iter()
                    .map(|(_, c)| c.id)
                    .collect()
            };
            assert_eq!(ids(SinkId::Mqtt), vec![local.id, mirrored.id]);
            assert_eq!(ids(SinkId::Protime), vec![local.id], "no echo to Protime");
            // MQTT's confirmation alone releases the mirrored clocking.
            let seqs: Vec<u64> = store
                .pending(SinkId::Mqtt, None, 10)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            h.confirm_and_wait(SinkId::Mqtt, seqs).await.unwrap();
            assert_eq!(store.stats().unwrap().clockings_stored, 1);
        });
        drop(h);
        writer.join();

        // With Protime as the only sink, a mirrored clocking is remembered but not held.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Protime]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let mirrored = Clocking {
                source: Source::Protime,
                ..clocking("3", 2)
            };
            let out = h.ingest(vec![mirrored.clone()], vec![]).await.unwrap();
            assert!(out[0].stored);
            assert_eq!(store.stats().unwrap().clockings_stored, 0);
            assert!(store.contains_id(&mirrored.id).unwrap());
            let again = h.ingest(vec![mirrored], vec![]).await.unwrap();
            assert!(!again[0].stored, "a re-read is still a duplicate");
        });
        drop(h);
        writer.join();
    }

    #[test]
    fn store_cap_refuses_with_full_and_keeps_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt]).unwrap());
        let cap = file_len(store.path()) + 64 * 1024;
        let (writer, h) = Writer::start(store.clone(), 30, Some(cap));
        let mut accepted = 0;
        let err = rt().block_on(async {
            for i in 0..100_000u32 {
                let batch: Vec<_> = (0..50).map(|j| clocking(&format!("{i}-{j}"), 0)).collect();
                match h.ingest(batch, vec![]).await {
                    Ok(_) => accepted += 50,
                    Err(e) => return e,
                }
            }
            panic!("cap never reached");
        });
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert_eq!(store.stats().unwrap().clockings_stored, accepted);
        drop(h);
        writer.join();
    }

    #[test]
    fn dead_letters_are_set_aside_kept_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt, SinkId::Protime]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            h.ingest(vec![clocking("d1", 0), clocking("d2", 1)], vec![])
                .await
                .unwrap();
            let seqs: Vec<u64> = store
                .pending(SinkId::Protime, None, 10)
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect();
            let n = h
                .change(Change::DeadLetter {
                    sink: SinkId::Protime,
                    seq: seqs[0],
                    reason: "unknown badge".into(),
                })
                .await
                .unwrap();
            assert_eq!(n, 1);
            assert_eq!(store.pending(SinkId::Protime, None, 10).unwrap().len(), 1);
            // MQTT delivered both: the dead letter still holds its clocking.
            h.confirm_and_wait(SinkId::Mqtt, seqs.clone())
                .await
                .unwrap();
            h.confirm_and_wait(SinkId::Protime, vec![seqs[1]])
                .await
                .unwrap();
            assert_eq!(store.stats().unwrap().clockings_stored, 1);
            let dead = store.dead_letters(SinkId::Protime).unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].1.badge, "d1");
            assert_eq!(dead[0].2.reason, "unknown badge");
            let stats = store.stats().unwrap();
            assert_eq!(stats.sinks[1].dead_letters, 1);

            assert_eq!(
                h.change(Change::Replay {
                    sink: SinkId::Protime
                })
                .await
                .unwrap(),
                1
            );
            assert!(store.dead_letters(SinkId::Protime).unwrap().is_empty());
            let again = store.pending(SinkId::Protime, None, 10).unwrap();
            assert_eq!(again.len(), 1);
            h.confirm_and_wait(SinkId::Protime, vec![again[0].0])
                .await
                .unwrap();
            assert_eq!(store.stats().unwrap().clockings_stored, 0);

            h.change(Change::PutState {
                key: "w".into(),
                value: vec![1, 2],
            })
            .await
            .unwrap();
            assert_eq!(store.state("w").unwrap(), Some(vec![1, 2]));
        });
        drop(h);
        writer.join();
    }

    #[test]
    fn confirmed_seqs_become_runs() {
        assert_eq!(runs(&[5, 3, 4, 9, 10, 3, 1]), vec![(1, 1), (3, 5), (9, 10)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn single_sink_range_confirm_removes_exactly_the_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let batch: Vec<_> = (0..10).map(|j| clocking(&format!("r{j}"), 0)).collect();
            h.ingest(batch, vec![]).await.unwrap();
            let seqs: Vec<u64> = store
                .pending(SinkId::Mqtt, None, 100)
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect();
            // Confirm 1st, 3rd-5th and 9th: two gaps must survive.
            let chosen = vec![seqs[0], seqs[2], seqs[3], seqs[4], seqs[8]];
            h.confirm_and_wait(SinkId::Mqtt, chosen.clone())
                .await
                .unwrap();
            let left: Vec<u64> = store
                .pending(SinkId::Mqtt, None, 100)
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect();
            let expected: Vec<u64> = seqs
                .iter()
                .copied()
                .filter(|s| !chosen.contains(s))
                .collect();
            assert_eq!(left, expected);
            assert_eq!(store.stats().unwrap().clockings_stored, 5);
        });
        drop(h);
        writer.join();
    }

    #[test]
    fn drained_store_is_compacted_only_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt]).unwrap());
        let (writer, h) = Writer::start(store.clone(), 30, None);
        let seqs = rt().block_on(async {
            for i in 0..40u32 {
                let batch: Vec<_> = (0..250).map(|j| clocking(&format!("{i}-{j}"), 0)).collect();
                h.ingest(batch, vec![]).await.unwrap();
            }
            store
                .pending(SinkId::Mqtt, None, 20_000)
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
        });
        assert_eq!(
            store.compact_if_worthwhile(0).unwrap(),
            None,
            "not while clockings are pending"
        );
        rt().block_on(h.confirm_and_wait(SinkId::Mqtt, seqs))
            .unwrap();
        let (before, after) = store.compact_if_worthwhile(0).unwrap().expect("compacted");
        assert!(after * 2 < before, "{before} -> {after}");
        // Still usable, ids still remembered.
        rt().block_on(async {
            let out = h
                .ingest(vec![clocking("0-0", 0), clocking("new", 0)], vec![])
                .await
                .unwrap();
            assert_eq!(
                out.iter().map(|o| o.stored).collect::<Vec<_>>(),
                vec![false, true]
            );
        });
        drop(h);
        writer.join();
    }

    /// A sink missing from the config is orphaned, not emptied: opening (read-only or not)
    /// keeps its entries and their clockings, the other sink's deliveries do not release them,
    /// and only `drop_sink` does.
    #[test]
    fn removed_sink_keeps_its_backlog_as_orphaned_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store =
                Arc::new(Store::open(dir.path(), &[SinkId::Mqtt, SinkId::Protime]).unwrap());
            let (writer, h) = Writer::start(store.clone(), 30, None);
            rt().block_on(async {
                let five: Vec<Clocking> = (0..5).map(|i| clocking(&format!("b{i}"), i)).collect();
                h.ingest(five, vec![]).await.unwrap();
            });
            drop(h);
            writer.join();
        }
        let path = dir.path().join(Store::FILE_NAME);
        {
            let mut ro = Store::open_read_only(&path, &[SinkId::Mqtt]).unwrap();
            let stats = ro.stats().unwrap();
            assert_eq!(stats.sinks.len(), 1);
            assert_eq!(stats.sinks[0].pending, 5);
            assert_eq!(stats.orphaned.len(), 1);
            assert_eq!(stats.orphaned[0].sink, "protime");
            assert_eq!(stats.orphaned[0].pending, 5);
            assert!(ro.drop_sink(SinkId::Protime).is_err(), "read-only");
        }
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt]).unwrap());
        assert_eq!(store.orphans(), &[SinkId::Protime]);
        let (writer, h) = Writer::start(store.clone(), 30, None);
        rt().block_on(async {
            let seqs: Vec<u64> = store
                .pending(SinkId::Mqtt, None, 10)
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect();
            h.confirm_and_wait(SinkId::Mqtt, seqs).await.unwrap();
            h.ingest(vec![clocking("later", 30)], vec![]).await.unwrap();
        });
        drop(h);
        writer.join();
        let stats = store.stats().unwrap();
        assert_eq!(stats.sinks[0].pending, 1);
        assert_eq!(stats.orphaned[0].pending, 5, "not delivered, not released");
        assert_eq!(stats.clockings_stored, 6, "the orphan's clockings are kept");
        let p = store.pending(SinkId::Mqtt, None, 10).unwrap();
        assert_eq!(p[0].0, 6, "sequence continues after reopen");
        drop(store);

        // Configured again: the backlog is Protime's to deliver, bodies included.
        let store = Store::open(dir.path(), &[SinkId::Mqtt, SinkId::Protime]).unwrap();
        assert!(store.orphans().is_empty());
        assert_eq!(store.pending(SinkId::Protime, None, 10).unwrap().len(), 5);
        drop(store);

        let mut store = Store::open(dir.path(), &[SinkId::Mqtt]).unwrap();
        assert!(store.drop_sink(SinkId::Mqtt).is_err(), "a configured sink");
        assert_eq!(store.drop_sink(SinkId::Protime).unwrap(), 5);
        let stats = store.stats().unwrap();
        assert!(stats.orphaned.is_empty());
        assert_eq!(
            stats.clockings_stored, 1,
            "only MQTT's pending clocking is left"
        );
        assert!(store.orphans().is_empty());
    }
}
