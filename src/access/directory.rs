//! Who the badges belong to, and when they are expected: the person directory the access engine
//! decides with. Filled by the person sources (the local `access.people_file`, the Protime and
//! Aktion mirrors); each origin replaces its own part wholesale, so a person deleted in the cloud
//! disappears here at the next load.
//!
//! This is the interface the cloud sources call. Behind it: people and shifts are persisted in
//! the store (a restart decides with what was last loaded, before any cloud answers), a badge
//! index answers the writer's look-ups, and a badge that gains a person has its UnknownBadge
//! clockings re-published with that person (status unchanged, as Protime does).
//!
//! When two origins know the same badge, the file wins over Protime, Protime over Aktion.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::store::{Change, SinkId, Store, StoreError, TableWrite, WriterHandle};

/// Where a person record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeopleOrigin {
    File,
    Protime,
    Aktion,
}

impl PeopleOrigin {
    /// By priority: a badge known to several origins belongs to the first one's person.
    pub const ALL: [PeopleOrigin; 3] = [
        PeopleOrigin::File,
        PeopleOrigin::Protime,
        PeopleOrigin::Aktion,
    ];

    fn code(self) -> u8 {
        match self {
            PeopleOrigin::File => 0,
            PeopleOrigin::Protime => 1,
            PeopleOrigin::Aktion => 2,
        }
    }

    fn from_code(c: u8) -> Option<PeopleOrigin> {
        PeopleOrigin::ALL.into_iter().find(|o| o.code() == c)
    }
}

/// A person as the access engine knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// The origin's person id (Protime's numeric id as text, Aktion's PersonId, the file's column).
    pub id: String,
    pub name: Option<String>,
    /// Every badge this person may present.
    pub badges: Vec<String>,
    /// Person groups (Aktion department, the file's groups column), for `allowed_groups`.
    pub groups: Vec<String>,
    /// Locked in the origin: refused everywhere.
    pub locked: bool,
}

/// A scheduled shift of a person: `begin < end` (a night shift ends on the next day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shift {
    pub name: String,
    pub begin: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

#[derive(Default)]
struct Inner {
    people: HashMap<PeopleOrigin, Vec<Person>>,
    /// badge → (origin, index in that origin's list), by origin priority.
    by_badge: HashMap<String, (PeopleOrigin, usize)>,
    shifts: HashMap<String, Vec<Shift>>,
}

impl Inner {
    fn reindex(&mut self) {
        let mut by_badge = HashMap::with_capacity(self.by_badge.len());
        for origin in PeopleOrigin::ALL {
            for (i, p) in self.people.get(&origin).into_iter().flatten().enumerate() {
                for b in &p.badges {
                    by_badge.entry(b.clone()).or_insert((origin, i));
                }
            }
        }
        self.by_badge = by_badge;
    }

    fn person(&self, badge: &str) -> Option<&Person> {
        let (origin, i) = self.by_badge.get(badge)?;
        self.people.get(origin)?.get(*i)
    }
}

/// The shared directory. Cheap to clone.
#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<RwLock<Inner>>,
    /// Where changes are persisted; unset for a directory that lives in memory only.
    writer: Arc<OnceLock<(WriterHandle, Arc<Metrics>)>>,
    /// One replacement at a time: each diffs against what the previous one left.
    replacing: Arc<tokio::sync::Mutex<()>>,
}

/// Read access to the directory without the means to change it: what the store's writer thread
/// decides with (holding a [`WriterHandle`] there would keep the writer from ever stopping).
#[derive(Clone, Default)]
pub struct DirectoryView {
    inner: Arc<RwLock<Inner>>,
}

impl Directory {
    /// A directory in memory only (nothing persisted, nothing re-published).
    pub fn new() -> Directory {
        Directory::default()
    }

    /// From now on persist changes (and re-publish UnknownBadge clockings) through `writer`.
    pub fn persist_with(&self, writer: WriterHandle, metrics: Arc<Metrics>) {
        let _ = self.writer.set((writer, metrics));
    }

    pub fn view(&self) -> DirectoryView {
        DirectoryView {
            inner: self.inner.clone(),
        }
    }

    /// The directory persisted in `store`, as last saved (call
    /// [`persist_with`](Self::persist_with) once the writer runs).
    pub fn load(store: &Store) -> Result<Directory, StoreError> {
        let mut inner = Inner::default();
        let mut bad = 0usize;
        store.people_rows(|origin, bytes| {
            match (
                PeopleOrigin::from_code(origin),
                postcard::from_bytes::<Person>(bytes),
            ) {
                (Some(o), Ok(p)) => inner.people.entry(o).or_default().push(p),
                _ => bad += 1,
            }
        })?;
        store.shift_rows(|person, bytes| match postcard::from_bytes::<Shift>(bytes) {
            Ok(s) => inner.shifts.entry(person.to_owned()).or_default().push(s),
            Err(_) => bad += 1,
        })?;
        if bad > 0 {
            tracing::warn!(
                unreadable = bad,
                "some stored people or shifts could not be read; the next load from their source replaces them"
            );
        }
        for list in inner.shifts.values_mut() {
            list.sort_by_key(|s| s.begin);
        }
        inner.reindex();
        Ok(Directory {
            inner: Arc::new(RwLock::new(inner)),
            writer: Arc::default(),
            replacing: Arc::default(),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace every person `origin` knows with `people` (a full load from that origin).
    pub async fn replace_people(
        &self,
        origin: PeopleOrigin,
        people: Vec<Person>,
    ) -> Result<(), StoreError> {
        let _one_at_a_time = self.replacing.lock().await;
        let (rows, before): (Vec<TableWrite>, HashSet<String>) = {
            let g = self.read();
            let held: HashMap<&str, &Person> = g
                .people
                .get(&origin)
                .into_iter()
                .flatten()
                .map(|p| (p.id.as_str(), p))
                .collect();
            let mut rows = Vec::new();
            let mut new_ids = HashSet::with_capacity(people.len());
            for p in &people {
                new_ids.insert(p.id.as_str());
                if held.get(p.id.as_str()) != Some(&p) {
                    rows.push(TableWrite::Person {
                        origin: origin.code(),
                        id: p.id.clone(),
                        value: Some(postcard::to_allocvec(p).unwrap_or_default()),
                    });
                }
            }
            for id in held.keys().filter(|id| !new_ids.contains(*id)) {
                rows.push(TableWrite::Person {
                    origin: origin.code(),
                    id: (*id).to_owned(),
                    value: None,
                });
            }
            (rows, g.by_badge.keys().cloned().collect())
        };
        if let Some((w, _)) = self.writer.get() {
            if !rows.is_empty() {
                w.change(Change::Tables(rows)).await?;
            }
        }
        let gained: Vec<(String, String)> = {
            let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
            g.people.insert(origin, people);
            g.reindex();
            g.by_badge
                .keys()
                .filter(|b| !before.contains(*b))
                .filter_map(|b| g.person(b).map(|p| (b.clone(), p.id.clone())))
                .collect()
        };
        if let (Some((w, metrics)), false) = (self.writer.get(), gained.is_empty()) {
            // To MQTT only: Protime maps badges to persons itself.
            let requeue = Change::RequeueHeld {
                sink: SinkId::Mqtt,
                badges: gained,
            };
            let n = w.change(requeue).await?;
            metrics
                .access
                .republished
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if n > 0 {
                tracing::info!(
                    republished = n,
                    "UnknownBadge clockings re-published with the person their badge now belongs to"
                );
            }
        }
        Ok(())
    }

    /// Replace the scheduled shifts of `person_id` that begin in `[from, to)` with `shifts`.
    pub async fn replace_shifts(
        &self,
        person_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        shifts: Vec<Shift>,
    ) -> Result<(), StoreError> {
        if let Some((w, _)) = self.writer.get() {
            let rows = vec![TableWrite::Shifts {
                person: person_id.to_owned(),
                from_ms: from.timestamp_millis(),
                to_ms: to.timestamp_millis(),
                shifts: shifts
                    .iter()
                    .map(|s| {
                        (
                            s.begin.timestamp_millis(),
                            s.name.clone(),
                            postcard::to_allocvec(s).unwrap_or_default(),
                        )
                    })
                    .collect(),
            }];
            w.change(Change::Tables(rows)).await?;
        }
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let held = g.shifts.entry(person_id.to_owned()).or_default();
        held.retain(|s| s.begin < from || s.begin >= to);
        held.extend(shifts);
        held.sort_by_key(|s| s.begin);
        Ok(())
    }

    /// The person holding `badge`, if any origin knows one.
    pub fn person_for_badge(&self, badge: &str) -> Option<Person> {
        self.read().person(badge).cloned()
    }

    /// The shifts held for `person_id`, by begin.
    pub fn shifts_of(&self, person_id: &str) -> Vec<Shift> {
        self.read()
            .shifts
            .get(person_id)
            .cloned()
            .unwrap_or_default()
    }

    pub fn with_person<R>(&self, badge: &str, f: impl FnOnce(Option<&Person>, &[Shift]) -> R) -> R {
        self.view().with_person(badge, f)
    }

    /// How many persons each origin holds.
    pub fn counts(&self) -> Vec<(PeopleOrigin, usize)> {
        let g = self.read();
        PeopleOrigin::ALL
            .into_iter()
            .filter_map(|o| g.people.get(&o).map(|l| (o, l.len())))
            .collect()
    }
}

impl DirectoryView {
    /// Decide with the person holding `badge` and their shifts, without copying them.
    pub fn with_person<R>(&self, badge: &str, f: impl FnOnce(Option<&Person>, &[Shift]) -> R) -> R {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let person = g.person(badge);
        let shifts = person
            .and_then(|p| g.shifts.get(&p.id))
            .map_or(&[][..], Vec::as_slice);
        f(person, shifts)
    }

    /// The shifts of a person known by id (a mirrored clocking names its person).
    pub fn with_shifts<R>(&self, person_id: &str, f: impl FnOnce(&[Shift]) -> R) -> R {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f(g.shifts.get(person_id).map_or(&[][..], Vec::as_slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(id: &str, badges: &[&str]) -> Person {
        Person {
            id: id.into(),
            name: None,
            badges: badges.iter().map(|b| (*b).to_owned()).collect(),
            groups: vec![],
            locked: false,
        }
    }

    #[tokio::test]
    async fn origins_by_priority_and_replaced_wholesale() {
        let d = Directory::new();
        d.replace_people(PeopleOrigin::Aktion, vec![person("a1", &["1", "2"])])
            .await
            .unwrap();
        d.replace_people(PeopleOrigin::File, vec![person("f1", &["2"])])
            .await
            .unwrap();
        assert_eq!(d.person_for_badge("1").unwrap().id, "a1");
        assert_eq!(d.person_for_badge("2").unwrap().id, "f1", "the file wins");
        d.replace_people(PeopleOrigin::Aktion, vec![])
            .await
            .unwrap();
        assert!(d.person_for_badge("1").is_none(), "deleted at the origin");
        let t = |h: i64| DateTime::from_timestamp(h * 3600, 0).unwrap();
        let s = |name: &str, b, e| Shift {
            name: name.into(),
            begin: t(b),
            end: t(e),
        };
        d.replace_shifts(
            "f1",
            t(0),
            t(48),
            vec![s("late", 30, 38), s("early", 6, 14)],
        )
        .await
        .unwrap();
        d.replace_shifts("f1", t(24), t(48), vec![s("night", 46, 54)])
            .await
            .unwrap();
        let names: Vec<String> = d.shifts_of("f1").into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["early", "night"]);
        d.with_person("2", |p, shifts| {
            assert_eq!(p.map(|p| p.id.as_str()), Some("f1"));
            assert_eq!(shifts.len(), 2);
        });
    }
}
