//! The state tables beside the outbox, kept for the access engine (through [`super::AccessHook`]
//! and [`TableWrite`]). Values are opaque bytes here (postcard, encoded by whoever writes them);
//! the store only knows their keys, so that it stays the one module touching the database.
//!
//! - `presence`: subject (`p:` person / `b:` badge) → presence. Written in the same transaction
//!   as the clocking that moved the person, so the two never disagree after a crash.
//! - `presence_unsent`: subject → clocking id of a transition this gateway decided and has not
//!   yet had acknowledged on the site topic (site sync).
//! - `people`: (origin, person id) → person; `shifts`: (person id, begin ms, name) → shift.
//! - `decisions`: (terminal, unix minute, badge) → the local decision, kept a week to compare
//!   with what a cloud mirror reports for the same clocking.
//! - `unknown_badges`: (badge, occurred ms, clocking id) → the UnknownBadge clocking, re-published
//!   with its person when the badge gains one.

use redb::{ReadableTable, TableDefinition};

use super::{Store, StoreError};

pub(crate) const PRESENCE: TableDefinition<&str, &[u8]> = TableDefinition::new("presence");
pub(crate) const PRESENCE_UNSENT: TableDefinition<&str, [u8; 16]> =
    TableDefinition::new("presence_unsent");
pub(crate) const PEOPLE: TableDefinition<(u8, &str), &[u8]> = TableDefinition::new("people");
pub(crate) const SHIFTS: TableDefinition<(&str, i64, &str), &[u8]> = TableDefinition::new("shifts");
pub(crate) const DECISIONS: TableDefinition<(&str, i64, &str), &[u8]> =
    TableDefinition::new("decisions");
pub(crate) const UNKNOWN_BADGES: TableDefinition<(&str, i64, [u8; 16]), &[u8]> =
    TableDefinition::new("unknown_badges");

/// One row change of the state tables, written in the writer's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableWrite {
    /// Hold a presence; `unsent` marks it for publishing on the site topic.
    Presence {
        subject: String,
        value: Vec<u8>,
        unsent: Option<[u8; 16]>,
    },
    /// The site topic acknowledged this transition (unless a newer one replaced it meanwhile).
    Sent { subject: String, clocking: [u8; 16] },
    Person {
        origin: u8,
        id: String,
        value: Option<Vec<u8>>,
    },
    /// Replace the person's shifts that begin in `[from_ms, to_ms)`.
    Shifts {
        person: String,
        from_ms: i64,
        to_ms: i64,
        shifts: Vec<(i64, String, Vec<u8>)>,
    },
    Decision {
        terminal: String,
        minute: i64,
        badge: String,
        value: Vec<u8>,
    },
    UnknownBadge {
        badge: String,
        at_ms: i64,
        id: [u8; 16],
        clocking: Vec<u8>,
    },
}

pub(crate) fn init(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(PRESENCE).map_err(StoreError::from_redb)?;
    txn.open_table(PRESENCE_UNSENT)
        .map_err(StoreError::from_redb)?;
    txn.open_table(PEOPLE).map_err(StoreError::from_redb)?;
    txn.open_table(SHIFTS).map_err(StoreError::from_redb)?;
    txn.open_table(DECISIONS).map_err(StoreError::from_redb)?;
    txn.open_table(UNKNOWN_BADGES)
        .map_err(StoreError::from_redb)?;
    Ok(())
}

/// Apply the engine's row changes inside the writer's transaction.
pub(crate) fn apply(txn: &redb::WriteTransaction, writes: &[TableWrite]) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut presence = txn.open_table(PRESENCE).map_err(StoreError::from_redb)?;
    let mut unsent = txn
        .open_table(PRESENCE_UNSENT)
        .map_err(StoreError::from_redb)?;
    let mut people = txn.open_table(PEOPLE).map_err(StoreError::from_redb)?;
    let mut shifts = txn.open_table(SHIFTS).map_err(StoreError::from_redb)?;
    let mut decisions = txn.open_table(DECISIONS).map_err(StoreError::from_redb)?;
    let mut unknown = txn
        .open_table(UNKNOWN_BADGES)
        .map_err(StoreError::from_redb)?;
    for w in writes {
        match w {
            TableWrite::Presence {
                subject,
                value,
                unsent: mark,
            } => {
                presence
                    .insert(subject.as_str(), value.as_slice())
                    .map_err(StoreError::from_redb)?;
                match mark {
                    Some(id) => {
                        unsent
                            .insert(subject.as_str(), id)
                            .map_err(StoreError::from_redb)?;
                    }
                    // Another gateway's newer transition: ours for this subject is superseded.
                    None => {
                        unsent
                            .remove(subject.as_str())
                            .map_err(StoreError::from_redb)?;
                    }
                }
            }
            TableWrite::Sent { subject, clocking } => {
                let current = unsent
                    .get(subject.as_str())
                    .map_err(StoreError::from_redb)?
                    .map(|v| v.value());
                if current == Some(*clocking) {
                    unsent
                        .remove(subject.as_str())
                        .map_err(StoreError::from_redb)?;
                }
            }
            TableWrite::Person { origin, id, value } => match value {
                Some(v) => {
                    people
                        .insert((*origin, id.as_str()), v.as_slice())
                        .map_err(StoreError::from_redb)?;
                }
                None => {
                    people
                        .remove((*origin, id.as_str()))
                        .map_err(StoreError::from_redb)?;
                }
            },
            TableWrite::Shifts {
                person,
                from_ms,
                to_ms,
                shifts: new,
            } => {
                let p = person.as_str();
                shifts
                    .retain_in((p, *from_ms, "")..(p, *to_ms, ""), |_, _| false)
                    .map_err(StoreError::from_redb)?;
                for (begin, name, v) in new {
                    shifts
                        .insert((p, *begin, name.as_str()), v.as_slice())
                        .map_err(StoreError::from_redb)?;
                }
            }
            TableWrite::Decision {
                terminal,
                minute,
                badge,
                value,
            } => {
                decisions
                    .insert(
                        (terminal.as_str(), *minute, badge.as_str()),
                        value.as_slice(),
                    )
                    .map_err(StoreError::from_redb)?;
            }
            TableWrite::UnknownBadge {
                badge,
                at_ms,
                id,
                clocking,
            } => {
                unknown
                    .insert((badge.as_str(), *at_ms, *id), clocking.as_slice())
                    .map_err(StoreError::from_redb)?;
            }
        }
    }
    Ok(())
}

/// The local decisions at `terminal` in the unix minute `minute`, as (badge, value).
pub(crate) fn decisions_at(
    txn: &redb::WriteTransaction,
    terminal: &str,
    minute: i64,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let t = txn.open_table(DECISIONS).map_err(StoreError::from_redb)?;
    let mut out = Vec::new();
    for entry in t
        .range((terminal, minute, "")..(terminal, minute + 1, ""))
        .map_err(StoreError::from_redb)?
    {
        let (k, v) = entry.map_err(StoreError::from_redb)?;
        out.push((k.value().2.to_owned(), v.value().to_vec()));
    }
    Ok(out)
}

/// The UnknownBadge clockings held for `badge`; they are removed from the table.
pub(crate) fn take_unknown(
    txn: &redb::WriteTransaction,
    badge: &str,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut t = txn
        .open_table(UNKNOWN_BADGES)
        .map_err(StoreError::from_redb)?;
    let range = (badge, i64::MIN, [0u8; 16])..=(badge, i64::MAX, [0xffu8; 16]);
    let mut out = Vec::new();
    for entry in t.range(range.clone()).map_err(StoreError::from_redb)? {
        let (_, v) = entry.map_err(StoreError::from_redb)?;
        out.push(v.value().to_vec());
    }
    t.retain_in(range, |_, _| false)
        .map_err(StoreError::from_redb)?;
    Ok(out)
}

/// Forget decisions and unknown-badge clockings from before their cutoffs (housekeeping).
pub(crate) fn prune(
    txn: &redb::WriteTransaction,
    decisions_cutoff_ms: i64,
    unknown_cutoff_ms: i64,
) -> Result<(), StoreError> {
    let mut decisions = txn.open_table(DECISIONS).map_err(StoreError::from_redb)?;
    let cutoff_minute = decisions_cutoff_ms.div_euclid(60_000);
    // Per terminal, the old rows are one range at the start: jump from terminal to terminal
    // instead of scanning a week of decisions.
    let mut from = String::new();
    loop {
        let next = decisions
            .range((from.as_str(), i64::MIN, "")..)
            .map_err(StoreError::from_redb)?
            .next()
            .transpose()
            .map_err(StoreError::from_redb)?
            .map(|(k, _)| k.value().0.to_owned());
        let Some(t) = next else { break };
        decisions
            .retain_in(
                (t.as_str(), i64::MIN, "")..(t.as_str(), cutoff_minute, ""),
                |_, _| false,
            )
            .map_err(StoreError::from_redb)?;
        // The smallest name after `t`.
        from = format!("{t}\0");
    }
    let mut unknown = txn
        .open_table(UNKNOWN_BADGES)
        .map_err(StoreError::from_redb)?;
    unknown
        .retain(|(_, at_ms, _), _| at_ms >= unknown_cutoff_ms)
        .map_err(StoreError::from_redb)?;
    Ok(())
}

impl Store {
    /// Every held presence, as (subject, value).
    pub fn presence_rows(&self, mut each: impl FnMut(&str, &[u8])) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn.open_table(PRESENCE).map_err(StoreError::from_redb)?;
        for entry in t.iter().map_err(StoreError::from_redb)? {
            let (k, v) = entry.map_err(StoreError::from_redb)?;
            each(k.value(), v.value());
        }
        Ok(())
    }

    /// Transitions this gateway decided that the site topic has not acknowledged yet.
    pub fn unsent_presence(&self) -> Result<Vec<(String, [u8; 16])>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn
            .open_table(PRESENCE_UNSENT)
            .map_err(StoreError::from_redb)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(StoreError::from_redb)? {
            let (k, v) = entry.map_err(StoreError::from_redb)?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// Every stored person, as (origin, value).
    pub fn people_rows(&self, mut each: impl FnMut(u8, &[u8])) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn.open_table(PEOPLE).map_err(StoreError::from_redb)?;
        for entry in t.iter().map_err(StoreError::from_redb)? {
            let (k, v) = entry.map_err(StoreError::from_redb)?;
            each(k.value().0, v.value());
        }
        Ok(())
    }

    /// Every stored shift, as (person, value).
    pub fn shift_rows(&self, mut each: impl FnMut(&str, &[u8])) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn.open_table(SHIFTS).map_err(StoreError::from_redb)?;
        for entry in t.iter().map_err(StoreError::from_redb)? {
            let (k, v) = entry.map_err(StoreError::from_redb)?;
            each(k.value().0, v.value());
        }
        Ok(())
    }

    /// UnknownBadge clockings held for re-publishing, by badge (for tests and tools).
    pub fn unknown_badge_count(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let db = self.db()?;
        let txn = db.begin_read().map_err(StoreError::from_redb)?;
        let t = txn
            .open_table(UNKNOWN_BADGES)
            .map_err(StoreError::from_redb)?;
        t.len().map_err(StoreError::from_redb)
    }
}
