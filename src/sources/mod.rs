//! Pollers that turn what the clouds know into clockings, and people and shifts for the access
//! engine: watermarks, overlap windows, dedupe across polls, and the loop that paces them. The
//! vendor wire formats live in `clouds/`; this is what the agent does with the data.
//!
//! - [`protime`]: the Protime mirror (access clockings by delta, people).
//! - [`crosschex`]: CrossChex Cloud attendance records.
//! - [`aktion`]: Aktion persons, scheduled shifts and C4 passages.
//!
//! Every poller keeps its position (watermark, delta link, held versions) in the store and
//! advances it in the SAME transaction as the clockings it covers
//! ([`Ingest::submit_with_state`](crate::ingest::Ingest::submit_with_state)): an agent killed
//! mid-sync resumes exactly where the last commit left it, without a gap and without storing a
//! clocking twice.

pub mod aktion;
pub mod crosschex;
pub mod protime;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::clouds::{CloudError, ErrorKind};
use crate::config::{is_topic_safe, Config, TerminalConfig};
use crate::ingest::Ingest;
use crate::metrics::SourceHealth;
use crate::model::{Direction, NewClocking};
use crate::store::StoreError;

/// What a poll achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// Everything the cloud had is read: wait for the poll interval.
    CaughtUp,
    /// More is waiting (a long backlog read in bounded steps): poll again at once (the client's
    /// rate limiter still spaces the requests).
    Behind,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("storing what was read failed: {0}")]
    Store(#[from] StoreError),
}

impl SourceError {
    /// The pause the vendor asked for, if any.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Cloud(CloudError {
                kind: ErrorKind::RateLimited { retry_after, .. },
                ..
            }) => *retry_after,
            _ => None,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            SourceError::Cloud(e) => e.is_transient(),
            SourceError::Store(_) => true,
        }
    }
}

/// One cloud source: [`run`] calls `poll` until shutdown.
pub(crate) trait Poller: Send {
    fn poll(&mut self) -> impl Future<Output = Result<Round, SourceError>> + Send;
}

/// The loop every source shares: poll, then wait `every` (or at once when behind); after a
/// failure wait what the vendor asked for or a backoff (1 s doubling to 5 min, jittered), so an
/// unwell cloud never sees a request storm. Shutdown interrupts a poll: what it committed stays,
/// and the next start resumes from there.
pub(crate) async fn run<P: Poller>(
    name: &'static str,
    mut poller: P,
    every: Duration,
    health: Arc<SourceHealth>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        if *shutdown.borrow() {
            return;
        }
        let result = tokio::select! {
            r = poller.poll() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let wait = match result {
            Ok(round) => {
                health.succeeded();
                backoff.reset();
                match round {
                    Round::CaughtUp => every,
                    Round::Behind => Duration::ZERO,
                }
            }
            Err(e) => {
                health.failed(e.to_string());
                let wait = e.retry_after().unwrap_or_else(|| backoff.next_delay());
                if e.is_transient() {
                    tracing::warn!(source = name, error = %e, retry_in_ms = wait.as_millis() as u64, "cloud source poll failed; will retry");
                } else {
                    tracing::error!(source = name, error = %e, retry_in_ms = wait.as_millis() as u64, "cloud source poll failed; check the configuration (will retry)");
                }
                wait
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Which configured terminal a vendor device is, by the key a terminal claims it with.
#[derive(Debug, Clone)]
pub(crate) struct Terminals {
    prefix: &'static str,
    claimed: HashMap<String, TerminalConfig>,
}

impl Terminals {
    /// Devices claimed through `key` (e.g. `crosschex_serial`); unclaimed ones become
    /// `<prefix>-<device>`.
    pub fn new(
        config: &Config,
        prefix: &'static str,
        key: impl Fn(&TerminalConfig) -> Option<&String>,
    ) -> Terminals {
        let claimed = config
            .terminals
            .iter()
            .filter_map(|t| key(t).map(|d| (d.clone(), t.clone())))
            .collect();
        Terminals { prefix, claimed }
    }

    /// The terminal id for `device`, and the direction it fixes (if it does).
    pub fn for_device(&self, device: &str) -> (String, Option<Direction>) {
        match self.claimed(device) {
            Some(t) => (t.id.clone(), t.direction),
            None => (default_terminal_id(self.prefix, device), None),
        }
    }

    /// The configured terminal claiming `device`.
    pub fn claimed(&self, device: &str) -> Option<&TerminalConfig> {
        self.claimed.get(device)
    }
}

/// The terminal id of a vendor device no terminal claims: `<prefix>-<device>` when that is
/// topic-safe; otherwise the unsafe characters become `_` and 8 hex digits of the device's hash
/// are appended, so that two devices never share an id.
pub fn default_terminal_id(prefix: &str, device: &str) -> String {
    let plain = format!("{prefix}-{device}");
    if is_topic_safe(&plain) {
        return plain;
    }
    let safe: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = Sha256::digest(device.as_bytes());
    let tag: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{safe}-{tag}")
}

/// A clocking's direction: the vendor's when it knows one, else the terminal's fixed one.
pub(crate) fn direction(vendor: Direction, fixed: Option<Direction>) -> Direction {
    match vendor {
        Direction::Unknown => fixed.unwrap_or(Direction::Unknown),
        known => known,
    }
}

/// Stores `batch` with the source's new `state`, in one transaction, and counts what was new.
pub(crate) async fn store(
    ingest: &Ingest,
    health: &SourceHealth,
    batch: Vec<NewClocking>,
    state: Vec<(String, Vec<u8>)>,
) -> Result<(), StoreError> {
    let outcomes = ingest.submit_with_state(batch, state).await?;
    let new = outcomes.iter().filter(|o| o.stored).count() as u64;
    health.clockings.fetch_add(new, Ordering::Relaxed);
    Ok(())
}

/// Counts and logs a vendor item that cannot become a clocking.
pub(crate) fn skip(health: &SourceHealth, source: &'static str, item: &str, why: &str) {
    health.skipped.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(source, item, why, "cloud item not turned into a clocking");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_terminal_ids_are_topic_safe_and_distinct() {
        assert_eq!(
            default_terminal_id("crosschex", "1750120622290025"),
            "crosschex-1750120622290025"
        );
        let a = default_terminal_id("aktion", "C4 #1/north");
        let b = default_terminal_id("aktion", "C4 #1 north");
        assert!(is_topic_safe(&a) && is_topic_safe(&b), "{a} {b}");
        assert!(a.starts_with("aktion-C4__1_north-"), "{a}");
        assert_ne!(a, b, "same sanitised text, different devices");
        assert_eq!(a, default_terminal_id("aktion", "C4 #1/north"), "stable");
        assert!(is_topic_safe(&default_terminal_id("crosschex", "")));
    }

    #[test]
    fn a_vendor_direction_wins_over_the_terminal_default() {
        assert_eq!(
            direction(Direction::Unknown, Some(Direction::In)),
            Direction::In
        );
        assert_eq!(
            direction(Direction::Out, Some(Direction::In)),
            Direction::Out
        );
        assert_eq!(direction(Direction::Unknown, None), Direction::Unknown);
    }
}
