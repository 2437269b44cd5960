//! The Protime mirror (`sinks.protime.mirror = true`): Protime's access clockings become
//! clockings with `source: "protime"` and Protime's status, and Protime's people feed the access
//! engine's badge map.
//!
//! - **Delta.** The first poll loads `mirror_days` of access clockings (every page, following
//!   `nextLink` across empty pages) and keeps the `deltaLink`; later polls call the link, one
//!   page per round, until a round brings nothing. The link and the `changeVersion` held per
//!   access clocking are committed with the clockings of the round, in one transaction, so a
//!   restart resumes from the stored link. 410 (the link expired): a full re-sync, in which what
//!   is already held is recognised by its version and not stored again. 409 (another delta is
//!   active): back off and try again.
//! - **Versions.** A change whose `changeVersion` is not newer than the one held is stale and
//!   ignored. An update whose content changed is published as a new clocking (clockings are
//!   facts that were already delivered; an id never changes meaning); a deletion is remembered
//!   (so a stale re-send cannot bring the item back) but cannot be taken back from subscribers.
//! - **Identity.** Protime gives a date and a minute in its tenant's zone (`sinks.protime.
//!   timezone`): `occurred_at` is that minute. The badge is the person's `@badge-number` (from
//!   the item, else from the people list); the person is Protime's person id. The terminal is
//!   the configured terminal named by the item's `@external-code` (the sink sends our terminal id
//!   as that code), else `protime-<Protime terminal id>`. Protime has no direction: `unknown`, or
//!   the terminal's fixed one.
//! - **No echo.** The store never queues a clocking from Protime for the Protime sink.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveTime, Utc};
use chrono_tz::Tz;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{default_terminal_id, direction, skip, store, Poller, Round, SourceError};
use crate::access::directory::{Directory, PeopleOrigin, Person};
use crate::clouds::protime::{
    apply_access_changes, AccessClocking, AccessDelta, Applied, HeldAccess, ProtimeClient,
};
use crate::clouds::{CloudError, ErrorKind};
use crate::config::ProtimeConfig;
use crate::ingest::Ingest;
use crate::metrics::SourceHealth;
use crate::model::{local_to_instant, valid_badge, Direction, NewClocking, Source};
use crate::store::{Store, StoreError};

/// State keys: the `deltaLink` to call next, and the versions held per access clocking.
pub const LINK_KEY: &str = "protime.mirror.delta_link";
pub const HELD_KEY: &str = "protime.mirror.held";
/// Delta rounds (one page each) per poll; a longer backlog continues at once.
const MAX_ROUNDS: usize = 50;
/// Deletions remembered at most (the oldest versions are forgotten first).
const MAX_TOMBSTONES: usize = 10_000;
const NAME: &str = "protime";

pub struct ProtimeMirror {
    client: ProtimeClient,
    tz: Tz,
    days: u32,
    every: Duration,
    people_every: Duration,
    people_due: Instant,
    /// Protime person id → badge number, from the last people load.
    badges: HashMap<i64, String>,
    directory: Directory,
    ingest: Ingest,
    store: Arc<Store>,
    health: Arc<SourceHealth>,
    /// Loaded from the store at the first poll.
    held: Option<Held>,
}

/// The mirror's position.
#[derive(Debug, Clone, Default)]
struct Held {
    link: Option<String>,
    versions: BTreeMap<i64, HeldAccess>,
}

impl ProtimeMirror {
    /// A mirror sharing `client` (its token and rate limiter) with the Protime sink.
    pub fn new(
        client: ProtimeClient,
        cfg: &ProtimeConfig,
        directory: Directory,
        ingest: Ingest,
        store: Arc<Store>,
        health: Arc<SourceHealth>,
    ) -> ProtimeMirror {
        ProtimeMirror {
            client,
            tz: cfg.timezone,
            days: cfg.mirror_days,
            every: Duration::from_secs(cfg.mirror_interval_secs),
            people_every: Duration::from_secs(cfg.people_interval_secs),
            people_due: Instant::now(),
            badges: HashMap::new(),
            directory,
            ingest,
            store,
            health,
            held: None,
        }
    }

    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let every = self.every;
        let health = self.health.clone();
        super::run(NAME, self, every, health, shutdown).await;
    }

    fn load(&self) -> Result<Held, StoreError> {
        let link = self
            .store
            .state(LINK_KEY)?
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|l| !l.is_empty());
        match self.store.state(HELD_KEY)? {
            None => Ok(Held {
                link,
                versions: BTreeMap::new(),
            }),
            Some(b) => Ok(match postcard::from_bytes(&b) {
                Ok(versions) => Held { link, versions },
                Err(e) => {
                    // Without the versions a delta cannot tell stale from new: re-sync from the
                    // full list instead (what is already stored is deduplicated by content).
                    tracing::warn!(source = NAME, error = %e, "held versions unreadable; re-syncing");
                    Held::default()
                }
            }),
        }
    }

    async fn refresh_people(&mut self) -> Result<(), SourceError> {
        let people = self.client.people().await?;
        self.badges = crate::clouds::protime::badge_map(&people)
            .into_iter()
            .map(|(badge, id)| (id, badge))
            .collect();
        let persons: Vec<Person> = people
            .iter()
            .map(|p| Person {
                id: p.id.to_string(),
                name: name(p.first_name.as_deref(), p.last_name.as_deref()),
                badges: self.badges.get(&p.id).cloned().into_iter().collect(),
                groups: Vec::new(),
                locked: false,
            })
            .collect();
        self.health
            .people
            .store(persons.len() as u64, Ordering::Relaxed);
        self.directory
            .replace_people(PeopleOrigin::Protime, persons)
            .await?;
        self.people_due = Instant::now() + self.people_every;
        Ok(())
    }

    /// One round: the initial load when no link is held, else the held link.
    async fn round(&self, link: Option<&str>) -> Result<AccessDelta, CloudError> {
        match link {
            Some(l) => self.client.access_clockings_delta(l).await,
            None => {
                let today = Utc::now().with_timezone(&self.tz).date_naive();
                let from = today - chrono::Days::new(u64::from(self.days));
                self.client.access_clockings_initial(from).await
            }
        }
    }

    async fn sync(&mut self) -> Result<Round, SourceError> {
        let mut held = match self.held.take() {
            Some(h) => h,
            None => self.load()?,
        };
        let result = self.sync_from(&mut held).await;
        self.health.set_position(if held.link.is_some() {
            "delta".into()
        } else {
            "initial load".into()
        });
        self.held = Some(held);
        result
    }

    async fn sync_from(&self, held: &mut Held) -> Result<Round, SourceError> {
        for _ in 0..MAX_ROUNDS {
            let initial = held.link.is_none();
            let delta = match self.round(held.link.as_deref()).await {
                Ok(d) => d,
                Err(e) if e.kind == ErrorKind::DeltaExpired => {
                    tracing::warn!(source = NAME, error = %e, "delta link expired; re-syncing from the full list");
                    held.link = None;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let nothing = delta.changes.is_empty();
            let mut versions = held.versions.clone();
            let applied = apply_access_changes(&mut versions, delta.changes);
            let batch: Vec<NewClocking> = applied
                .iter()
                .filter_map(|a| match a {
                    Applied::Inserted(id) | Applied::Updated(id) => match versions.get(id) {
                        Some(HeldAccess::Live(item)) => self.clocking(item),
                        _ => None,
                    },
                    Applied::Deleted(_) | Applied::Stale(_) => None,
                })
                .collect();
            let changed = applied.iter().any(|a| !matches!(a, Applied::Stale(_)));
            let mut state = vec![(LINK_KEY.to_owned(), delta.delta_link.clone().into_bytes())];
            if changed {
                self.prune(&mut versions);
                let bytes = postcard::to_allocvec(&versions)
                    .map_err(|e| StoreError::Io(format!("encoding held versions: {e}")))?;
                state.push((HELD_KEY.to_owned(), bytes));
            }
            store(&self.ingest, &self.health, batch, state).await?;
            held.link = Some(delta.delta_link);
            held.versions = versions;
            if nothing && !initial {
                return Ok(Round::CaughtUp);
            }
        }
        Ok(Round::Behind)
    }

    /// Forgets access clockings older than the mirrored days (a change to one later is simply
    /// new), and the oldest deletions beyond [`MAX_TOMBSTONES`].
    fn prune(&self, versions: &mut BTreeMap<i64, HeldAccess>) {
        let today = Utc::now().with_timezone(&self.tz).date_naive();
        let oldest = today - chrono::Days::new(u64::from(self.days) + 1);
        versions.retain(|_, h| !matches!(h, HeldAccess::Live(a) if a.date < oldest));
        let mut tombstones: Vec<(String, i64)> = versions
            .iter()
            .filter_map(|(id, h)| match h {
                HeldAccess::Deleted { change_version } => Some((change_version.clone(), *id)),
                HeldAccess::Live(_) => None,
            })
            .collect();
        if tombstones.len() > MAX_TOMBSTONES {
            tombstones.sort();
            for (_, id) in &tombstones[..tombstones.len() - MAX_TOMBSTONES] {
                versions.remove(id);
            }
        }
    }

    fn clocking(&self, a: &AccessClocking) -> Option<NewClocking> {
        let badge = a
            .badge_number
            .clone()
            .or_else(|| a.person_id.and_then(|p| self.badges.get(&p).cloned()))
            .filter(|b| valid_badge(b));
        let Some(badge) = badge else {
            skip(
                &self.health,
                NAME,
                &format!("access clocking {}", a.id),
                "no usable @badge-number, and the person's badge is not known",
            );
            return None;
        };
        let minute = u32::from(a.time_of_day_in_minutes);
        let time = NaiveTime::from_hms_opt(minute / 60, minute % 60, 0)?;
        let configured = a
            .terminal_code
            .as_deref()
            .and_then(|code| self.ingest.config().terminal(code));
        let (terminal, fixed) = match (configured, a.terminal_id, &a.terminal_code) {
            (Some(t), _, _) => (t.id.clone(), t.direction),
            (None, Some(id), _) => (format!("protime-{id}"), None),
            (None, None, Some(code)) => (default_terminal_id("protime", code), None),
            (None, None, None) => ("protime-unknown".to_owned(), None),
        };
        Some(NewClocking {
            terminal,
            badge,
            occurred_at: local_to_instant(a.date.and_time(time), self.tz),
            direction: direction(Direction::Unknown, fixed),
            status: Some(a.status),
            person: a.person_id.map(|p| p.to_string()),
            source: Source::Protime,
        })
    }
}

impl Poller for ProtimeMirror {
    async fn poll(&mut self) -> Result<Round, SourceError> {
        // People first: the badge map fills in badges the access clockings lack.
        let people = if Instant::now() >= self.people_due {
            self.refresh_people().await
        } else {
            Ok(())
        };
        let round = self.sync().await?;
        people.map(|()| round)
    }
}

/// "First Last" from the parts Protime has.
fn name(first: Option<&str>, last: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = [first, last]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}
