//! Protime sink: each clocking becomes a `POST /clockings` (kind InOut, the tenant's wall clock,
//! person by an external reference, terminal by `@external-code`), confirmed to the store on
//! 201/202.
//!
//! The person is the clocking's badge value, sent as `@badge-number` or `@employee-number`
//! ([`PersonRefs`]): the terminal's `protime_person_ref` wins, then its source's (a TC-B user id
//! or a CrossChex `workno` is often the employee number), then `sinks.protime.person_ref`. The
//! duplicate lookup below asks for and matches on the same reference kind as the POST.
//!
//! Protime has no idempotency key, so a POST may have landed although no success came back: the
//! answer was lost, the request timed out, the connection was reset, or whatever sits in front of
//! Protime (its gateway, a reverse proxy) answered 5xx or 408 while the backend went on and
//! stored it. Before every POST the sink durably records the clocking as "in doubt"; the next
//! attempt at an in-doubt clocking first looks it up (`GET /clockings?filter=..`) and only POSTs
//! when it is not there. Never a blind retry of a POST, never a duplicate in Protime.
//!
//! The lookup cannot tell two of our clockings apart when Protime keeps them identically: one
//! badge, one terminal, one minute (an In and an Out a few seconds apart, a double badge), since
//! the agent sends them as the same InOut minute. So it counts. The [`Ledger`] remembers the key
//! ([`clocking_key`]) of the last [`RECENT`] clockings delivered; the in-doubt clocking landed
//! iff Protime lists MORE clockings matching it than the ledger holds delivered ones with its
//! key. Clockings with one key come from one terminal within one minute, so they sit next to each
//! other in the queue, far inside the ledger's window. Protime keeps soft-deleted clockings in
//! its lists, so an HR deletion does not upset the count. Whichever day Protime books a clocking
//! on (overnight shifts: a 00:30 clocking may be booked the day before at minute 1470), the
//! lookup compares instants, not dates (see [`ProtimeClient::find_clocking`]).
//!
//! A clocking Protime refuses for good (400: unknown badge, bad terminal code...; 404, 409, 422)
//! cannot succeed by retrying: it becomes a dead letter with Protime's reasons, visible in
//! `queue stats`, `/metrics` and `status`, and replayable with
//! `badgegate queue replay-dead-letters` once the cause is fixed. It never blocks the queue.
//! A refused token or call (401/403: a missing scope, revoked credentials) is a configuration
//! problem, not the clocking's: the queue waits, retrying every [`CONFIG_RETRY`], and the error
//! names the scope to grant (logged at error, and shown as Protime's last error in `status`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Timelike;
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::clouds::protime::{
    scope_for_call, ClockingKind, PersonRef, ProtimeClient, ProtimeClocking, TerminalRef,
    CALL_TOKEN,
};
use crate::clouds::{CloudError, ErrorKind};
use crate::config::{Config, ProtimePersonRef};
use crate::metrics::Metrics;
use crate::model::{Clocking, Source};
use crate::store::{Change, SinkId, Store, StoreError, WriterHandle};

/// State key of the [`Ledger`] (postcard).
const LEDGER: &str = "protime.ledger";
/// Before the ledger, the seq in doubt (8 bytes, big-endian): read once when upgrading.
const LEGACY_IN_DOUBT: &str = "protime.in_doubt";
/// Deliveries the ledger remembers (about 4 KB of state).
pub const RECENT: usize = 256;
/// How often a refused token or call is tried again: the fix is a human's.
pub const CONFIG_RETRY: Duration = Duration::from_secs(60);

/// What Protime keeps of a clocking, hashed: two clockings with one key are indistinguishable
/// in Protime's lists.
pub type ClockingKey = [u8; 8];

/// The sink's durable memory: which clocking may have landed without us seeing a success, and
/// the keys of the last [`RECENT`] delivered ones, to count against the lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub in_doubt: Option<u64>,
    /// (seq, key), oldest first.
    pub recent: VecDeque<(u64, ClockingKey)>,
}

impl Ledger {
    /// Whether `seq` is known delivered (recorded, but the store's confirmation may not have
    /// been committed before a crash).
    pub fn delivered(&self, seq: u64) -> bool {
        self.recent.iter().any(|(s, _)| *s == seq)
    }

    /// Our other clockings with `key` Protime already holds.
    pub fn delivered_with_key(&self, seq: u64, key: ClockingKey) -> usize {
        self.recent
            .iter()
            .filter(|(s, k)| *s != seq && *k == key)
            .count()
    }

    /// The in-doubt clocking landed iff Protime lists more matches than we delivered before.
    pub fn landed(&self, seq: u64, key: ClockingKey, matches_in_protime: usize) -> bool {
        matches_in_protime > self.delivered_with_key(seq, key)
    }

    /// `seq` is delivered: remembered, no longer in doubt.
    pub fn record(&mut self, seq: u64, key: ClockingKey) {
        if !self.delivered(seq) {
            self.recent.push_back((seq, key));
        }
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        self.in_doubt = None;
    }
}

/// The key of what Protime keeps of `pc`: person, terminal, instant (as an absolute minute, so
/// a re-dated clocking keeps its key) and kind.
pub fn clocking_key(pc: &ProtimeClocking) -> ClockingKey {
    let mut h = Sha256::new();
    match &pc.person {
        PersonRef::Id(id) => h.update(format!("person-id:{id}")),
        PersonRef::BadgeNumber(b) => h.update(format!("badge:{b}")),
        PersonRef::EmployeeNumber(n) => h.update(format!("employee:{n}")),
    }
    h.update([0x1f]);
    match &pc.terminal {
        None => h.update("no-terminal"),
        Some(TerminalRef::Id(id)) => h.update(format!("terminal-id:{id}")),
        Some(TerminalRef::ExternalCode(code)) => h.update(format!("terminal:{code}")),
    }
    h.update([0x1f]);
    h.update(pc.absolute_minute().to_be_bytes());
    h.update(format!("{:?}", pc.kind));
    let digest = h.finalize();
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    key
}

/// Which person reference each clocking's badge is sent as: the terminal's setting, else its
/// source's, else the sink's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersonRefs {
    pub default: ProtimePersonRef,
    pub by_terminal: HashMap<String, ProtimePersonRef>,
    pub by_source: HashMap<Source, ProtimePersonRef>,
}

impl PersonRefs {
    /// `sinks.protime.person_ref`, `terminals[].protime_person_ref` and
    /// `sources.{crosschex,aktion}.protime_person_ref`.
    pub fn from_config(config: &Config) -> PersonRefs {
        let default = config
            .sinks
            .protime
            .as_ref()
            .map(|p| p.person_ref)
            .unwrap_or_default();
        let by_terminal = config
            .terminals
            .iter()
            .filter_map(|t| Some((t.id.clone(), t.protime_person_ref?)))
            .collect();
        let sources = &config.sources;
        let by_source = [
            (
                Source::Crosschex,
                sources
                    .crosschex
                    .as_ref()
                    .and_then(|c| c.protime_person_ref),
            ),
            (
                Source::Aktion,
                sources.aktion.as_ref().and_then(|a| a.protime_person_ref),
            ),
        ]
        .into_iter()
        .filter_map(|(source, r)| Some((source, r?)))
        .collect();
        PersonRefs {
            default,
            by_terminal,
            by_source,
        }
    }

    pub fn kind_for(&self, c: &Clocking) -> ProtimePersonRef {
        self.by_terminal
            .get(&c.terminal)
            .or_else(|| self.by_source.get(&c.source))
            .copied()
            .unwrap_or(self.default)
    }

    /// The person of `c` as Protime is told (and asked about) it.
    pub fn person(&self, c: &Clocking) -> PersonRef {
        match self.kind_for(c) {
            ProtimePersonRef::BadgeNumber => PersonRef::BadgeNumber(c.badge.clone()),
            ProtimePersonRef::EmployeeNumber => PersonRef::EmployeeNumber(c.badge.clone()),
        }
    }
}

pub struct ProtimeSink {
    client: ProtimeClient,
    tz: Tz,
    person_refs: PersonRefs,
    retry_max: Duration,
    store: Arc<Store>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    ledger: Ledger,
    /// The pre-ledger in-doubt mark still in the store (cleared once the ledger is written).
    legacy_mark: bool,
}

/// What Protime gets for a clocking: the person by the reference `refs` names for it, date and
/// minute of day in the tenant's zone.
pub fn to_protime(c: &Clocking, tenant_tz: Tz, refs: &PersonRefs) -> ProtimeClocking {
    let local = c.occurred_at.with_timezone(&tenant_tz);
    ProtimeClocking {
        person: refs.person(c),
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
        person_refs: PersonRefs,
        retry_max: Duration,
        store: Arc<Store>,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> ProtimeSink {
        let mut ledger = match store.state(LEDGER) {
            Ok(Some(bytes)) if !bytes.is_empty() => postcard::from_bytes(&bytes)
                .unwrap_or_else(|e| {
                    // Losing it only costs the count: the in-doubt clocking is looked up anyway.
                    tracing::error!(error = %e, "the Protime delivery ledger is unreadable; starting a new one");
                    Ledger::default()
                }),
            Ok(_) => Ledger::default(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the Protime delivery ledger; starting a new one");
                Ledger::default()
            }
        };
        let legacy = store
            .state(LEGACY_IN_DOUBT)
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        if ledger.in_doubt.is_none() {
            ledger.in_doubt = legacy;
        }
        ProtimeSink {
            client,
            tz,
            person_refs,
            retry_max,
            store,
            writer,
            metrics,
            ledger,
            legacy_mark: legacy.is_some(),
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), self.retry_max);
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

    async fn save_ledger(&mut self) -> Result<(), StoreError> {
        let value = postcard::to_allocvec(&self.ledger)
            .map_err(|e| StoreError::Io(format!("encoding the Protime ledger: {e}")))?;
        self.writer
            .change(Change::PutState {
                key: LEDGER.into(),
                value,
            })
            .await?;
        if self.legacy_mark {
            self.writer
                .change(Change::PutState {
                    key: LEGACY_IN_DOUBT.into(),
                    value: Vec::new(),
                })
                .await?;
            self.legacy_mark = false;
        }
        Ok(())
    }

    /// Deliver one clocking. Err carries how long to wait before trying again (None: backoff).
    async fn deliver(&mut self, seq: u64, c: &Clocking) -> Result<(), Option<Duration>> {
        let pc = to_protime(c, self.tz, &self.person_refs);
        let key = clocking_key(&pc);
        if self.ledger.delivered(seq) {
            // Recorded as delivered, but the agent stopped before the store confirmed it.
            return self.confirmed(seq, c).await;
        }
        if self.ledger.in_doubt == Some(seq) {
            match self.client.find_clocking(&pc).await {
                Ok(found) if self.ledger.landed(seq, key, found.len()) => {
                    let ids: Vec<String> = found.iter().map(|f| f.id.to_string()).collect();
                    tracing::info!(id = %c.id, protime_ids = %ids.join(","), "a POST without a success answer had landed; not sending it again");
                    return self.delivered(seq, key, c).await;
                }
                Ok(found) => {
                    tracing::info!(id = %c.id, matches = found.len(), "a POST without a success answer had not landed; sending it again");
                }
                Err(e) => return Err(self.failed(c, e)),
            }
        }
        // Write-ahead: if no success is seen or the agent dies from here on, the next attempt
        // looks first.
        self.ledger.in_doubt = Some(seq);
        if let Err(e) = self.save_ledger().await {
            tracing::error!(error = %e, "cannot record the Protime delivery attempt; not sending");
            return Err(None);
        }
        match self.client.post_clocking(&pc).await {
            Ok(_) => self.delivered(seq, key, c).await,
            Err(CloudError {
                kind: ErrorKind::Rejected { reasons },
                ..
            }) => self.dead_letter(seq, c, reasons.join("; ")).await,
            Err(e) => Err(self.failed(c, e)),
        }
    }

    async fn dead_letter(
        &mut self,
        seq: u64,
        c: &Clocking,
        reason: String,
    ) -> Result<(), Option<Duration>> {
        tracing::warn!(id = %c.id, badge = %c.badge, terminal = %c.terminal, %reason, "Protime refused the clocking: dead letter (replay after fixing the cause)");
        let dead = self
            .writer
            .change(Change::DeadLetter {
                sink: SinkId::Protime,
                seq,
                reason,
            })
            .await;
        self.ledger.in_doubt = None;
        let cleared = self.save_ledger().await;
        if dead.is_err() || cleared.is_err() {
            return Err(None);
        }
        self.metrics
            .protime_dead_letters
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Protime holds the clocking: remember it (durably, before the store lets it go) and confirm.
    async fn delivered(
        &mut self,
        seq: u64,
        key: ClockingKey,
        c: &Clocking,
    ) -> Result<(), Option<Duration>> {
        self.ledger.record(seq, key);
        if let Err(e) = self.save_ledger().await {
            // In memory it is recorded: the next attempt confirms without sending.
            tracing::error!(error = %e, "recording a Protime delivery failed");
            return Err(None);
        }
        self.confirmed(seq, c).await
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
        self.metrics
            .protime
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id = %c.id, "delivered to Protime");
        Ok(())
    }

    /// Log and count a failure; returns how long to pause when it is not the backoff's business.
    fn failed(&self, c: &Clocking, e: CloudError) -> Option<Duration> {
        let protime = &self.metrics.protime;
        if matches!(e.kind, ErrorKind::Auth(_)) {
            let message = configuration_problem(&e, self.client.scopes());
            tracing::error!(id = %c.id, error = %e, "{message}");
            protime.connected.store(false, Ordering::Relaxed);
            protime.set_error(Some(message));
            return Some(CONFIG_RETRY);
        }
        protime.connected.store(
            !matches!(
                e.kind,
                ErrorKind::Unreachable { .. } | ErrorKind::Network { .. }
            ),
            Ordering::Relaxed,
        );
        protime.set_error(Some(e.to_string()));
        if e.may_have_landed() {
            // Not a configuration problem: the next attempt looks the clocking up first.
            tracing::warn!(id = %c.id, error = %e, "Protime may have stored the clocking although no success came back; looking it up before sending it again");
        } else if e.is_transient() {
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

/// What to tell the operator when Protime refuses the agent itself (401/403, or no token).
pub fn configuration_problem(e: &CloudError, requested_scopes: &str) -> String {
    let retry = CONFIG_RETRY.as_secs();
    let answer = match &e.kind {
        ErrorKind::Auth(a) => a.to_string(),
        other => other.to_string(),
    };
    if e.call == CALL_TOKEN {
        return format!(
            "configuration problem: Protime refused to issue a token ({answer}); check \
             sinks.protime client_id and client secret, and that the API client is granted the \
             scopes {requested_scopes}; retrying every {retry} s"
        );
    }
    match scope_for_call(e.call) {
        Some(scope) => format!(
            "configuration problem: Protime refused {} ({answer}): the API client lacks the \
             scope {scope} (or its grant was revoked); grant {scope} to the client in myProtime; \
             retrying every {retry} s",
            e.call
        ),
        None => format!(
            "configuration problem: Protime refused {} ({answer}); retrying every {retry} s",
            e.call
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Direction;
    use chrono::NaiveDate;

    fn pc(date: &str, minutes: i32) -> ProtimeClocking {
        ProtimeClocking {
            person: PersonRef::BadgeNumber("4711".into()),
            date: NaiveDate::parse_from_str(date, "%Y-%m-%d").expect("date"),
            time_of_day_in_minutes: minutes,
            kind: ClockingKind::InOut,
            terminal: Some(TerminalRef::ExternalCode("gate-1".into())),
        }
    }

    #[test]
    fn the_key_is_what_protime_keeps_whichever_day_it_books_it_on() {
        let k = clocking_key(&pc("2026-07-02", 30));
        assert_eq!(k, clocking_key(&pc("2026-07-01", 1470)), "re-dated");
        assert_ne!(k, clocking_key(&pc("2026-07-02", 31)));
        let other_terminal = ProtimeClocking {
            terminal: Some(TerminalRef::ExternalCode("gate-2".into())),
            ..pc("2026-07-02", 30)
        };
        assert_ne!(k, clocking_key(&other_terminal));
    }

    fn clocking(terminal: &str, source: Source) -> Clocking {
        let at = chrono::DateTime::parse_from_rfc3339("2026-07-02T08:00:30+02:00").expect("time");
        Clocking {
            id: crate::model::ClockingId::derive("s", terminal, "4711", at, Direction::In),
            site: "s".into(),
            terminal: terminal.into(),
            badge: "4711".into(),
            person: None,
            occurred_at: at,
            direction: Direction::In,
            status: crate::model::AccessStatus::AccessOk,
            source,
            received_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn the_person_reference_is_the_terminals_then_the_sources_then_the_sinks() {
        use ProtimePersonRef::{BadgeNumber, EmployeeNumber};
        let refs = PersonRefs {
            default: BadgeNumber,
            by_terminal: HashMap::from([("kiosk".to_owned(), BadgeNumber)]),
            by_source: HashMap::from([(Source::Crosschex, EmployeeNumber)]),
        };
        let tz = chrono_tz::Europe::Brussels;
        let person = |t, s| to_protime(&clocking(t, s), tz, &refs).person;
        assert_eq!(
            person("gate-1", Source::Http),
            PersonRef::BadgeNumber("4711".into()),
            "the sink's"
        );
        assert_eq!(
            person("crosschex-SER", Source::Crosschex),
            PersonRef::EmployeeNumber("4711".into()),
            "the source's"
        );
        assert_eq!(
            person("kiosk", Source::Crosschex),
            PersonRef::BadgeNumber("4711".into()),
            "the terminal's wins"
        );
        let pc = to_protime(&clocking("gate-1", Source::Http), tz, &refs);
        assert_eq!(
            (pc.date.to_string(), pc.time_of_day_in_minutes),
            ("2026-07-02".into(), 480)
        );
        // One badge value under two references is two people to Protime: two keys.
        let by_employee = ProtimeClocking {
            person: PersonRef::EmployeeNumber("4711".into()),
            ..pc.clone()
        };
        assert_ne!(clocking_key(&pc), clocking_key(&by_employee));
    }

    #[test]
    fn an_in_doubt_clocking_landed_only_when_protime_holds_more_than_we_delivered() {
        let key = clocking_key(&pc("2026-07-02", 480));
        let other = clocking_key(&pc("2026-07-02", 481));
        let mut ledger = Ledger::default();
        // Nothing of ours with that key yet: one match is ours.
        assert!(!ledger.landed(10, key, 0));
        assert!(ledger.landed(10, key, 1));
        // The In of 08:00 was delivered; the Out of 08:00 is in doubt.
        ledger.record(10, key);
        ledger.record(11, other);
        assert!(!ledger.landed(12, key, 1), "the one match is the In");
        assert!(ledger.landed(12, key, 2));
        // A crash after recording, before the store's confirmation: seq 10 is delivered, and
        // its own entry does not count against it.
        assert!(ledger.delivered(10));
        assert!(ledger.landed(10, key, 1));
    }

    #[test]
    fn the_ledger_keeps_the_last_deliveries_and_clears_the_doubt() {
        let mut ledger = Ledger {
            in_doubt: Some(7),
            ..Ledger::default()
        };
        for seq in 0..(RECENT as u64 + 10) {
            ledger.record(seq, [0; 8]);
        }
        assert_eq!(ledger.in_doubt, None);
        assert_eq!(ledger.recent.len(), RECENT);
        assert!(!ledger.delivered(9));
        assert!(ledger.delivered(10));
        ledger.record(10, [0; 8]);
        assert_eq!(ledger.recent.len(), RECENT, "recorded once");
        let bytes = postcard::to_allocvec(&ledger).expect("encode");
        assert!(bytes.len() < 8 * 1024, "{} bytes", bytes.len());
        assert_eq!(postcard::from_bytes::<Ledger>(&bytes), Ok(ledger));
    }

    #[test]
    fn a_refused_call_names_the_scope_to_grant() {
        let refused = |call| CloudError {
            api: crate::clouds::Api::Protime,
            call,
            kind: ErrorKind::Auth(crate::clouds::VendorAnswer {
                status: 401,
                ..Default::default()
            }),
        };
        let post = configuration_problem(&refused("POST /clockings"), "a b");
        assert!(post.starts_with("configuration problem"), "{post}");
        assert!(
            post.contains("connector-protimeapi-clockings.write"),
            "{post}"
        );
        let lookup = configuration_problem(&refused("GET /clockings"), "a b");
        assert!(
            lookup.contains("connector-protimeapi-clockings.read"),
            "{lookup}"
        );
        let login = configuration_problem(&refused(CALL_TOKEN), "scope-a scope-b");
        assert!(login.contains("scope-a scope-b"), "{login}");
    }
}
