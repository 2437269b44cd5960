//! The durable outbox. The only module that touches the database file.
//!
//! Layout (redb tables; values in postcard):
//! - `outbox`: seq (u64, arrival order) → clocking
//! - `ids`: clocking id → seq, and `id_expiry`: (expiry unix secs, id) → () so that ids of delivered
//!   clockings are remembered for `[agent].dedupe_days` and then forgotten cheaply
//! - `pending.<sink>`: seq → () for every clocking that sink has not confirmed yet
//! - `meta`: counters (next seq)
//! - the state tables ([`tables`]): presence, people, shifts, local decisions and UnknownBadge
//!   clockings, written in the same transactions as the clockings they come from
//!
//! A clocking leaves `outbox` in the same transaction that removes it from the last sink's
//! pending table, so "delivered to every sink" and "deleted" can never disagree.
//!
//! Opening the store never deletes anything. A sink that is no longer configured keeps its
//! pending table ("orphaned": not delivered, still counted, its clockings still held) until
//! `badgegate queue drop-sink` releases it on purpose: a config that lost a section, whether by
//! an edit or a wrong `--config`, must not cost a backlog. The queue tools open the store
//! read-only.
//!
//! Writes go through one writer thread ([`writer`]) that batches concurrent requests into a
//! single fsync'd transaction (group commit); reads open their own read transactions.

pub mod tables;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use chrono::{DateTime, Utc};
use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::Serialize;

use crate::model::{Clocking, Source};

pub use tables::TableWrite;
pub use writer::{
    AccessHook, AccessReads, Change, DeadLetter, IngestOutcome, Writer, WriterHandle,
};

/// Open the store of a stopped agent read-only, for the tools that only look (fails with
/// `Locked` while it runs). Nothing in the file changes, whatever `sinks` says.
pub fn open_offline(data_dir: &Path, sinks: &[SinkId]) -> Result<Store, StoreError> {
    Store::open_read_only(&existing(data_dir)?, sinks)
}

/// Open the store of a stopped agent for a tool that changes it (`replay-dead-letters`,
/// `drop-sink`); fails with `Locked` while the agent runs.
pub fn open_offline_writable(data_dir: &Path, sinks: &[SinkId]) -> Result<Store, StoreError> {
    existing(data_dir)?;
    Store::open(data_dir, sinks)
}

fn existing(data_dir: &Path) -> Result<PathBuf, StoreError> {
    let path = data_dir.join(Store::FILE_NAME);
    if !path.exists() {
        return Err(StoreError::Io(format!(
            "no store at {} (has the agent ever run with this data_dir?)",
            path.display()
        )));
    }
    Ok(path)
}

pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
pub(crate) const IDS: TableDefinition<[u8; 16], u64> = TableDefinition::new("ids");
pub(crate) const ID_EXPIRY: TableDefinition<(u64, [u8; 16]), ()> =
    TableDefinition::new("id_expiry");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

pub(crate) const META_NEXT_SEQ: &str = "next_seq";
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Outbox entries a merge join steps over before it re-seeks instead.
const MERGE_STEPS: usize = 8;

/// A destination that must confirm every clocking before it may leave the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkId {
    Mqtt,
    Protime,
}

impl SinkId {
    pub const ALL: [SinkId; 2] = [SinkId::Mqtt, SinkId::Protime];

    pub fn as_str(self) -> &'static str {
        match self {
            SinkId::Mqtt => "mqtt",
            SinkId::Protime => "protime",
        }
    }

    pub fn from_name(name: &str) -> Option<SinkId> {
        SinkId::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether clockings from `source` are queued for this sink. A clocking mirrored from
    /// Protime is never sent back to Protime (no echo); every other pair is delivered.
    pub fn takes(self, source: Source) -> bool {
        !matches!((self, source), (SinkId::Protime, Source::Protime))
    }

    pub(crate) fn table(self) -> TableDefinition<'static, u64, ()> {
        match self {
            SinkId::Mqtt => TableDefinition::new("pending.mqtt"),
            SinkId::Protime => TableDefinition::new("pending.protime"),
        }
    }

    /// Clockings this sink set aside: seq → postcard(DeadLetter).
    pub(crate) fn dead_table(self) -> TableDefinition<'static, u64, &'static [u8]> {
        match self {
            SinkId::Mqtt => TableDefinition::new("dead.mqtt"),
            SinkId::Protime => TableDefinition::new("dead.protime"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk or the configured store cap is full: refuse, never drop.
    #[error("store is full ({0}); clockings are refused until space is freed")]
    Full(String),
    #[error("store {path} is in use by another process (is the agent running?)")]
    Locked { path: PathBuf },
    #[error("store {path} is damaged: {detail}")]
    Corrupted { path: PathBuf, detail: String },
    /// Found damaged at start and moved aside: never wiped, never silently replaced.
    #[error("store {path} is damaged ({detail}); it was moved to {kept} for inspection and nothing in it was deleted. The next start begins with an empty store: clockings still undelivered in the damaged file are not forwarded until it is restored")]
    MovedAside {
        path: PathBuf,
        kept: PathBuf,
        detail: String,
    },
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store writer has stopped")]
    Stopped,
    #[error("stored value could not be decoded: {0}")]
    Decode(String),
}

impl StoreError {
    pub(crate) fn from_redb(e: impl Into<redb::Error>) -> StoreError {
        let e: redb::Error = e.into();
        match e {
            redb::Error::Io(io) => io_error(io),
            redb::Error::Corrupted(detail) => StoreError::Corrupted {
                path: PathBuf::new(),
                detail,
            },
            other => StoreError::Io(other.to_string()),
        }
    }
}

fn io_error(io: std::io::Error) -> StoreError {
    // ENOSPC (28) and EDQUOT (122): the disk is full, which the contract answers with 507.
    if matches!(io.raw_os_error(), Some(28) | Some(122))
        || io.kind() == std::io::ErrorKind::StorageFull
    {
        StoreError::Full(io.to_string())
    } else {
        StoreError::Io(io.to_string())
    }
}

/// Which stored clockings `queue list` / `queue export` show.
#[derive(Debug, Clone, Default)]
pub struct QueueFilter {
    /// Only clockings pending at (or set aside by) this sink.
    pub sink: Option<SinkId>,
    pub terminal: Option<String>,
    /// `occurred_at` at or after.
    pub since: Option<DateTime<chrono::FixedOffset>>,
    /// `occurred_at` before.
    pub until: Option<DateTime<chrono::FixedOffset>>,
}

/// A stored clocking with where it still has to go.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: u64,
    pub clocking: Clocking,
    pub pending: Vec<SinkId>,
    pub dead: Vec<(SinkId, DeadLetter)>,
}

impl Queued {
    /// The MQTT payload plus the queue's view of it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_slice(&self.clocking.to_json()).unwrap_or_default();
        v["seq"] = self.seq.into();
        v["pending_sinks"] = self
            .pending
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .into();
        v["dead_letters"] = self
            .dead
            .iter()
            .map(|(s, d)| serde_json::json!({"sink": s.as_str(), "reason": d.reason, "at_ms": d.at_ms}))
            .collect::<Vec<_>>()
            .into();
        v
    }
}

/// What `queue stats` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct QueueStats {
    pub store_path: PathBuf,
    pub store_bytes: u64,
    pub clockings_stored: u64,
    pub sinks: Vec<SinkStats>,
    /// Sinks missing from this config that still hold clockings: kept, not delivered, until
    /// `queue drop-sink` releases them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphaned: Vec<SinkStats>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct SinkStats {
    pub sink: String,
    pub pending: u64,
    /// Age of the oldest clocking this sink has not confirmed, by when it was received.
    pub oldest_pending_age_secs: Option<f64>,
    /// Clockings the destination rejected, set aside until replayed.
    #[serde(default)]
    pub dead_letters: u64,
}

/// The durable store. Cheap to share behind an `Arc`; reads run on the caller's thread.
pub struct Store {
    /// Shared by every reader and the writer; taken exclusively only to compact the file or to
    /// reopen it after an I/O error. `None` while a reopen failed (it is retried on next use).
    db: RwLock<Option<Handle>>,
    path: PathBuf,
    read_only: bool,
    sinks: Vec<SinkId>,
    /// Sinks not in `sinks` whose tables still hold clockings (found at open).
    orphans: Vec<SinkId>,
}

/// The open database: writable for the agent and the tools that change the queue, read-only
/// for the tools that only look.
pub(crate) enum Handle {
    Write(Database),
    Read(ReadOnlyDatabase),
}

impl Store {
    pub const FILE_NAME: &'static str = "badgegate.redb";

    /// Open (or create) the store in `data_dir` for the given sinks. The pending entries of a
    /// sink that is no longer configured are kept (orphaned, see the module doc) with a warning.
    pub fn open(data_dir: &Path, sinks: &[SinkId]) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Io(format!(
                "cannot create data_dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(Self::FILE_NAME);
        let db = match open_db(&path) {
            Ok(db) => db,
            Err(e) => {
                return Err(match open_error(&path, e) {
                    StoreError::Corrupted { detail, .. } => move_aside(&path, detail),
                    other => other,
                })
            }
        };
        let mut store = Store {
            db: RwLock::new(Some(Handle::Write(db))),
            path,
            read_only: false,
            sinks: sinks.to_vec(),
            orphans: Vec::new(),
        };
        store.init_tables()?;
        store.orphans = store.find_orphans()?;
        for s in &store.orphans {
            let (pending, dead) = store.held_by(*s)?;
            tracing::warn!(
                sink = s.as_str(),
                pending,
                dead_letters = dead,
                "sink is not configured: its clockings are kept, not delivered; configure it again, or release them with `badgegate queue drop-sink {}`",
                s.as_str()
            );
        }
        Ok(store)
    }

    /// Open an existing store without changing it. A store left by a crash needs redb's repair,
    /// which a read-only open refuses: it is then opened for writing once (the repair the
    /// agent's next start would run, touching no table) and read-only again.
    pub fn open_read_only(path: &Path, sinks: &[SinkId]) -> Result<Store, StoreError> {
        let db = match open_db_read_only(path) {
            Err(redb::DatabaseError::RepairAborted) => {
                drop(open_db(path).map_err(|e| open_error(path, e))?);
                open_db_read_only(path)
            }
            other => other,
        }
        .map_err(|e| open_error(path, e))?;
        let mut store = Store {
            db: RwLock::new(Some(Handle::Read(db))),
            path: path.to_path_buf(),
            read_only: true,
            sinks: sinks.to_vec(),
            orphans: Vec::new(),
        };
        store.orphans = store.find_orphans()?;
        Ok(store)
    }

    /// Sinks outside the config whose pending or dead-letter table holds something.
    fn find_orphans(&self) -> Result<Vec<SinkId>, StoreError> {
        let mut out = Vec::new();
        for s in SinkId::ALL.into_iter().filter(|s| !self.sinks.contains(s)) {
            let (pending, dead) = self.held_by(s)?;
            if pending + dead > 0 {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// (pending, dead letters) of a sink; (0, 0) when it never had tables.
    fn held_by(&self, sink: SinkId) -> Result<(u64, u64), StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let pending = match read_table(&txn, sink.table())? {
            Some(t) => t.len().map_err(StoreError::from_redb)?,
            None => 0,
        };
        let dead = match read_table(&txn, sink.dead_table())? {
            Some(t) => t.len().map_err(StoreError::from_redb)?,
            None => 0,
        };
        Ok((pending, dead))
    }

    /// Sinks missing from the config that still hold clockings.
    pub fn orphans(&self) -> &[SinkId] {
        &self.orphans
    }

    /// Release everything an orphaned sink holds: its pending and dead-letter entries go, and so
    /// do the clockings no other sink still needs. Returns how many entries were dropped. A
    /// configured sink is refused: its queue is the agent's to deliver.
    pub fn drop_sink(&mut self, sink: SinkId) -> Result<u64, StoreError> {
        if self.sinks.contains(&sink) {
            return Err(StoreError::Io(format!(
                "sink {} is configured; remove it from the config before dropping its queue",
                sink.as_str()
            )));
        }
        let dropped = {
            let db = self.db()?;
            let txn = db.begin_write()?;
            let mut seqs: Vec<u64> = Vec::new();
            {
                let pending = txn
                    .open_table(sink.table())
                    .map_err(StoreError::from_redb)?;
                for e in pending.iter().map_err(StoreError::from_redb)? {
                    seqs.push(e.map_err(StoreError::from_redb)?.0.value());
                }
                let dead = txn
                    .open_table(sink.dead_table())
                    .map_err(StoreError::from_redb)?;
                for e in dead.iter().map_err(StoreError::from_redb)? {
                    seqs.push(e.map_err(StoreError::from_redb)?.0.value());
                }
            }
            let dropped = seqs.len() as u64;
            txn.delete_table(sink.table())
                .map_err(StoreError::from_redb)?;
            txn.delete_table(sink.dead_table())
                .map_err(StoreError::from_redb)?;
            seqs.sort_unstable();
            seqs.dedup();
            {
                let mut outbox = txn.open_table(OUTBOX).map_err(StoreError::from_redb)?;
                for seq in seqs {
                    if !self.pending_elsewhere(&txn, Some(sink), seq)? {
                        outbox.remove(seq).map_err(StoreError::from_redb)?;
                    }
                }
            }
            txn.commit().map_err(StoreError::from_redb)?;
            dropped
        };
        self.orphans.retain(|s| *s != sink);
        tracing::warn!(
            sink = sink.as_str(),
            dropped,
            "sink's queue dropped on request"
        );
        Ok(dropped)
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write()?;
        {
            txn.open_table(OUTBOX).map_err(StoreError::from_redb)?;
            txn.open_table(IDS).map_err(StoreError::from_redb)?;
            txn.open_table(ID_EXPIRY).map_err(StoreError::from_redb)?;
            txn.open_table(META).map_err(StoreError::from_redb)?;
            txn.open_table(STATE).map_err(StoreError::from_redb)?;
            tables::init(&txn)?;
            for s in &self.sinks {
                txn.open_table(s.table()).map_err(StoreError::from_redb)?;
                txn.open_table(s.dead_table())
                    .map_err(StoreError::from_redb)?;
            }
        }
        txn.commit().map_err(StoreError::from_redb)
    }

    /// Is `seq` still needed (pending or dead-lettered) by any sink, configured or orphaned,
    /// other than `except`?
    pub(crate) fn pending_elsewhere(
        &self,
        txn: &redb::WriteTransaction,
        except: Option<SinkId>,
        seq: u64,
    ) -> Result<bool, StoreError> {
        for s in self.holders().filter(|s| Some(*s) != except) {
            let t = txn.open_table(s.table()).map_err(StoreError::from_redb)?;
            if t.get(seq).map_err(StoreError::from_redb)?.is_some() {
                return Ok(true);
            }
            let d = txn
                .open_table(s.dead_table())
                .map_err(StoreError::from_redb)?;
            if d.get(seq).map_err(StoreError::from_redb)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sinks(&self) -> &[SinkId] {
        &self.sinks
    }

    /// Every sink that may hold clockings: the configured ones, then the orphaned ones.
    fn holders(&self) -> impl Iterator<Item = SinkId> + '_ {
        self.sinks.iter().chain(&self.orphans).copied()
    }

    fn open_handle(&self) -> Result<Handle, StoreError> {
        let handle = if self.read_only {
            open_db_read_only(&self.path).map(Handle::Read)
        } else {
            open_db(&self.path).map(Handle::Write)
        };
        handle.map_err(|e| open_error(&self.path, e))
    }

    /// The database, for one transaction: hold the guard as long as the transaction. Opens it
    /// again first if an earlier reopen failed.
    pub(crate) fn db(&self) -> Result<Db<'_>, StoreError> {
        // With panic = abort a poisoned lock cannot be observed; in tests, carry on.
        let g = self.db.read().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return Ok(Db(g));
        }
        drop(g);
        {
            let mut w = self.db.write().unwrap_or_else(|e| e.into_inner());
            if w.is_none() {
                *w = Some(self.open_handle()?);
                tracing::info!(path = %self.path.display(), "store reopened");
            }
        }
        Ok(Db(self.db.read().unwrap_or_else(|e| e.into_inner())))
    }

    /// Whether the database refuses all work after an I/O error (redb then answers every
    /// operation with "previous I/O error" until it is closed and opened again), or is closed
    /// because reopening it failed. Only for the writer thread: it starts a write transaction.
    pub(crate) fn needs_reopen(&self) -> bool {
        let Ok(db) = self.db() else {
            return true;
        };
        let Handle::Write(db) = db.handle() else {
            return false;
        };
        match db.begin_write() {
            Ok(txn) => {
                let _ = txn.abort();
                false
            }
            Err(e) => matches!(
                e,
                redb::TransactionError::Storage(redb::StorageError::PreviousIo)
            ),
        }
    }

    /// Close the database and open it again (redb runs its crash recovery on open). A full disk
    /// poisons the open database; without this the agent would refuse every clocking, and stop
    /// forwarding its backlog, until restarted, even after space was freed. If opening fails
    /// (still no space), the next use tries again.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        let mut w = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Dropped first: it holds the file lock.
        *w = None;
        *w = Some(self.open_handle()?);
        tracing::info!(path = %self.path.display(), "store reopened after an I/O error");
        Ok(())
    }

    /// Give freed space back to the file system. redb reuses freed pages but never returns them,
    /// so after a large backlog drained the file keeps its peak size. Compaction takes the
    /// database exclusively (ingest waits, nothing is lost), so it runs only when the outbox is
    /// empty and at least half of a file of `min_bytes` or more is free. Returns (before, after).
    pub fn compact_if_worthwhile(&self, min_bytes: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let before = file_len(&self.path);
        if before < min_bytes || self.read_only {
            return Ok(None);
        }
        {
            let db = self.db()?;
            // Cheap test first: the outbox length is kept in the tree root.
            let read = db.begin_read().map_err(StoreError::from_redb)?;
            let empty = read
                .open_table(OUTBOX)
                .map_err(StoreError::from_redb)?
                .is_empty()
                .map_err(StoreError::from_redb)?;
            if !empty {
                return Ok(None);
            }
            drop(read);
            // Measuring what is in use walks the trees: only now.
            let txn = db.begin_write()?;
            let stats = txn.stats().map_err(StoreError::from_redb)?;
            let used = stats.allocated_pages() * stats.page_size() as u64;
            txn.abort().map_err(StoreError::from_redb)?;
            if used * 2 > before {
                return Ok(None);
            }
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        let Some(Handle::Write(db_mut)) = db.as_mut() else {
            return Ok(None);
        };
        db_mut
            .compact()
            .map_err(|e| StoreError::Io(format!("compaction failed: {e}")))?;
        drop(db);
        Ok(Some((before, file_len(&self.path))))
    }

    /// Up to `limit` clockings pending for `sink` with seq > `after`, in arrival order.
    pub fn pending(
        &self,
        sink: SinkId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Clocking)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let pending = txn
            .open_table(sink.table())
            .map_err(StoreError::from_redb)?;
        let outbox = txn.open_table(OUTBOX).map_err(StoreError::from_redb)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::with_capacity(limit.min(1024));
        // Both tables are keyed by seq and the outbox holds every pending seq, so one cursor pass
        // over each (a merge join) replaces a descent of the outbox per entry. Entries only other
        // sinks still need are stepped over; a long run of them costs one re-seek, not a scan.
        let mut bodies = outbox.range(start..).map_err(StoreError::from_redb)?;
        let mut body: Option<(u64, redb::AccessGuard<'_, &[u8]>)> = None;
        for entry in pending.range(start..).map_err(StoreError::from_redb)? {
            if out.len() >= limit {
                break;
            }
            let (seq, _) = entry.map_err(StoreError::from_redb)?;
            let seq = seq.value();
            let mut steps = 0;
            while body.as_ref().is_none_or(|(k, _)| *k < seq) {
                if steps == MERGE_STEPS {
                    bodies = outbox.range(seq..).map_err(StoreError::from_redb)?;
                }
                steps += 1;
                match bodies.next() {
                    Some(e) => {
                        let (k, v) = e.map_err(StoreError::from_redb)?;
                        body = Some((k.value(), v));
                    }
                    None => {
                        body = None;
                        break;
                    }
                }
            }
            let Some((_, bytes)) = body.as_ref().filter(|(k, _)| *k == seq) else {
                // Pending without a body cannot be produced by the writer; skip rather than stall.
                tracing::error!(seq, sink = sink.as_str(), "pending entry without clocking");
                continue;
            };
            let c: Clocking = postcard::from_bytes(bytes.value())
                .map_err(|e| StoreError::Decode(format!("seq {seq}: {e}")))?;
            out.push((seq, c));
        }
        Ok(out)
    }

    /// Pending counts, oldest pending age and store size; orphaned sinks apart.
    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let outbox = read_table(&txn, OUTBOX)?;
        let now = Utc::now();
        let sink_stats = |s: SinkId| -> Result<SinkStats, StoreError> {
            let (mut pending, mut oldest, mut dead_letters) = (0, None, 0);
            if let Some(t) = read_table(&txn, s.table())? {
                pending = t.len().map_err(StoreError::from_redb)?;
                if let (Some((seq, _)), Some(outbox)) =
                    (t.first().map_err(StoreError::from_redb)?, outbox.as_ref())
                {
                    oldest = outbox
                        .get(seq.value())
                        .map_err(StoreError::from_redb)?
                        .and_then(|b| postcard::from_bytes::<Clocking>(b.value()).ok())
                        .map(|c| age_secs(c.received_at, now));
                }
            }
            if let Some(t) = read_table(&txn, s.dead_table())? {
                dead_letters = t.len().map_err(StoreError::from_redb)?;
            }
            Ok(SinkStats {
                sink: s.as_str().to_owned(),
                pending,
                oldest_pending_age_secs: oldest,
                dead_letters,
            })
        };
        let sinks = self
            .sinks
            .iter()
            .map(|s| sink_stats(*s))
            .collect::<Result<_, _>>()?;
        let orphaned = self
            .orphans
            .iter()
            .map(|s| sink_stats(*s))
            .collect::<Result<_, _>>()?;
        let clockings_stored = match &outbox {
            Some(t) => t.len().map_err(StoreError::from_redb)?,
            None => 0,
        };
        Ok(QueueStats {
            store_path: self.path.clone(),
            store_bytes: file_len(&self.path),
            clockings_stored,
            sinks,
            orphaned,
        })
    }

    /// Up to `limit` stored clockings after seq `after` that match `filter`, in arrival order.
    pub fn list(
        &self,
        filter: &QueueFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let Some(outbox) = read_table(&txn, OUTBOX)? else {
            return Ok(Vec::new());
        };
        let mut pending = Vec::new();
        let mut dead = Vec::new();
        for s in self.holders() {
            if let Some(t) = read_table(&txn, s.table())? {
                pending.push((s, t));
            }
            if let Some(t) = read_table(&txn, s.dead_table())? {
                dead.push((s, t));
            }
        }
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for entry in outbox.range(start..).map_err(StoreError::from_redb)? {
            if out.len() >= limit {
                break;
            }
            let (seq, bytes) = entry.map_err(StoreError::from_redb)?;
            let seq = seq.value();
            let clocking: Clocking = postcard::from_bytes(bytes.value())
                .map_err(|e| StoreError::Decode(format!("seq {seq}: {e}")))?;
            if filter
                .terminal
                .as_ref()
                .is_some_and(|t| *t != clocking.terminal)
                || filter.since.is_some_and(|t| clocking.occurred_at < t)
                || filter.until.is_some_and(|t| clocking.occurred_at >= t)
            {
                continue;
            }
            let mut q = Queued {
                seq,
                clocking,
                pending: Vec::new(),
                dead: Vec::new(),
            };
            for (s, t) in &pending {
                if t.get(seq).map_err(StoreError::from_redb)?.is_some() {
                    q.pending.push(*s);
                }
            }
            for (s, t) in &dead {
                if let Some(v) = t.get(seq).map_err(StoreError::from_redb)? {
                    if let Ok(d) = postcard::from_bytes::<DeadLetter>(v.value()) {
                        q.dead.push((*s, d));
                    }
                }
            }
            if filter
                .sink
                .is_some_and(|s| !q.pending.contains(&s) && !q.dead.iter().any(|(d, _)| *d == s))
            {
                continue;
            }
            out.push(q);
        }
        Ok(out)
    }

    /// The dead letters of a sink with their clockings, in seq order.
    pub fn dead_letters(
        &self,
        sink: SinkId,
    ) -> Result<Vec<(u64, Clocking, DeadLetter)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let (Some(dead), Some(outbox)) = (
            read_table(&txn, sink.dead_table())?,
            read_table(&txn, OUTBOX)?,
        ) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in dead.iter().map_err(StoreError::from_redb)? {
            let (seq, v) = entry.map_err(StoreError::from_redb)?;
            let letter: DeadLetter = postcard::from_bytes(v.value())
                .map_err(|e| StoreError::Decode(format!("dead letter {}: {e}", seq.value())))?;
            if let Some(bytes) = outbox.get(seq.value()).map_err(StoreError::from_redb)? {
                let c: Clocking = postcard::from_bytes(bytes.value())
                    .map_err(|e| StoreError::Decode(format!("seq {}: {e}", seq.value())))?;
                out.push((seq.value(), c, letter));
            }
        }
        Ok(out)
    }

    /// Read a small state value (watermarks, tokens, …) written through the writer.
    pub fn state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn.open_table(STATE).map_err(StoreError::from_redb)?;
        Ok(t.get(key)
            .map_err(StoreError::from_redb)?
            .map(|v| v.value().to_vec()))
    }

    /// Is a clocking with this id stored or remembered?
    pub fn contains_id(&self, id: &crate::model::ClockingId) -> Result<bool, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn.open_table(IDS).map_err(StoreError::from_redb)?;
        Ok(t.get(id.0).map_err(StoreError::from_redb)?.is_some())
    }
}

/// Statistics for `queue stats` while the agent is stopped, from a read-only open (the lock
/// makes it fail cleanly with `Locked` while the agent runs).
pub fn offline_stats(data_dir: &Path, sinks: &[SinkId]) -> Result<QueueStats, StoreError> {
    open_offline(data_dir, sinks)?.stats()
}

/// A table of a read transaction, `None` when it was never created (a sink added to the
/// config since the agent last ran, read by a tool that must not create it).
fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(StoreError::from_redb(e)),
    }
}

/// Access to the open database, for one transaction.
pub(crate) struct Db<'a>(RwLockReadGuard<'a, Option<Handle>>);

impl Db<'_> {
    fn handle(&self) -> &Handle {
        // `Store::db` hands out a guard only while the database is open.
        self.0.as_ref().expect("store database is open")
    }

    pub(crate) fn begin_read(&self) -> Result<ReadTransaction, redb::TransactionError> {
        match self.handle() {
            Handle::Write(db) => db.begin_read(),
            Handle::Read(db) => db.begin_read(),
        }
    }

    /// Fails on a store opened read-only: the queue tools that only look never write.
    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        match self.handle() {
            Handle::Write(db) => db.begin_write().map_err(StoreError::from_redb),
            Handle::Read(_) => Err(StoreError::Io("the store is open read-only".to_owned())),
        }
    }
}

fn open_db(path: &Path) -> Result<Database, redb::DatabaseError> {
    // redb caches up to 1 GiB by default; a gateway has 512 MB in all. Reads beyond the cache
    // come from the OS page cache, and the hot part (the outbox head) stays cached.
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

fn open_db_read_only(path: &Path) -> Result<ReadOnlyDatabase, redb::DatabaseError> {
    Database::builder()
        .set_cache_size(CACHE_BYTES)
        .open_read_only(path)
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => {
            StoreError::Corrupted {
                path: path.to_path_buf(),
                detail,
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::WouldBlock =>
        {
            StoreError::Locked {
                path: path.to_path_buf(),
            }
        }
        // redb reports a file that is not (or no longer) a database as InvalidData.
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupted {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => io_error(io),
        other => StoreError::Corrupted {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// Rename a damaged store to `<name>.damaged-<UTC time>` beside it.
fn move_aside(path: &Path, detail: String) -> StoreError {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let mut kept = path.as_os_str().to_owned();
    kept.push(format!(".damaged-{stamp}"));
    let kept = PathBuf::from(kept);
    match std::fs::rename(path, &kept) {
        Ok(()) => StoreError::MovedAside {
            path: path.to_path_buf(),
            kept,
            detail,
        },
        Err(e) => StoreError::Corrupted {
            path: path.to_path_buf(),
            detail: format!(
                "{detail}; moving it aside failed too ({e}): move or restore it by hand"
            ),
        },
    }
}

pub(crate) fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn age_secs(t: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    ((now - t).num_milliseconds().max(0) as f64) / 1000.0
}
