//! The one path every clocking takes into the store, whatever its source: give it an id, its
//! terminal's local offset and a status, then commit it durably (group commit).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::Utc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{AccessStatus, Clocking, NewClocking};
use crate::store::{IngestOutcome, StoreError, WriterHandle};

#[derive(Clone)]
pub struct Ingest {
    config: Arc<Config>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(config: Arc<Config>, writer: WriterHandle, metrics: Arc<Metrics>) -> Ingest {
        Ingest {
            config,
            writer,
            metrics,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Turn new clockings into stored ones. Every terminal must be configured (callers validate
    /// first); returns after the fsync'd commit, one outcome per clocking, in order.
    ///
    /// A clocking without a status is decided by the access engine inside the store's writer,
    /// in arrival order and in the commit that stores it. One with a status keeps it: a status
    /// reported by a terminal passes through, and one from a cloud source (Protime, Aktion) is
    /// a mirror, whose presence effect is applied and whose status is compared with the local one.
    pub async fn submit(&self, batch: Vec<NewClocking>) -> Result<Vec<IngestOutcome>, StoreError> {
        self.submit_with_state(batch, Vec::new()).await
    }

    /// [`submit`](Self::submit), writing `state` values (a source's watermark) in the same
    /// transaction: the watermark advances exactly when the clockings it covers are stored.
    /// Cloud sources may name terminals that are not configured (`crosschex-<serial>`...); those
    /// read their wall clock in `agent.timezone`.
    pub async fn submit_with_state(
        &self,
        batch: Vec<NewClocking>,
        state: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let now = Utc::now();
        let site = &self.config.agent.site;
        let mut clockings = Vec::with_capacity(batch.len());
        let mut decide = Vec::with_capacity(batch.len());
        for new in batch {
            self.metrics.count_received(new.source, 1);
            let tz = self
                .config
                .terminal(&new.terminal)
                .map_or(self.config.agent.timezone, |t| t.timezone);
            decide.push(new.status.is_none());
            // The engine replaces the placeholder of an undecided clocking before it is stored.
            let status = new.status.unwrap_or(AccessStatus::AccessOk);
            clockings.push(Clocking::from_new(site, tz, new, status, now));
        }
        match self.writer.ingest_deciding(clockings, decide, state).await {
            Ok(outcomes) => {
                let stored = outcomes.iter().filter(|o| o.stored).count() as u64;
                self.metrics.stored.fetch_add(stored, Ordering::Relaxed);
                self.metrics
                    .duplicates
                    .fetch_add(outcomes.len() as u64 - stored, Ordering::Relaxed);
                for o in outcomes.iter().filter(|o| o.stored) {
                    tracing::debug!(id = %o.id, "clocking stored");
                }
                Ok(outcomes)
            }
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                if matches!(e, StoreError::Full(_)) {
                    self.metrics.store_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }
}
