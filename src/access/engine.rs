//! The access engine around the decision function: presence in memory (a mirror of the store's
//! `presence` table), the writer hook that decides every clocking in arrival order and writes
//! its presence in the same commit, access checks, occupancy, and the comparison of mirrored
//! cloud statuses with the local ones.
//!
//! Locks: the directory's, then presence's, always in that order, never across an await or an
//! fsync. The writer holds presence for the few microseconds of one decision. An access check
//! may therefore see a decision a few milliseconds before its commit; a commit that fails is
//! undone in memory before anyone hears of it failing.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::decide::{decide, Attempt};
use super::directory::{Directory, DirectoryView};
use super::presence::{self, subject_key, Presence, PresenceMap};
use super::rules::Rules;
use super::view;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{
    in_zone, AccessStatus, Clocking, ClockingId, Direction, PresenceTransition, Source,
};
use crate::store::{AccessHook, AccessReads, Store, StoreError, TableWrite};

/// A local decision as kept for comparing with a cloud mirror (postcard).
#[derive(Debug, Serialize, Deserialize)]
struct DecisionRow {
    person: Option<String>,
    status: AccessStatus,
    id: [u8; 16],
}

/// A cloud status that differs from the local decision for the same clocking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub terminal: String,
    pub badge: String,
    pub person: Option<String>,
    pub occurred_at: DateTime<FixedOffset>,
    pub source: Source,
    pub local_status: AccessStatus,
    pub cloud_status: AccessStatus,
    pub local_id: ClockingId,
    pub cloud_id: ClockingId,
}

impl Mismatch {
    /// The `{topic_prefix}/{site}/access/mismatch` payload.
    pub fn to_json(&self) -> Value {
        json!({
            "terminal": self.terminal,
            "badge": self.badge,
            "person": self.person,
            "occurred_at": self.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
            "source": self.source.as_str(),
            "local_status": self.local_status.as_str(),
            "cloud_status": self.cloud_status.as_str(),
            "local_clocking_id": self.local_id.to_string(),
            "cloud_clocking_id": self.cloud_id.to_string(),
        })
    }
}

/// "May this badge pass?" as asked over HTTP or MQTT.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub terminal: String,
    pub badge: String,
    pub direction: Direction,
    pub at: DateTime<FixedOffset>,
}

/// A bad access check request: the code, the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    pub code: &'static str,
    pub field: Option<&'static str>,
    pub message: String,
}

/// Validate an access check body (`{"terminal","badge","direction"?,"at"?}`); `extra` names
/// further fields allowed (MQTT's `reply_to` and `correlation_id`).
pub fn parse_check(config: &Config, v: &Value, extra: &[&str]) -> Result<CheckRequest, CheckError> {
    const FIELDS: [&str; 4] = ["terminal", "badge", "direction", "at"];
    let err = |code, field, message: String| CheckError {
        code,
        field,
        message,
    };
    let Some(obj) = v.as_object() else {
        return Err(err(
            "invalid_body",
            None,
            "expected a JSON object {\"terminal\",\"badge\",\"direction\"?,\"at\"?}".into(),
        ));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !FIELDS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        return Err(err(
            "unknown_field",
            None,
            format!("unknown field {k:?} (expected terminal, badge, direction, at)"),
        ));
    }
    let string = |field: &'static str, required: bool| -> Result<Option<&str>, CheckError> {
        match obj.get(field) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(err(
                "missing_field",
                Some(field),
                format!("{field} is required"),
            )),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(err(
                "invalid_type",
                Some(field),
                format!("{field} must be a string"),
            )),
        }
    };
    let terminal = string("terminal", true)?.unwrap_or_default();
    let term = config.terminal(terminal).ok_or_else(|| {
        err(
            "unknown_terminal",
            Some("terminal"),
            format!("terminal {terminal:?} is not configured"),
        )
    })?;
    let badge = string("badge", true)?.unwrap_or_default();
    if !(1..=64).contains(&badge.chars().count()) || badge.chars().any(char::is_control) {
        return Err(err(
            "invalid_badge",
            Some("badge"),
            "badge must be 1 to 64 printable characters".into(),
        ));
    }
    let direction = match string("direction", false)? {
        None => term.direction.unwrap_or_default(),
        Some(d) => d.parse().map_err(|()| {
            err(
                "invalid_direction",
                Some("direction"),
                format!("direction {d:?} is not one of in, out, unknown"),
            )
        })?,
    };
    let at = match string("at", false)? {
        None => Utc::now().fixed_offset(),
        Some(s) => DateTime::parse_from_rfc3339(s).map_err(|e| {
            err(
                "invalid_timestamp",
                Some("at"),
                format!("at {s:?} is not RFC 3339 with an offset ({e})"),
            )
        })?,
    };
    Ok(CheckRequest {
        terminal: term.id.clone(),
        badge: badge.to_owned(),
        direction,
        at: in_zone(at, term.timezone),
    })
}

struct Shared {
    rules: Rules,
    site: String,
    /// This gateway's name on the site topic (its MQTT client id).
    gateway: Arc<str>,
    site_sync: bool,
    directory: DirectoryView,
    presence: RwLock<PresenceMap>,
    metrics: Arc<Metrics>,
    /// Bumped after every commit that changed presence.
    changed: watch::Sender<u64>,
    /// Subjects with a new transition of this gateway, for the site topic.
    sync_tx: mpsc::UnboundedSender<String>,
    mismatch_tx: mpsc::UnboundedSender<Mismatch>,
    taps: Mutex<Taps>,
}

#[derive(Default)]
struct Taps {
    sync: Option<mpsc::UnboundedReceiver<String>>,
    mismatches: Option<mpsc::UnboundedReceiver<Mismatch>>,
}

/// The access engine. Cheap to clone.
#[derive(Clone)]
pub struct AccessEngine {
    shared: Arc<Shared>,
}

impl AccessEngine {
    /// The engine with the presence last committed to `store`, and the hook the store's writer
    /// decides with (give it to [`Writer::start_with_access`](crate::store::Writer)).
    pub fn load(
        config: &Config,
        store: &Store,
        directory: &Directory,
        metrics: Arc<Metrics>,
    ) -> Result<(AccessEngine, Box<dyn AccessHook>), StoreError> {
        let started = std::time::Instant::now();
        let (map, bad) = load_presence(store)?;
        if bad > 0 {
            tracing::warn!(
                unreadable = bad,
                "some stored presence entries could not be read; those persons count as unknown"
            );
        }
        tracing::info!(
            persons = map.len(),
            ms = started.elapsed().as_millis() as u64,
            "presence loaded"
        );
        let engine = AccessEngine::with_presence(config, directory.view(), map, metrics);
        let hook = Box::new(Hook {
            shared: engine.shared.clone(),
            undo: Vec::new(),
            batch: Batch::default(),
        });
        Ok((engine, hook))
    }

    fn with_presence(
        config: &Config,
        directory: DirectoryView,
        map: PresenceMap,
        metrics: Arc<Metrics>,
    ) -> AccessEngine {
        let (sync_tx, sync) = mpsc::unbounded_channel();
        let (mismatch_tx, mismatches) = mpsc::unbounded_channel();
        let gateway = config
            .mqtt
            .as_ref()
            .map_or_else(|| config.agent.site.clone(), |m| m.client_id.clone());
        AccessEngine {
            shared: Arc::new(Shared {
                rules: Rules::from_config(config),
                site: config.agent.site.clone(),
                gateway: Arc::from(gateway),
                site_sync: config.access.site_sync,
                directory,
                presence: RwLock::new(map),
                metrics,
                changed: watch::channel(0).0,
                sync_tx,
                mismatch_tx,
                taps: Mutex::new(Taps {
                    sync: Some(sync),
                    mismatches: Some(mismatches),
                }),
            }),
        }
    }

    fn presence(&self) -> RwLockReadGuard<'_, PresenceMap> {
        self.shared
            .presence
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn rules(&self) -> &Rules {
        &self.shared.rules
    }

    pub fn gateway(&self) -> &str {
        &self.shared.gateway
    }

    pub fn site_sync(&self) -> bool {
        self.shared.site_sync
    }

    /// Changes after every commit that moved someone.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// The subjects whose new transitions go on the site topic (taken once, by the MQTT side).
    pub fn take_sync(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.shared.taps.lock().ok()?.sync.take()
    }

    /// Mismatches between the cloud's and the local status (taken once, by the MQTT side).
    pub fn take_mismatches(&self) -> Option<mpsc::UnboundedReceiver<Mismatch>> {
        self.shared.taps.lock().ok()?.mismatches.take()
    }

    /// Answer "may this badge pass?" as if the clocking happened, recording nothing.
    pub fn check(&self, req: &CheckRequest) -> Value {
        let sh = &*self.shared;
        sh.metrics
            .access
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = ClockingId::derive(&sh.site, &req.terminal, &req.badge, req.at, req.direction);
        let attempt = Attempt {
            id,
            terminal: &req.terminal,
            badge: &req.badge,
            at: req.at,
            direction: req.direction,
            reported: None,
            mirror: false,
        };
        sh.directory.with_person(&req.badge, |person, shifts| {
            let map = self.presence();
            let person_id = person.map(|p| p.id.as_str());
            let held = map.get(&subject_key(person_id, &req.badge));
            let d = decide(&attempt, person, held, shifts, &sh.rules);
            let passage = d.passage.as_ref();
            json!({
                "status": d.status.as_str(),
                "person": person_id,
                "zone_from": passage.map(|p| &*p.from),
                "zone_to": passage.map(|p| &*p.to),
                "reason": d.reason.to_string(),
                "reason_code": d.reason.code(),
                "direction": passage.map_or(req.direction, |p| p.direction).as_str(),
            })
        })
    }

    /// `GET /v1/zones`.
    pub fn zones(&self, now: DateTime<Utc>) -> Value {
        view::zones(&self.presence(), &self.shared.rules, now)
    }

    /// `GET /v1/zones/{zone}/people` and the MQTT occupancy payload.
    pub fn zone(&self, name: &str, now: DateTime<Utc>) -> Option<Value> {
        view::zone(&self.presence(), &self.shared.rules, name, now)
    }

    pub fn all_zones(&self, now: DateTime<Utc>) -> Vec<Value> {
        view::all_zones(&self.presence(), &self.shared.rules, now)
    }

    /// Persons per declared zone.
    pub fn zone_counts(&self, now: DateTime<Utc>) -> Vec<(String, usize)> {
        let map = self.presence();
        let occupancy = map.occupancy(&self.shared.rules, now);
        self.shared
            .rules
            .zones
            .iter()
            .map(|z| {
                (
                    z.name.to_string(),
                    occupancy.get(&*z.name).map_or(0, Vec::len),
                )
            })
            .collect()
    }

    /// Persons with a presence held.
    pub fn presence_count(&self) -> usize {
        self.presence().len()
    }

    /// The site-topic form of this gateway's current transition for `subject`, if the
    /// presence held for it is this gateway's own.
    pub fn own_transition(&self, subject: &str) -> Option<(PresenceTransition, ClockingId)> {
        let map = self.presence();
        let p = map.get(subject).filter(|p| p.gateway.is_none())?;
        Some((p.transition(&self.shared.gateway), p.clocking))
    }
}

impl Shared {
    fn presence_mut(&self) -> RwLockWriteGuard<'_, PresenceMap> {
        self.presence.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Read the store's presence table.
fn load_presence(store: &Store) -> Result<(PresenceMap, usize), StoreError> {
    let mut map = PresenceMap::new();
    let mut entries = Vec::new();
    let mut bad = 0usize;
    store.presence_rows(|subject, bytes| match presence::decode(bytes, &mut map) {
        Ok(p) => entries.push((subject.to_owned(), p)),
        Err(_) => bad += 1,
    })?;
    for (s, p) in entries {
        map.apply(&s, p);
    }
    Ok((map, bad))
}

/// What one batch produced, published only once it is committed.
#[derive(Default)]
struct Batch {
    decided: [u64; 7],
    changed: bool,
    sync: Vec<String>,
    applied_remote: u64,
    /// Mirrored clockings that agreed, disagreed or had no local decision to compare with.
    agree: u64,
    unmatched: u64,
    mismatches: Vec<Mismatch>,
}

/// The engine's side of the store's writer thread.
struct Hook {
    shared: Arc<Shared>,
    /// What each change of this batch replaced, to undo a failed commit.
    undo: Vec<(String, Option<Presence>)>,
    batch: Batch,
}

impl Hook {
    /// Hold `p` for `subject` if it is newer; its row goes into this commit.
    fn hold(
        &mut self,
        map: &mut PresenceMap,
        out: &mut Vec<TableWrite>,
        subject: String,
        p: Presence,
        own: bool,
    ) -> bool {
        let value = presence::encode(&p);
        let id = p.clocking;
        let Some(previous) = map.apply(&subject, p) else {
            return false;
        };
        self.batch.changed = true;
        self.undo.push((subject.clone(), previous));
        let unsent = (own && self.shared.site_sync).then_some(id.0);
        if unsent.is_some() {
            self.batch.sync.push(subject.clone());
        }
        out.push(TableWrite::Presence {
            subject,
            value,
            unsent,
        });
        true
    }
}

/// The local decisions for the clocking a mirror reports: same terminal, same minute, same
/// badge or person; from this batch (`pending`) and before (the table).
fn local_decisions(
    c: &Clocking,
    reads: &dyn AccessReads,
    pending: &[TableWrite],
) -> Vec<DecisionRow> {
    let minute = c.occurred_at.timestamp().div_euclid(60);
    let same = |badge: &str, row: &DecisionRow| {
        badge == c.badge || (c.person.is_some() && row.person.as_deref() == c.person.as_deref())
    };
    let mut found: Vec<DecisionRow> = reads
        .decisions_at(&c.terminal, minute)
        .into_iter()
        .filter_map(|(badge, v)| {
            let row: DecisionRow = postcard::from_bytes(&v).ok()?;
            same(&badge, &row).then_some(row)
        })
        .collect();
    for w in pending {
        if let TableWrite::Decision {
            terminal,
            minute: m,
            badge,
            value,
        } = w
        {
            if *terminal == c.terminal && *m == minute {
                if let Ok(row) = postcard::from_bytes::<DecisionRow>(value) {
                    if same(badge, &row) {
                        found.push(row);
                    }
                }
            }
        }
    }
    found
}

impl Hook {
    /// Count a mirrored clocking as agreeing with, differing from, or unmatched by `local`.
    fn tally(&mut self, c: &Clocking, local: &[DecisionRow]) {
        let Some(first) = local.first() else {
            self.batch.unmatched += 1;
            return;
        };
        if local.iter().any(|r| r.status == c.status) {
            self.batch.agree += 1;
            return;
        }
        self.batch.mismatches.push(Mismatch {
            terminal: c.terminal.clone(),
            badge: c.badge.clone(),
            person: c.person.clone().or_else(|| first.person.clone()),
            occurred_at: c.occurred_at,
            source: c.source,
            local_status: first.status,
            cloud_status: c.status,
            local_id: ClockingId(first.id),
            cloud_id: c.id,
        });
    }
}

impl AccessHook for Hook {
    fn clocking(
        &mut self,
        c: &mut Clocking,
        decide_it: bool,
        reads: &dyn AccessReads,
        out: &mut Vec<TableWrite>,
    ) {
        let shared = self.shared.clone();
        let sh = &*shared;
        let mirror = !decide_it && matches!(c.source, Source::Protime | Source::Aktion);
        // The same passage decided here: the cloud's status is compared with ours, and its
        // presence effect is already applied (the cloud's minute-precision time would make it
        // look newer than the passage itself).
        let local = if mirror {
            let found = local_decisions(c, reads, out);
            self.tally(c, &found);
            !found.is_empty()
        } else {
            false
        };
        let attempt = Attempt {
            id: c.id,
            terminal: &c.terminal,
            badge: &c.badge,
            at: c.occurred_at,
            direction: c.direction,
            reported: (!decide_it).then_some(c.status),
            mirror,
        };
        let (decision, person_id, moved) = sh.directory.with_person(&c.badge, |person, shifts| {
            // A mirrored clocking names its person (the cloud's id); others are looked up.
            let person_id = if mirror {
                c.person.clone().or_else(|| person.map(|p| p.id.clone()))
            } else {
                person.map(|p| p.id.clone()).or_else(|| c.person.clone())
            };
            let subject = subject_key(person_id.as_deref(), &c.badge);
            let mut map = sh.presence_mut();
            let d = decide(&attempt, person, map.get(&subject), shifts, &sh.rules);
            let moved = match d
                .new_presence(&attempt, person_id.as_deref())
                .filter(|_| !local)
            {
                Some(mut p) => {
                    p.terminal = map.intern(&c.terminal);
                    self.hold(&mut map, out, subject, p, true)
                }
                None => false,
            };
            (d, person_id, moved)
        });
        if decide_it {
            c.status = decision.status;
            self.batch.decided[decision.status.index()] += 1;
        }
        if c.person.is_none() {
            c.person = person_id;
        }
        tracing::debug!(
            id = %c.id,
            terminal = %c.terminal,
            status = c.status.as_str(),
            reason = %decision.reason,
            moved,
            "access decided"
        );
        if mirror {
            return;
        }
        if sh.rules.compare_mirrors {
            let row = DecisionRow {
                person: c.person.clone(),
                status: c.status,
                id: c.id.0,
            };
            out.push(TableWrite::Decision {
                terminal: c.terminal.clone(),
                minute: c.occurred_at.timestamp().div_euclid(60),
                badge: c.badge.clone(),
                value: postcard::to_allocvec(&row).unwrap_or_default(),
            });
        }
        if sh.rules.directory_in_use && c.status == AccessStatus::UnknownBadge && c.person.is_none()
        {
            out.push(TableWrite::UnknownBadge {
                badge: c.badge.clone(),
                at_ms: c.occurred_at.timestamp_millis(),
                id: c.id.0,
                clocking: postcard::to_allocvec(&*c).unwrap_or_default(),
            });
        }
    }

    fn remote(&mut self, transitions: &[PresenceTransition], out: &mut Vec<TableWrite>) -> u64 {
        let shared = self.shared.clone();
        let mut map = shared.presence_mut();
        let mut applied = 0;
        for t in transitions {
            if *t.gateway == *shared.gateway {
                continue;
            }
            let Some(p) = Presence::from_transition(t, &mut map) else {
                continue;
            };
            let subject = subject_key(t.person.as_deref(), &t.badge);
            if self.hold(&mut map, out, subject, p, false) {
                applied += 1;
            }
        }
        self.batch.applied_remote += applied;
        applied
    }

    fn finished(&mut self, committed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let batch = std::mem::take(&mut self.batch);
        if !committed {
            let mut map = self.shared.presence_mut();
            for (subject, previous) in self.undo.drain(..).rev() {
                map.restore(&subject, previous);
            }
            return;
        }
        self.undo.clear();
        let m = &self.shared.metrics.access;
        for (i, n) in batch.decided.iter().enumerate().filter(|(_, n)| **n > 0) {
            m.decisions[i].fetch_add(*n, Relaxed);
        }
        m.sync_applied.fetch_add(batch.applied_remote, Relaxed);
        if batch.changed {
            self.shared.changed.send_modify(|v| *v += 1);
        }
        for s in batch.sync {
            let _ = self.shared.sync_tx.send(s);
        }
        m.mirror_agree.fetch_add(batch.agree, Relaxed);
        m.mirror_unmatched.fetch_add(batch.unmatched, Relaxed);
        m.mirror_mismatch
            .fetch_add(batch.mismatches.len() as u64, Relaxed);
        for mm in batch.mismatches {
            tracing::warn!(
                terminal = %mm.terminal,
                badge = %mm.badge,
                local = mm.local_status.as_str(),
                cloud = mm.cloud_status.as_str(),
                source = mm.source.as_str(),
                "the cloud decided a clocking differently than the local access engine"
            );
            let _ = self.shared.mismatch_tx.send(mm);
        }
    }
}

/// Presence and occupancy of a stopped agent, read from its store (for `badgegate zones`).
pub fn offline_view(config: &Config, store: &Store, zone: Option<&str>) -> Result<Value, String> {
    let (map, _) = load_presence(store).map_err(|e| e.to_string())?;
    let rules = Rules::from_config(config);
    let now = Utc::now();
    match zone {
        None => Ok(view::zones(&map, &rules, now)),
        Some(z) => view::zone(&map, &rules, z, now)
            .ok_or_else(|| format!("zone {z:?} is not declared in [[zones]]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{PeopleOrigin, Person};
    use crate::ingest::Ingest;
    use crate::model::NewClocking;
    use crate::store::{SinkId, Writer};
    use std::time::Duration;

    const BASE: &str = r#"
        [agent]
        site = "s"
        timezone = "Europe/Brussels"
        [mqtt]
        url = "mqtt://127.0.0.1:1"
        [[zones]]
        name = "hall"
        [[terminals]]
        id = "main"
        zone_from = "outside"
        zone_to = "hall"
        [access]
        antipassback = "hard"
    "#;

    /// The engine on a real store, wired as `Agent::start` wires it.
    struct Rig {
        dir: std::path::PathBuf,
        store: Arc<Store>,
        engine: AccessEngine,
        directory: Directory,
        ingest: Ingest,
        writer: Option<(Writer, crate::store::WriterHandle)>,
        metrics: Arc<Metrics>,
    }

    impl Rig {
        fn open(dir: &std::path::Path, extra: &str) -> Rig {
            std::fs::write(dir.join("secret"), "x").unwrap();
            std::fs::write(dir.join("people.csv"), "badge,person\n").unwrap();
            let text = format!("{BASE}\n{extra}");
            let config = Arc::new(Config::parse(&text, dir).unwrap());
            let store = Arc::new(Store::open(&dir.join("data"), &[SinkId::Mqtt]).unwrap());
            let metrics = Arc::new(Metrics::default());
            let directory = Directory::load(&store).unwrap();
            let (engine, hook) =
                AccessEngine::load(&config, &store, &directory, metrics.clone()).unwrap();
            let (writer, handle) = Writer::start_with_access(store.clone(), 30, None, Some(hook));
            directory.persist_with(handle.clone(), metrics.clone());
            let ingest = Ingest::new(config.clone(), handle.clone(), metrics.clone());
            Rig {
                dir: dir.to_path_buf(),
                store,
                engine,
                directory,
                ingest,
                writer: Some((writer, handle)),
                metrics,
            }
        }

        fn close(mut self) -> std::path::PathBuf {
            let (writer, handle) = self.writer.take().unwrap();
            drop(handle);
            drop(self.ingest);
            drop(self.directory);
            writer.join();
            self.dir
        }

        fn handle(&self) -> &crate::store::WriterHandle {
            &self.writer.as_ref().unwrap().1
        }

        async fn clock(&self, badge: &str, at: &str, dir: Direction) -> Clocking {
            self.submit(NewClocking {
                terminal: "main".into(),
                badge: badge.into(),
                occurred_at: DateTime::parse_from_rfc3339(at).unwrap(),
                direction: dir,
                status: None,
                person: None,
                source: Source::Http,
            })
            .await
        }

        async fn submit(&self, c: NewClocking) -> Clocking {
            let out = self.ingest.submit(vec![c]).await.unwrap();
            let id = out[0].id;
            self.store
                .pending(SinkId::Mqtt, None, 10_000)
                .unwrap()
                .into_iter()
                .map(|(_, c)| c)
                .rfind(|c| c.id == id)
                .unwrap()
        }

        fn inside(&self) -> Vec<String> {
            let doc = self.engine.zone("hall", Utc::now()).unwrap();
            doc["people"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["badge"].as_str().unwrap().to_owned())
                .collect()
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn decisions_are_stored_with_their_clocking_and_presence_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let rig = Rig::open(tmp.path(), "");
        let dir = rt().block_on(async {
            let a = rig
                .clock("1", "2026-05-04T08:00:00+02:00", Direction::In)
                .await;
            assert_eq!(a.status, AccessStatus::AccessOk);
            let b = rig
                .clock("1", "2026-05-04T08:01:00+02:00", Direction::In)
                .await;
            assert_eq!(b.status, AccessStatus::AntiPassbackError, "hard: in twice");
            rig.clock("2", "2026-05-04T08:02:00+02:00", Direction::In)
                .await;
            assert_eq!(rig.inside(), ["1", "2"]);
            assert_eq!(
                rig.metrics.access.decisions[AccessStatus::AntiPassbackError.index()]
                    .load(std::sync::atomic::Ordering::Relaxed),
                1
            );
            // The same clocking again is a duplicate: not decided a second time.
            let again = rig
                .ingest
                .submit(vec![NewClocking {
                    terminal: "main".into(),
                    badge: "2".into(),
                    occurred_at: DateTime::parse_from_rfc3339("2026-05-04T08:02:00+02:00").unwrap(),
                    direction: Direction::In,
                    status: None,
                    person: None,
                    source: Source::Http,
                }])
                .await
                .unwrap();
            assert_eq!(again[0].status, None);
            rig.close()
        });
        // A new process: presence is what was committed.
        let rig = Rig::open(&dir, "");
        assert_eq!(rig.inside(), ["1", "2"]);
        rt().block_on(async {
            let c = rig
                .clock("2", "2026-05-04T08:03:00+02:00", Direction::In)
                .await;
            assert_eq!(c.status, AccessStatus::AntiPassbackError);
            let c = rig
                .clock("2", "2026-05-04T08:04:00+02:00", Direction::Out)
                .await;
            assert_eq!(c.status, AccessStatus::AccessOk);
        });
        assert_eq!(rig.inside(), ["1"]);
        rig.close();
    }

    #[test]
    fn a_failed_commit_leaves_presence_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::parse(BASE, tmp.path()).unwrap();
        let store = Store::open(tmp.path(), &[SinkId::Mqtt]).unwrap();
        let (engine, mut hook) = AccessEngine::load(
            &config,
            &store,
            &Directory::new(),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let mut c = Clocking::from_new(
            "s",
            chrono_tz::Europe::Brussels,
            NewClocking {
                terminal: "main".into(),
                badge: "7".into(),
                occurred_at: Utc::now().fixed_offset(),
                direction: Direction::In,
                status: None,
                person: None,
                source: Source::Http,
            },
            AccessStatus::AccessOk,
            Utc::now(),
        );
        struct NoReads;
        impl AccessReads for NoReads {
            fn decisions_at(&self, _: &str, _: i64) -> Vec<(String, Vec<u8>)> {
                Vec::new()
            }
        }
        let mut rows = Vec::new();
        hook.clocking(&mut c, true, &NoReads, &mut rows);
        assert_eq!(rows.len(), 1, "the presence row goes into the commit");
        assert_eq!(engine.zone_counts(Utc::now()), [("hall".into(), 1)]);
        hook.finished(false);
        assert_eq!(engine.zone_counts(Utc::now()), [("hall".into(), 0)]);
        assert_eq!(engine.presence_count(), 0);
    }

    #[test]
    fn an_unknown_badge_is_republished_with_its_person_and_status_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let rig = Rig::open(tmp.path(), "people_file = \"people.csv\"");
        let rig = rt().block_on(async move {
            // The people file is empty: every badge is unknown.
            let c = rig
                .clock("77", "2026-05-04T08:00:00+02:00", Direction::In)
                .await;
            assert_eq!(
                (c.status, c.person.as_deref()),
                (AccessStatus::UnknownBadge, None)
            );
            assert!(rig.inside().is_empty(), "an unknown badge moves nobody");
            // Delivered: it leaves the outbox, but is kept for re-publishing.
            let seqs: Vec<u64> = rig
                .store
                .pending(SinkId::Mqtt, None, 10)
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect();
            rig.handle()
                .confirm_and_wait(SinkId::Mqtt, seqs)
                .await
                .unwrap();
            assert_eq!(rig.store.unknown_badge_count().unwrap(), 1);
            rig.directory
                .replace_people(
                    PeopleOrigin::File,
                    vec![Person {
                        id: "E-77".into(),
                        name: None,
                        badges: vec!["77".into()],
                        groups: vec![],
                        locked: false,
                    }],
                )
                .await
                .unwrap();
            let again = rig.store.pending(SinkId::Mqtt, None, 10).unwrap();
            assert_eq!(again.len(), 1, "re-published");
            let r = &again[0].1;
            assert_eq!(r.id, c.id, "the same clocking");
            assert_eq!(r.person.as_deref(), Some("E-77"));
            assert_eq!(r.status, AccessStatus::UnknownBadge, "status unchanged");
            assert_eq!(rig.store.unknown_badge_count().unwrap(), 0);
            assert_eq!(
                rig.metrics
                    .access
                    .republished
                    .load(std::sync::atomic::Ordering::Relaxed),
                1
            );
            // From now on the badge is known.
            let d = rig
                .clock("77", "2026-05-04T08:05:00+02:00", Direction::In)
                .await;
            assert_eq!(
                (d.status, d.person.as_deref()),
                (AccessStatus::AccessOk, Some("E-77"))
            );
            rig
        });
        let dir = rig.close();
        // The people loaded are in the store: a restart knows the badge before any reload.
        let rig = Rig::open(&dir, "people_file = \"people.csv\"");
        assert_eq!(
            rig.directory.person_for_badge("77").map(|p| p.id),
            Some("E-77".into())
        );
        rig.close();
    }

    #[test]
    fn mirrored_statuses_are_compared_and_move_presence_when_newer() {
        let tmp = tempfile::tempdir().unwrap();
        let aktion = "[sources.aktion]\nbase_url = \"https://a.example/\"\nuser_login = \"u\"\napi_key_file = \"secret\"";
        let rig = Rig::open(tmp.path(), aktion);
        assert!(rig.engine.rules().compare_mirrors);
        let runtime = rt();
        runtime.block_on(async {
            let five = Person {
                id: "A-5".into(),
                name: None,
                badges: vec!["5".into()],
                groups: vec![],
                locked: false,
            };
            rig.directory
                .replace_people(PeopleOrigin::Aktion, vec![five])
                .await
                .unwrap();
            let mut mismatches = rig.engine.take_mismatches().unwrap();
            let mirror = |badge: &str, at: &str, status| NewClocking {
                terminal: "main".into(),
                badge: badge.into(),
                occurred_at: DateTime::parse_from_rfc3339(at).unwrap(),
                direction: Direction::Unknown,
                status: Some(status),
                person: Some(format!("A-{badge}")),
                source: Source::Aktion,
            };
            rig.clock("5", "2026-05-04T08:00:20+02:00", Direction::In)
                .await;
            rig.clock("5", "2026-05-04T08:01:20+02:00", Direction::In)
                .await; // AntiPassbackError
                        // The cloud saw the first one too (minute precision): agreement.
            rig.submit(mirror(
                "5",
                "2026-05-04T08:00:00+02:00",
                AccessStatus::AccessOk,
            ))
            .await;
            // And judged the second one differently: a mismatch, forwarded for MQTT.
            rig.submit(mirror(
                "5",
                "2026-05-04T08:01:00+02:00",
                AccessStatus::AccessOk,
            ))
            .await;
            let m = tokio::time::timeout(Duration::from_secs(10), mismatches.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (m.local_status, m.cloud_status),
                (AccessStatus::AntiPassbackError, AccessStatus::AccessOk)
            );
            assert_eq!(m.to_json()["cloud_status"], "AccessOk");
            // A clocking only the cloud saw: nothing to compare, but its presence effect counts
            // (direction inferred: the person is outside, so this one was an entry).
            let c = rig
                .submit(mirror(
                    "6",
                    "2026-05-04T09:00:00+02:00",
                    AccessStatus::AccessOk,
                ))
                .await;
            assert_eq!(c.person.as_deref(), Some("A-6"));
            let m = &rig.metrics.access;
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                (
                    load(&m.mirror_agree),
                    load(&m.mirror_mismatch),
                    load(&m.mirror_unmatched)
                ),
                (1, 1, 1)
            );
            let after = rig
                .submit(mirror(
                    "6",
                    "2026-05-04T10:00:00+02:00",
                    AccessStatus::AccessOk,
                ))
                .await;
            assert_eq!(
                after.status,
                AccessStatus::AccessOk,
                "the cloud's status is kept"
            );
            assert!(
                rig.inside().iter().all(|b| b != "6"),
                "left again (inferred out)"
            );
        });
        assert_eq!(rig.inside(), ["5"]);
        rig.close();
    }

    #[test]
    fn fifty_thousand_persons_load_without_a_slow_start() {
        let tmp = tempfile::tempdir().unwrap();
        let rig = Rig::open(tmp.path(), "");
        let mut map = PresenceMap::new();
        let at = DateTime::parse_from_rfc3339("2026-05-04T08:00:00+02:00").unwrap();
        let rows: Vec<TableWrite> = (0..50_000u32)
            .map(|i| {
                let p = Presence {
                    zone: map.intern("hall"),
                    from: map.intern("outside"),
                    at,
                    terminal: map.intern("main"),
                    badge: i.to_string().into(),
                    person: None,
                    clocking: ClockingId([(i % 251) as u8; 16]),
                    gateway: None,
                };
                TableWrite::Presence {
                    subject: p.subject(),
                    value: presence::encode(&p),
                    unsent: None,
                }
            })
            .collect();
        rt().block_on(rig.handle().change(crate::store::Change::Tables(rows)))
            .unwrap();
        let dir = rig.close();
        let config = Config::parse(BASE, &dir).unwrap();
        let store = Store::open(&dir.join("data"), &[SinkId::Mqtt]).unwrap();
        let started = std::time::Instant::now();
        let (engine, _hook) = AccessEngine::load(
            &config,
            &store,
            &Directory::new(),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let took = started.elapsed();
        assert_eq!(engine.presence_count(), 50_000);
        assert_eq!(engine.zone_counts(Utc::now()), [("hall".into(), 50_000)]);
        // Unoptimised test build on a shared machine; a release build takes a fraction of this.
        assert!(took < Duration::from_secs(3), "loading took {took:?}");
        let started = std::time::Instant::now();
        let req = CheckRequest {
            terminal: "main".into(),
            badge: "49999".into(),
            direction: Direction::In,
            at: Utc::now().fixed_offset(),
        };
        let answer = engine.check(&req);
        assert!(started.elapsed() < Duration::from_millis(50));
        assert_eq!(answer["status"], "AntiPassbackError", "in twice: {answer}");
        assert_eq!(answer["zone_from"], "outside");
    }
}
