//! Protime sink: each clocking becomes a `POST /clockings` (kind InOut, the tenant's wall clock,
//! person by `@badge-number`, terminal by `@external-code`), confirmed to the store on 201/202.
//!
//! Protime has no idempotency key, so a POST whose answer was lost may have landed. Before every
//! POST the sink durably records the clocking as "in doubt"; if the answer is lost, or the agent
//! dies mid-request, the next attempt first looks the clocking up (`GET /clockings?filter=..`)
//! and only POSTs when it is not there. Never a duplicate in Protime.
//!
//! A clocking Protime rejects (400: unknown badge, bad terminal code...) cannot succeed by
//! retrying: it becomes a dead letter with Protime's reasons, visible in `queue stats`,
//! `/metrics` and `status`, and replayable with `badgegate queue replay-dead-letters` once the
//! cause is fixed. It never blocks the queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Timelike;
use chrono_tz::Tz;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::clouds::protime::{
    ClockingKind, PersonRef, ProtimeClient, ProtimeClocking, TerminalRef,
};
use crate::clouds::{CloudError, ErrorKind};
use crate::metrics::Metrics;
use crate::model::Clocking;
use crate::store::{Change, SinkId, Store, StoreError, WriterHandle};

/// State key: the seq of the clocking whose POST may or may not have landed.
const IN_DOUBT: &str = "protime.in_doubt";

pub struct ProtimeSink {
    client: ProtimeClient,
    tz: Tz,
    store: Arc<Store>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
}

/// What Protime gets for a clocking: date and minute of day in the tenant's zone.
pub fn to_protime(c: &Clocking, tenant_tz: Tz) -> ProtimeClocking {
    let local = c.occurred_at.with_timezone(&tenant_tz);
    ProtimeClocking {
        person: PersonRef::BadgeNumber(c.badge.clone()),
        date: local.date_naive(),
        time_of_day_in_minutes: (local.hour() * 60 + local.minute()) as i32,
        kind: ClockingKind::InOut,
        terminal: Some(TerminalRef::ExternalCode(c.terminal.clone())),
    }
}

impl ProtimeSink {
    pub fn new(
        client: ProtimeClient,
        tz: Tz,
        store: Arc<Store>,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> ProtimeSink {
        ProtimeSink {
            client,
            tz,
            store,
            writer,
            metrics,
        }
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut committed = self.writer.committed();
        loop {
            if *shutdown.borrow() {
                return;
            }
            committed.borrow_and_update();
            let next = match self.next_pending().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "reading the Protime queue failed");
                    None
                }
            };
            let Some((seq, clocking)) = next else {
                // Nothing to send: wait for new clockings (or a replay of dead letters).
                tokio::select! {
                    r = committed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };
            let delay = match self.deliver(seq, &clocking).await {
                Ok(()) => {
                    backoff.reset();
                    self.metrics
                        .protime
                        .connected
                        .store(true, Ordering::Relaxed);
                    self.metrics.protime.set_error(None);
                    continue;
                }
                Err(delay) => delay.unwrap_or_else(|| backoff.next_delay()),
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn next_pending(&self) -> Result<Option<(u64, Clocking)>, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.pending(SinkId::Protime, None, 1))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map(|mut v| v.pop())
    }

    fn in_doubt(&self) -> Option<u64> {
        self.store
            .state(IN_DOUBT)
            .ok()
            .flatten()
            .and_then(|b| b.try_into().ok().map(u64::from_be_bytes))
    }

    async fn set_in_doubt(&self, seq: Option<u64>) -> Result<(), StoreError> {
        let value = seq.map_or_else(Vec::new, |s| s.to_be_bytes().to_vec());
        self.writer
            .change(Change::PutState {
                key: IN_DOUBT.into(),
                value,
            })
            .await
            .map(|_| ())
    }

    /// Deliver one clocking. Err carries how long to wait before trying again (None: backoff).
    async fn deliver(&self, seq: u64, c: &Clocking) -> Result<(), Option<Duration>> {
        let pc = to_protime(c, self.tz);
        if self.in_doubt() == Some(seq) {
            match self.client.find_clocking(&pc).await {
                Ok(Some(found)) => {
                    tracing::info!(id = %c.id, protime_id = found.id, "a POST whose answer was lost had landed; not sending it again");
                    return self.confirmed(seq, c).await;
                }
                Ok(None) => {}
                Err(e) => return Err(self.failed(c, e)),
            }
        }
        // Write-ahead: if the answer is lost or the agent dies from here on, the next attempt
        // looks first.
        if let Err(e) = self.set_in_doubt(Some(seq)).await {
            tracing::error!(error = %e, "cannot record the Protime delivery attempt; not sending");
            return Err(None);
        }
        match self.client.post_clocking(&pc).await {
            Ok(_) => self.confirmed(seq, c).await,
            Err(e) => match &e.kind {
                ErrorKind::Rejected { reasons } => {
                    let reason = reasons.join("; ");
                    tracing::warn!(id = %c.id, badge = %c.badge, terminal = %c.terminal, %reason, "Protime rejected the clocking: dead letter (replay after fixing the cause)");
                    let dead = self
                        .writer
                        .change(Change::DeadLetter {
                            sink: SinkId::Protime,
                            seq,
                            reason,
                        })
                        .await;
                    let cleared = self.set_in_doubt(None).await;
                    if dead.is_err() || cleared.is_err() {
                        return Err(None);
                    }
                    self.metrics
                        .protime_dead_letters
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                _ => Err(self.failed(c, e)),
            },
        }
    }

    async fn confirmed(&self, seq: u64, c: &Clocking) -> Result<(), Option<Duration>> {
        if let Err(e) = self
            .writer
            .confirm_and_wait(SinkId::Protime, vec![seq])
            .await
        {
            tracing::error!(error = %e, "recording a Protime confirmation failed");
            return Err(None);
        }
        if let Err(e) = self.set_in_doubt(None).await {
            tracing::error!(error = %e, "clearing the in-doubt mark failed");
        }
        self.metrics
            .protime
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id = %c.id, "delivered to Protime");
        Ok(())
    }

    /// Log and count a failure; returns the vendor's requested pause, if any.
    fn failed(&self, c: &Clocking, e: CloudError) -> Option<Duration> {
        let transient = e.is_transient();
        self.metrics.protime.connected.store(
            !matches!(
                e.kind,
                ErrorKind::Unreachable { .. } | ErrorKind::Network { .. }
            ),
            Ordering::Relaxed,
        );
        self.metrics.protime.set_error(Some(e.to_string()));
        if e.may_have_landed() {
            // Not a configuration problem: the next attempt looks the clocking up first.
            tracing::warn!(id = %c.id, error = %e, "Protime's answer was lost; looking the clocking up before sending it again");
        } else if transient {
            tracing::warn!(id = %c.id, error = %e, "Protime delivery failed; will retry");
        } else {
            tracing::error!(id = %c.id, error = %e, "Protime delivery failed; check the configuration (will retry)");
        }
        match e.kind {
            ErrorKind::RateLimited { retry_after, .. } => retry_after,
            _ => None,
        }
    }
}
