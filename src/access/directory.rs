//! Who the badges belong to, and when they are expected: the person directory the access engine
//! decides with. Filled by the person sources (the local `access.people_file`, the Protime and
//! Aktion mirrors); each origin replaces its own part wholesale, so a person deleted in the cloud
//! disappears here at the next load.
//!
//! This is the interface the cloud sources call. The access engine owns what is behind it
//! (persistence in the store, re-publishing UnknownBadge clockings whose badge gained a person).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// Where a person record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeopleOrigin {
    File,
    Protime,
    Aktion,
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
    shifts: HashMap<String, Vec<Shift>>,
}

/// The shared directory. Cheap to clone.
#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<RwLock<Inner>>,
}

impl Directory {
    pub fn new() -> Directory {
        Directory::default()
    }

    /// Replace every person `origin` knows with `people` (a full load from that origin).
    pub async fn replace_people(
        &self,
        origin: PeopleOrigin,
        people: Vec<Person>,
    ) -> Result<(), StoreError> {
        if let Ok(mut g) = self.inner.write() {
            g.people.insert(origin, people);
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
        if let Ok(mut g) = self.inner.write() {
            let held = g.shifts.entry(person_id.to_owned()).or_default();
            held.retain(|s| s.begin < from || s.begin >= to);
            held.extend(shifts);
            held.sort_by_key(|s| s.begin);
        }
        Ok(())
    }

    /// The person holding `badge`, if any origin knows one.
    pub fn person_for_badge(&self, badge: &str) -> Option<Person> {
        let g = self.inner.read().ok()?;
        [
            PeopleOrigin::File,
            PeopleOrigin::Protime,
            PeopleOrigin::Aktion,
        ]
        .iter()
        .filter_map(|o| g.people.get(o))
        .flatten()
        .find(|p| p.badges.iter().any(|b| b == badge))
        .cloned()
    }

    /// The shifts held for `person_id`, by begin.
    pub fn shifts_of(&self, person_id: &str) -> Vec<Shift> {
        self.inner
            .read()
            .ok()
            .and_then(|g| g.shifts.get(person_id).cloned())
            .unwrap_or_default()
    }
}
