//! Aktion source: persons (the badge map), their scheduled shifts for the access engine, and the
//! passages of C4 controllers as clockings with `source: "aktion"`.
//!
//! - **C4 events** are read per controller (`sources.aktion.c4_controllers`). `LastSync` is
//!   required: the first poll sends `lookback_hours` ago, later ones the newest `DateCreated`
//!   read (the answer carries no watermark of its own). Parameters are whole seconds, so the
//!   events of the watermark's second come again: their GUIDs are kept with the watermark and
//!   dropped. Both are committed with the clockings, in one transaction. A passage's terminal is
//!   the configured terminal claiming the controller (`terminals[].aktion_c4`), else
//!   `aktion-<identification>`. Its direction is Aktion's (arrival and end of interruption in,
//!   departure and start of interruption out, then the terminal's fixed one), its status what
//!   `sources.aktion.event_codes` maps its `EventCode` to (`AccessOk` without an `OwnerId` is
//!   `UnknownBadge`); an unmapped code leaves the verdict to the access engine and is counted in
//!   the position and logged once. The person is the badge's holder in the directory (`OwnerId`
//!   is an internal GUID, not the PersonId). Aktion's `Zone` of the passage is compared with the
//!   terminal's zones, and a disagreement is logged once (presence follows the terminal's
//!   `zone_from`/`zone_to`). A malformed event is skipped, logged and counted; the feed moves on.
//! - **Persons** are loaded every `people_interval_secs` (all pages), before the events of the
//!   same poll: badges from the usable Identifiers and IdentifierCard1/2 (see
//!   [`person_badges`]), the department as group, the lock (`Lock` 1: all identifiers locked).
//! - **Shifts** are held from yesterday to `shift_days` ahead. A person's window is loaded in
//!   full once a day; at the other refreshes a query with `TimeLastChange` asks whether any of
//!   their shifts changed since the last look, and only then is the window loaded again. Night
//!   shifts end on the next day (begin < end always). A deleted shift disappears at the next
//!   daily load. A refresh looks at a few persons per poll, so passages keep being read
//!   between slices however many persons there are.
//! - **Tokens** live 20 seconds: the client logs in before a batch and again on 1001; 1008
//!   (request rate policy) backs off.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{direction, skip, store, Poller, Round, SourceError, Terminals};
use crate::access::directory::{Directory, PeopleOrigin, Person, Shift};
use crate::clouds::aktion::{person_badges, AktionClient, AktionHwEvent, AktionPerson};
use crate::clouds::{CloudError, ErrorKind, HttpOptions};
use crate::config::{AktionConfig, Config};
use crate::ingest::Ingest;
use crate::metrics::SourceHealth;
use crate::model::{valid_badge, AccessStatus, NewClocking, Source};
use crate::store::Store;

const NAME: &str = "aktion";
/// A shift changed this shortly before the last look is asked about again (clock skew between
/// the gateway and the Aktion server).
const CHANGE_MARGIN: chrono::Duration = chrono::Duration::minutes(5);
/// Persons whose shifts are looked at per poll (a request or two each).
const SHIFT_LOOKS_PER_POLL: usize = 8;

/// State key of a controller's `LastSync` (Unix milliseconds, big-endian).
pub fn last_sync_key(c4: &str) -> String {
    format!("aktion.c4.{c4}.last_sync")
}

/// State key of the GUIDs of the events read in the watermark's second (newline-separated).
pub fn seen_key(c4: &str) -> String {
    format!("aktion.c4.{c4}.seen")
}

/// A controller's position: the newest `DateCreated` read and the events of its second.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Mark {
    last_sync: Option<DateTime<Utc>>,
    seen: HashSet<String>,
}

fn second_of(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

impl Mark {
    /// The position after reading `events` (whether new or read before).
    fn advance(&self, events: &[AktionHwEvent]) -> Mark {
        let newest = events
            .iter()
            .map(|e| e.date_created.with_timezone(&Utc))
            .chain(self.last_sync)
            .max();
        let Some(newest) = newest else {
            return self.clone();
        };
        let mut seen: HashSet<String> = events
            .iter()
            .filter(|e| second_of(e.date_created.with_timezone(&Utc)) == second_of(newest))
            .map(|e| e.id.clone())
            .collect();
        if self.last_sync.map(second_of) == Some(second_of(newest)) {
            seen.extend(self.seen.iter().cloned());
        }
        Mark {
            last_sync: Some(newest),
            seen,
        }
    }

    fn state(&self, c4: &str) -> Vec<(String, Vec<u8>)> {
        let Some(l) = self.last_sync else {
            return Vec::new();
        };
        let mut seen: Vec<&str> = self.seen.iter().map(String::as_str).collect();
        seen.sort_unstable();
        vec![
            (
                last_sync_key(c4),
                l.timestamp_millis().to_be_bytes().to_vec(),
            ),
            (seen_key(c4), seen.join("\n").into_bytes()),
        ]
    }
}

pub struct AktionSource {
    client: AktionClient,
    c4s: Vec<String>,
    terminals: Terminals,
    every: Duration,
    people_every: Duration,
    people_due: Instant,
    shift_days: u32,
    /// Per person: the day their window was last loaded in full, when it was last looked at,
    /// and how many shifts it holds.
    looked: HashMap<String, Look>,
    refresh: Option<Refresh>,
    /// Positions read from the store (`last_sync` none: the controller has none yet).
    marks: HashMap<String, Mark>,
    lookback: chrono::Duration,
    event_codes: BTreeMap<i64, AccessStatus>,
    /// EventCodes not in `event_codes`, with how many passages carried them.
    unknown_codes: BTreeMap<i64, u64>,
    zone_warned: HashSet<(String, String)>,
    directory: Directory,
    ingest: Ingest,
    store: Arc<Store>,
    health: Arc<SourceHealth>,
}

/// A refresh of persons' shifts in progress.
#[derive(Debug)]
struct Refresh {
    day: NaiveDate,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// Every person listed at the start of the refresh.
    listed: HashSet<String>,
    /// Persons whose shifts are still to be looked at.
    queue: VecDeque<String>,
}

#[derive(Debug, Clone, Copy)]
struct Look {
    day: NaiveDate,
    at: DateTime<Utc>,
    shifts: usize,
}

impl AktionSource {
    pub fn new(
        cfg: &AktionConfig,
        config: &Config,
        directory: Directory,
        ingest: Ingest,
        store: Arc<Store>,
        health: Arc<SourceHealth>,
    ) -> Result<AktionSource, CloudError> {
        Ok(AktionSource {
            client: AktionClient::new(cfg, HttpOptions::aktion())?,
            c4s: cfg.c4_controllers.clone(),
            terminals: Terminals::new(config, NAME, |t| t.aktion_c4.as_ref()),
            every: Duration::from_secs(cfg.poll_interval_secs),
            people_every: Duration::from_secs(cfg.people_interval_secs),
            people_due: Instant::now(),
            shift_days: cfg.shift_days,
            looked: HashMap::new(),
            refresh: None,
            marks: HashMap::new(),
            lookback: chrono::Duration::hours(i64::from(cfg.lookback_hours)),
            event_codes: cfg.event_codes.clone(),
            unknown_codes: BTreeMap::new(),
            zone_warned: HashSet::new(),
            directory,
            ingest,
            store,
            health,
        })
    }

    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let every = self.every;
        let health = self.health.clone();
        super::run(NAME, self, every, health, shutdown).await;
    }

    fn stored_mark(&self, c4: &str) -> Result<Mark, SourceError> {
        let last_sync = self
            .store
            .state(&last_sync_key(c4))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .and_then(|b| DateTime::from_timestamp_millis(i64::from_be_bytes(b)));
        let seen = self
            .store
            .state(&seen_key(c4))?
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\n')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Mark { last_sync, seen })
    }

    /// New events of one controller, stored with its new position.
    async fn events(&mut self, c4: &str) -> Result<usize, SourceError> {
        let mark = match self.marks.get(c4) {
            Some(m) => m.clone(),
            None => self.stored_mark(c4)?,
        };
        // LastSync is required: without a watermark, `lookback_hours` ago.
        let since = mark.last_sync.unwrap_or_else(|| Utc::now() - self.lookback);
        let answer = self.client.c4_events(c4, since).await?;
        // Malformed events were logged by the client; count them here.
        self.health
            .skipped
            .fetch_add(answer.skipped as u64, Ordering::Relaxed);
        let events = answer.events;
        let fresh: Vec<&AktionHwEvent> = events
            .iter()
            .filter(|e| !mark.seen.contains(&e.id))
            .filter(|e| {
                mark.last_sync
                    .is_none_or(|l| second_of(e.date_created.with_timezone(&Utc)) >= second_of(l))
            })
            .collect();
        let batch: Vec<NewClocking> = fresh.iter().filter_map(|e| self.clocking(c4, e)).collect();
        let next = if mark.last_sync.is_none() {
            Mark {
                last_sync: Some(since),
                seen: HashSet::new(),
            }
            .advance(&events)
        } else {
            mark.advance(&events)
        };
        // Nothing new and the same position: nothing to write.
        if !fresh.is_empty() || next != mark {
            store(&self.ingest, &self.health, batch, next.state(c4)).await?;
        }
        self.marks.insert(c4.to_owned(), next);
        Ok(fresh.len())
    }

    fn clocking(&mut self, c4: &str, e: &AktionHwEvent) -> Option<NewClocking> {
        let Some(badge) = e.identifier.clone().filter(|b| valid_badge(b)) else {
            skip(
                &self.health,
                NAME,
                &format!("C4 {c4} event {}", e.id),
                "no usable Identifier (1 to 64 printable characters)",
            );
            return None;
        };
        let (terminal, fixed) = self.terminals.for_device(c4);
        self.check_zone(c4, e);
        let status = self.status(c4, e);
        Some(NewClocking {
            terminal,
            person: self.directory.person_for_badge(&badge).map(|p| p.id),
            badge,
            occurred_at: e.date,
            direction: direction(e.gate_direction(), fixed),
            status,
            source: Source::Aktion,
        })
    }

    /// Aktion's verdict on a passage: its `EventCode` through `sources.aktion.event_codes`.
    fn status(&mut self, c4: &str, e: &AktionHwEvent) -> Option<AccessStatus> {
        match self.event_codes.get(&e.event_code) {
            Some(AccessStatus::AccessOk) if e.owner_id.is_none() => {
                Some(AccessStatus::UnknownBadge)
            }
            Some(s) => Some(*s),
            None => {
                let n = self.unknown_codes.entry(e.event_code).or_insert(0);
                *n += 1;
                if *n == 1 {
                    tracing::warn!(
                        source = NAME,
                        c4,
                        event = %e.id,
                        event_code = e.event_code,
                        "EventCode not in sources.aktion.event_codes: the passage is stored without Aktion's verdict (the access engine decides); map it to a status"
                    );
                }
                None
            }
        }
    }

    /// Presence follows the terminal's zones; say so once when Aktion names another zone.
    fn check_zone(&mut self, c4: &str, e: &AktionHwEvent) {
        let (Some(t), Some(zone)) = (self.terminals.claimed(c4), e.zone.as_deref()) else {
            return;
        };
        let known = [&t.zone_from, &t.zone_to]
            .into_iter()
            .flatten()
            .any(|z| z.eq_ignore_ascii_case(zone));
        if t.zone_to.is_some() && !known && self.zone_warned.insert((t.id.clone(), zone.into())) {
            tracing::warn!(
                source = NAME,
                terminal = %t.id,
                aktion_zone = zone,
                zone_from = t.zone_from.as_deref(),
                zone_to = t.zone_to.as_deref(),
                "Aktion names a zone the terminal does not lead to or from; presence follows the terminal's zones"
            );
        }
    }

    /// Starts a refresh: persons into the directory, and every person queued for a look at
    /// their shifts.
    async fn load_persons(&mut self) -> Result<(), SourceError> {
        let persons = self.client.persons().await?;
        let (now, tz) = (Utc::now(), self.client.timezone());
        let people: Vec<Person> = persons.iter().map(|p| person(p, now, tz)).collect();
        self.health
            .people
            .store(people.len() as u64, Ordering::Relaxed);
        self.directory
            .replace_people(PeopleOrigin::Aktion, people)
            .await?;
        let day = Utc::now().date_naive();
        let from = (day - chrono::Days::new(1))
            .and_time(chrono::NaiveTime::MIN)
            .and_utc();
        self.refresh = Some(Refresh {
            day,
            from,
            to: from + chrono::Days::new(u64::from(self.shift_days) + 1),
            listed: persons.iter().map(|p| p.person_id.clone()).collect(),
            queue: persons.into_iter().map(|p| p.person_id).collect(),
        });
        Ok(())
    }

    /// Looks at the shifts of the next few queued persons; the refresh ends with the last.
    async fn look_at_shifts(&mut self) -> Result<(), SourceError> {
        let Some(mut r) = self.refresh.take() else {
            return Ok(());
        };
        let result = self.look_at_some(&mut r).await;
        if result.is_err() || !r.queue.is_empty() {
            self.refresh = Some(r);
            return result;
        }
        // Persons Aktion no longer lists keep no shifts.
        let gone: Vec<String> = self
            .looked
            .keys()
            .filter(|id| !r.listed.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.directory
                .replace_shifts(&id, r.from, r.to, Vec::new())
                .await?;
            self.looked.remove(&id);
        }
        let shifts: usize = self.looked.values().map(|l| l.shifts).sum();
        self.health.shifts.store(shifts as u64, Ordering::Relaxed);
        self.people_due = Instant::now() + self.people_every;
        Ok(())
    }

    /// A person's window is loaded in full once a day; otherwise only when a query by
    /// `TimeLastChange` finds a shift changed since the last look.
    async fn look_at_some(&mut self, r: &mut Refresh) -> Result<(), SourceError> {
        for _ in 0..SHIFT_LOOKS_PER_POLL {
            let Some(id) = r.queue.front().cloned() else {
                return Ok(());
            };
            let now = Utc::now();
            let look = self.looked.get(&id).copied().filter(|l| l.day == r.day);
            let changed = match look {
                Some(l) => self
                    .shifts(&id, r.from, r.to, Some(l.at - CHANGE_MARGIN))
                    .await?
                    .is_some_and(|c| !c.is_empty()),
                None => true,
            };
            match (changed, look) {
                (false, Some(l)) => {
                    self.looked.insert(id.clone(), Look { at: now, ..l });
                }
                _ => {
                    // None: gone between the list and the query; the next refresh forgets it.
                    if let Some(shifts) = self.shifts(&id, r.from, r.to, None).await? {
                        let count = shifts.len();
                        self.directory
                            .replace_shifts(&id, r.from, r.to, shifts)
                            .await?;
                        self.looked.insert(
                            id.clone(),
                            Look {
                                day: r.day,
                                at: now,
                                shifts: count,
                            },
                        );
                    }
                }
            }
            r.queue.pop_front();
        }
        Ok(())
    }

    /// The shifts of `person` beginning in `[from, to)` (the query also lists those overlapping
    /// the window from before it); `None` when Aktion no longer knows the person.
    async fn shifts(
        &self,
        person: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        changed_since: Option<DateTime<Utc>>,
    ) -> Result<Option<Vec<Shift>>, SourceError> {
        match self
            .client
            .scheduled_shifts(person, from, to, changed_since)
            .await
        {
            Ok(shifts) => Ok(Some(
                shifts
                    .into_iter()
                    .filter(|s| s.begin >= from && s.begin < to)
                    .map(|s| Shift {
                        name: s.name,
                        begin: s.begin,
                        end: s.end,
                    })
                    .collect(),
            )),
            Err(CloudError {
                kind: ErrorKind::Vendor(a),
                ..
            }) if a.status == 404 => {
                tracing::debug!(source = NAME, person, answer = %a, "person not found for shifts");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Poller for AktionSource {
    async fn poll(&mut self) -> Result<Round, SourceError> {
        let mut first_error = None;
        // Persons first, so that the passages read next find their holders.
        if self.refresh.is_none() && Instant::now() >= self.people_due {
            if let Err(e) = self.load_persons().await {
                first_error.get_or_insert(e);
            }
        }
        // Every controller is read even when one fails (a wrong identification must not stop
        // the others); the first failure is reported.
        for c4 in self.c4s.clone() {
            if let Err(e) = self.events(&c4).await {
                first_error.get_or_insert(e);
            }
        }
        // Shifts are looked at a few persons per poll, so that passages are read between
        // slices however many persons there are.
        if let Err(e) = self.look_at_shifts().await {
            first_error.get_or_insert(e);
        }
        let mut marks: Vec<String> = self
            .c4s
            .iter()
            .map(|c| match self.marks.get(c).and_then(|m| m.last_sync) {
                Some(l) => format!("{c} since {}", l.to_rfc3339()),
                None => format!("{c} from {} h back", self.lookback.num_hours()),
            })
            .collect();
        if !self.unknown_codes.is_empty() {
            let codes: Vec<String> = self
                .unknown_codes
                .iter()
                .map(|(c, n)| format!("{c} ({n}×)"))
                .collect();
            marks.push(format!("unmapped EventCodes: {}", codes.join(", ")));
        }
        self.health.set_position(marks.join(", "));
        match first_error {
            Some(e) => Err(e),
            None if self.refresh.is_some() => Ok(Round::Behind),
            None => Ok(Round::CaughtUp),
        }
    }
}

/// A person as the access engine knows them.
fn person(p: &AktionPerson, now: DateTime<Utc>, tz: chrono_tz::Tz) -> Person {
    let name: Vec<&str> = [p.name.as_deref(), p.surname.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    Person {
        id: p.person_id.clone(),
        name: (!name.is_empty()).then(|| name.join(" ")),
        badges: person_badges(p, now, tz),
        groups: p.department.iter().cloned().collect(),
        locked: p.locked(),
    }
}

#[cfg(all(test, feature = "kit"))]
mod tests {
    use super::*;
    use crate::kit::fakes::aktion::{self as fake, FakeAktion};
    use crate::metrics::Metrics;
    use crate::store::{SinkId, Writer};

    /// The source in-process against the fake, to look into the directory it fills.
    #[tokio::test]
    async fn persons_and_shifts_reach_the_directory_with_night_shifts_ending_next_day() {
        let fake = FakeAktion::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("fake");
        let ctl = fake.control();
        ctl.seed_example();
        let now = Utc::now();
        let today = now.date_naive().and_time(chrono::NaiveTime::MIN).and_utc();
        let night = fake::Shift {
            person_id: "100200300".into(),
            name: "night".into(),
            begin: today + chrono::Duration::hours(22),
            end: today + chrono::Duration::hours(30),
            description: String::new(),
            time_last_change: now,
        };
        ctl.add_shift(night.clone());
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("key"), fake::DEFAULT_API_KEY).expect("key");
        let config = Config::parse(
            &format!(
                "[agent]\nsite = \"s\"\ndata_dir = \"{}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n\
                 [sources.aktion]\nbase_url = \"{}\"\nallow_insecure_http = true\nuser_login = \"{}\"\napi_key_file = \"key\"\n",
                dir.path().display(),
                fake.base_url(),
                fake::DEFAULT_USER_LOGIN
            ),
            dir.path(),
        )
        .expect("config");
        let store = Arc::new(Store::open(dir.path(), &[SinkId::Mqtt]).expect("store"));
        let (writer, handle) = Writer::start(store.clone(), 30, None);
        let metrics = Arc::new(Metrics::new([]).with_sources([Source::Aktion]));
        let ingest = Ingest::new(Arc::new(config.clone()), handle, metrics.clone());
        let directory = Directory::new();
        let cfg = config.sources.aktion.clone().expect("aktion");
        let mut source = AktionSource::new(
            &cfg,
            &config,
            directory.clone(),
            ingest,
            store,
            metrics.source(Source::Aktion),
        )
        .expect("source");
        while source.poll().await.expect("poll") == Round::Behind {}

        let p = directory.person_for_badge("123456").expect("badge map");
        assert_eq!(p.id, "100200300");
        assert_eq!(p.name.as_deref(), Some("Jan Novak"));
        assert_eq!(p.groups, ["Production"]);
        let shifts = directory.shifts_of("100200300");
        // The seed's 2019 shifts lie outside the window; tonight's night shift is held.
        assert_eq!(shifts.len(), 1, "{shifts:?}");
        assert_eq!((shifts[0].begin, shifts[0].end), (night.begin, night.end));
        assert!(shifts[0].begin < shifts[0].end);
        assert_eq!(
            metrics
                .source(Source::Aktion)
                .shifts
                .load(Ordering::Relaxed),
            1
        );
        drop(source);
        writer.join();
        fake.shutdown().await;
    }
}
