//! CrossChex Cloud source: attendance records become clockings with `source: "crosschex"`.
//!
//! - **Watermark with an overlap.** The store holds how far the records are read (`through`, in
//!   the account's `checktime` labels, which is what the server compares). Each poll reads
//!   `[through - overlap, now]`: devices upload late, so the overlap is read again, and the
//!   records of it already stored are recognised by their key (`uuid` when the account sends one,
//!   else device serial, workno, checktime and checktype) and not submitted again. The new
//!   watermark and those keys are committed with the clockings, in one transaction.
//! - **Bounded steps.** A long gap (first start, an outage of days) is read in windows of at
//!   most [`MAX_WINDOW`], each committed on its own, so a restart resumes where it stopped.
//! - **Time.** `checktime` says `+00:00`; `sources.crosschex.checktime` says what it is: the
//!   device's wall clock in `sources.crosschex.timezone` (`local`, the default) or UTC (`utc`).
//!   The window's bounds are labelled the same way.
//! - **Identity.** The badge is the employee's `workno`; the terminal is the one claiming the
//!   device's serial (`terminals[].crosschex_serial`), else `crosschex-<serial>`. CrossChex has
//!   no direction (`checktype` is the verification mode): `unknown`, or the terminal's fixed
//!   one; no status: the local access engine decides it.
//! - **Pacing.** The client spaces requests by `request_interval_ms` (CrossChex answers
//!   `FREQUENT_REQUEST` below about 15 s) and backs off on `FREQUENT_REQUEST`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{direction, skip, store, Poller, Round, SourceError, Terminals};
use crate::clouds::crosschex::{checktime_label, CrossChexClient, CrossChexRecord, RecordKey};
use crate::clouds::{CloudError, HttpOptions};
use crate::config::{CheckTime, Config, CrossChexConfig};
use crate::ingest::Ingest;
use crate::metrics::SourceHealth;
use crate::model::{valid_badge, Direction, NewClocking, Source};
use crate::store::Store;

/// State key of the [`Cursor`].
pub const STATE_KEY: &str = "crosschex.cursor";
/// The longest window read (and committed) in one step.
pub const MAX_WINDOW: chrono::Duration = chrono::Duration::hours(24);
const NAME: &str = "crosschex";

/// How far the records are read, and the keys of those stored in the overlap behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Every record labelled up to here (the account's wall clock) has been read.
    pub through: NaiveDateTime,
    /// Records already stored whose label lies within the overlap behind `through`.
    pub seen: Vec<(RecordKey, NaiveDateTime)>,
}

impl Cursor {
    /// The window of the next read: the overlap behind `through`, up to `now` (at most
    /// [`MAX_WINDOW`] past `through`).
    pub fn window(
        &self,
        now: NaiveDateTime,
        overlap: chrono::Duration,
    ) -> (NaiveDateTime, NaiveDateTime) {
        let end = now.min(self.through + MAX_WINDOW).max(self.through);
        (self.through - overlap, end)
    }

    /// The records of a read up to `end` that are new, and the cursor after them: the keys of
    /// the overlap behind `end` are kept, older ones forgotten.
    pub fn advance<'a>(
        &self,
        records: &'a [CrossChexRecord],
        end: NaiveDateTime,
        overlap: chrono::Duration,
    ) -> (Vec<&'a CrossChexRecord>, Cursor) {
        let mut known: HashSet<RecordKey> = self.seen.iter().map(|(k, _)| k.clone()).collect();
        let mut seen = self.seen.clone();
        let mut new = Vec::new();
        for r in records {
            let key = r.key();
            if known.insert(key.clone()) {
                seen.push((key, r.checktime));
                new.push(r);
            }
        }
        let through = end.max(self.through);
        seen.retain(|(_, t)| *t >= through - overlap);
        (new, Cursor { through, seen })
    }
}

pub struct CrossChexSource {
    client: CrossChexClient,
    tz: Tz,
    reading: CheckTime,
    overlap: chrono::Duration,
    lookback: chrono::Duration,
    poll_every: Duration,
    terminals: Terminals,
    ingest: Ingest,
    store: Arc<Store>,
    health: Arc<SourceHealth>,
    cursor: Option<Cursor>,
}

/// The client's pacing: requests `request_interval_ms` apart, and the same as the first pause
/// after a `FREQUENT_REQUEST`.
pub fn http_options(cfg: &CrossChexConfig) -> HttpOptions {
    let spacing = Duration::from_millis(cfg.request_interval_ms);
    HttpOptions {
        min_interval: spacing,
        backoff_min: spacing,
        backoff_max: spacing.saturating_mul(8),
        ..HttpOptions::crosschex()
    }
}

impl CrossChexSource {
    pub fn new(
        cfg: &CrossChexConfig,
        config: &Config,
        ingest: Ingest,
        store: Arc<Store>,
        health: Arc<SourceHealth>,
    ) -> Result<CrossChexSource, CloudError> {
        Ok(CrossChexSource {
            client: CrossChexClient::new(cfg, http_options(cfg))?,
            tz: cfg.timezone,
            reading: cfg.checktime,
            overlap: chrono::Duration::minutes(i64::from(cfg.overlap_mins)),
            lookback: chrono::Duration::hours(i64::from(cfg.lookback_hours)),
            poll_every: Duration::from_secs(cfg.poll_interval_secs),
            terminals: Terminals::new(config, NAME, |t| t.crosschex_serial.as_ref()),
            ingest,
            store,
            health,
            cursor: None,
        })
    }

    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let every = self.poll_every;
        let health = self.health.clone();
        super::run(NAME, self, every, health, shutdown).await;
    }

    /// The stored cursor, or a fresh one `lookback` behind `now`. A stored value that cannot be
    /// read (written by another version) is replaced: the lookback re-read is harmless, since
    /// clockings are deduplicated by content.
    fn load_cursor(&self, now: NaiveDateTime) -> Result<Cursor, SourceError> {
        let fresh = || Cursor {
            through: now - self.lookback,
            seen: Vec::new(),
        };
        Ok(match self.store.state(STATE_KEY)? {
            None => fresh(),
            Some(bytes) => postcard::from_bytes(&bytes).unwrap_or_else(|e| {
                tracing::warn!(source = NAME, error = %e, "stored watermark unreadable; reading the lookback window again");
                fresh()
            }),
        })
    }

    fn clocking(&self, r: &CrossChexRecord) -> Option<NewClocking> {
        let badge = r.workno.trim();
        if !valid_badge(badge) {
            skip(
                &self.health,
                NAME,
                &format!("device {} at {}", r.device_serial, r.checktime),
                "workno is not a usable badge (1 to 64 printable characters)",
            );
            return None;
        }
        let (terminal, fixed) = self.terminals.for_device(&r.device_serial);
        Some(NewClocking {
            terminal,
            badge: badge.to_owned(),
            occurred_at: r.occurred_at(self.reading, self.tz),
            direction: direction(Direction::Unknown, fixed),
            status: None,
            person: None,
            source: Source::Crosschex,
        })
    }
}

impl Poller for CrossChexSource {
    async fn poll(&mut self) -> Result<Round, SourceError> {
        let now = checktime_label(Utc::now(), self.reading, self.tz);
        let cursor = match self.cursor.take() {
            Some(c) => c,
            None => self.load_cursor(now)?,
        };
        let (begin, end) = cursor.window(now, self.overlap);
        let records = match self.client.get_records(begin, end).await {
            Ok(r) => r,
            Err(e) => {
                self.cursor = Some(cursor);
                return Err(e.into());
            }
        };
        let (new, next) = cursor.advance(&records, end, self.overlap);
        let batch: Vec<NewClocking> = new.iter().filter_map(|r| self.clocking(r)).collect();
        let state = postcard::to_allocvec(&next)
            .map_err(|e| crate::store::StoreError::Io(format!("encoding the watermark: {e}")))?;
        if let Err(e) = store(
            &self.ingest,
            &self.health,
            batch,
            vec![(STATE_KEY.to_owned(), state)],
        )
        .await
        {
            self.cursor = Some(cursor);
            return Err(e.into());
        }
        tracing::debug!(source = NAME, %begin, %end, read = records.len(), new = new.len(), "records read");
        self.health
            .set_position(format!("through {} (account time)", next.through));
        let behind = next.through < now;
        self.cursor = Some(next);
        Ok(if behind {
            Round::Behind
        } else {
            Round::CaughtUp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("time")
    }

    fn record(uuid: Option<&str>, workno: &str, t: &str) -> CrossChexRecord {
        CrossChexRecord {
            uuid: uuid.map(str::to_owned),
            checktype: 56,
            checktime: at(t),
            device_serial: "1750120622290025".into(),
            device_name: None,
            workno: workno.into(),
            first_name: None,
            last_name: None,
        }
    }

    #[test]
    fn the_window_reaches_back_by_the_overlap_and_forward_in_bounded_steps() {
        let overlap = chrono::Duration::hours(2);
        let c = Cursor {
            through: at("2026-03-02 10:00:00"),
            seen: vec![],
        };
        assert_eq!(
            c.window(at("2026-03-02 10:05:00"), overlap),
            (at("2026-03-02 08:00:00"), at("2026-03-02 10:05:00"))
        );
        // Days behind: one day per step.
        assert_eq!(
            c.window(at("2026-03-09 00:00:00"), overlap).1,
            at("2026-03-03 10:00:00")
        );
        // A clock set back never moves the watermark backwards.
        assert_eq!(
            c.window(at("2026-03-02 09:00:00"), overlap).1,
            at("2026-03-02 10:00:00")
        );
    }

    #[test]
    fn the_overlap_is_deduplicated_by_uuid_or_tuple_and_old_keys_are_forgotten() {
        let overlap = chrono::Duration::hours(2);
        let start = Cursor {
            through: at("2026-03-02 06:00:00"),
            seen: vec![],
        };
        let first = vec![
            record(Some("u1"), "7", "2026-03-02 07:00:00"),
            record(None, "8", "2026-03-02 09:30:00"),
            record(None, "8", "2026-03-02 09:30:00"), // listed twice by the server
        ];
        let (new, c1) = start.advance(&first, at("2026-03-02 10:00:00"), overlap);
        assert_eq!(new.len(), 2);
        assert_eq!(c1.through, at("2026-03-02 10:00:00"));
        // 07:00 lies before the next window (08:00..): its key is not kept.
        assert_eq!(c1.seen.len(), 1);

        // The next read overlaps: 09:30 comes back, plus a late upload from 08:30.
        let second = vec![
            record(None, "8", "2026-03-02 09:30:00"),
            record(Some("late"), "9", "2026-03-02 08:30:00"),
        ];
        let (new, c2) = c1.advance(&second, at("2026-03-02 10:30:00"), overlap);
        assert_eq!(
            new.iter().map(|r| r.workno.as_str()).collect::<Vec<_>>(),
            ["9"]
        );
        let mut kept: Vec<_> = c2.seen.iter().map(|(_, t)| *t).collect();
        kept.sort();
        assert_eq!(kept, [at("2026-03-02 08:30:00"), at("2026-03-02 09:30:00")]);
        let (_, c3) = c2.advance(&[], at("2026-03-02 11:00:00"), overlap);
        assert_eq!(
            c3.seen.len(),
            1,
            "08:30 fell out of the overlap behind 11:00"
        );
        let bytes = postcard::to_allocvec(&c3).expect("encode");
        assert_eq!(postcard::from_bytes::<Cursor>(&bytes).expect("decode"), c3);
    }
}
