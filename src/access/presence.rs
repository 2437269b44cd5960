//! Presence: where each person is, as the last accepted passage (a transition) put them.
//!
//! One rule merges everything, local decisions, cloud mirrors and other gateways' transitions:
//! **latest wins**, ordered by (`occurred_at` as an instant, clocking id). Applying a transition
//! that is not newer than the one held changes nothing, so applying the same transitions in any
//! order, any number of times, ends in the same state (see the property test below). That is what
//! lets several gateways share presence through the broker without coordination.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::rules::{Rules, OUTSIDE};
use crate::model::{ClockingId, PresenceTransition};

/// Where a person is since which passage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub zone: Arc<str>,
    /// The zone that passage left.
    pub from: Arc<str>,
    pub at: DateTime<FixedOffset>,
    pub terminal: Arc<str>,
    pub badge: Box<str>,
    pub person: Option<Box<str>>,
    pub clocking: ClockingId,
    /// The gateway whose decision it was (its MQTT client id); None for this gateway.
    pub gateway: Option<Arc<str>>,
}

/// The total order of transitions: the instant, then the clocking id to break ties.
pub type Order = (i64, u32, [u8; 16]);

impl Presence {
    pub fn order(&self) -> Order {
        order_of(self.at, self.clocking)
    }

    /// The identity presence is kept under: the person when known, else the badge.
    pub fn subject(&self) -> String {
        subject_key(self.person.as_deref(), &self.badge)
    }

    /// The muster-list entry.
    pub fn to_json(&self) -> Value {
        json!({
            "person": self.person.as_deref(),
            "badge": &*self.badge,
            "since": self.at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
            "terminal": &*self.terminal,
        })
    }
}

pub fn order_of(at: DateTime<FixedOffset>, id: ClockingId) -> Order {
    (at.timestamp(), at.timestamp_subsec_nanos(), id.0)
}

/// The key of a subject: `p:` + person id, or `b:` + badge when no person is known.
pub fn subject_key(person: Option<&str>, badge: &str) -> String {
    match person {
        Some(p) => format!("p:{p}"),
        None => format!("b:{badge}"),
    }
}

/// How a held presence counts at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held<'a> {
    /// Nothing held: the person has not passed a gate yet (or it was forgotten).
    Nothing,
    /// Held and in force.
    Known(&'a Presence),
    /// Held, but from before the last daily forgive time: anti-passback does not use it.
    Forgiven(&'a Presence),
    /// Older than `access.presence_ttl_hours`: the zone counts as unknown.
    Expired(&'a Presence),
}

impl<'a> Held<'a> {
    pub fn of(p: Option<&'a Presence>, at: DateTime<Utc>, rules: &Rules) -> Held<'a> {
        let Some(p) = p else {
            return Held::Nothing;
        };
        let since = p.at.with_timezone(&Utc);
        if rules.presence_ttl.is_some_and(|ttl| at - since >= ttl) {
            return Held::Expired(p);
        }
        if rules.last_forgive(at).is_some_and(|f| since < f) {
            return Held::Forgiven(p);
        }
        Held::Known(p)
    }

    /// The presence, unless it expired.
    pub fn location(&self) -> Option<&'a Presence> {
        match *self {
            Held::Known(p) | Held::Forgiven(p) => Some(p),
            Held::Nothing | Held::Expired(_) => None,
        }
    }
}

/// Every subject's presence.
#[derive(Default)]
pub struct PresenceMap {
    entries: HashMap<Box<str>, Presence>,
    names: HashMap<Box<str>, Arc<str>>,
}

impl PresenceMap {
    pub fn new() -> PresenceMap {
        PresenceMap::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, subject: &str) -> Option<&Presence> {
        self.entries.get(subject)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Presence)> {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }

    /// One shared copy per zone, terminal and gateway name.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(Box::from(name), n.clone());
        n
    }

    /// Latest wins: hold `p` for `subject` if it is newer than what is held. Returns what was
    /// held before (`Some(None)`: nothing) when it was applied, `None` when it was not newer.
    #[allow(clippy::option_option)]
    pub fn apply(&mut self, subject: &str, p: Presence) -> Option<Option<Presence>> {
        match self.entries.get_mut(subject) {
            Some(held) if held.order() >= p.order() => None,
            Some(held) => Some(Some(std::mem::replace(held, p))),
            None => {
                self.entries.insert(Box::from(subject), p);
                Some(None)
            }
        }
    }

    /// Put back what [`apply`](Self::apply) replaced (a commit failed).
    pub fn restore(&mut self, subject: &str, previous: Option<Presence>) {
        match previous {
            Some(p) => {
                self.entries.insert(Box::from(subject), p);
            }
            None => {
                self.entries.remove(subject);
            }
        }
    }

    /// Who is in each declared zone at `now` (expired presence excluded), oldest first.
    pub fn occupancy<'a>(
        &'a self,
        rules: &'a Rules,
        now: DateTime<Utc>,
    ) -> BTreeMap<&'a str, Vec<&'a Presence>> {
        let mut zones: BTreeMap<&str, Vec<&Presence>> =
            rules.zones.iter().map(|z| (&*z.name, Vec::new())).collect();
        for p in self.entries.values() {
            if &*p.zone == OUTSIDE {
                continue;
            }
            if let Some(list) = zones.get_mut(&*p.zone) {
                if Held::of(Some(p), now, rules).location().is_some() {
                    list.push(p);
                }
            }
        }
        for list in zones.values_mut() {
            list.sort_by_key(|p| p.order());
        }
        zones
    }
}

/// The stored form (postcard) and the site-sync form share these fields.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    zone: &'a str,
    from: &'a str,
    /// Unix seconds, nanoseconds, UTC offset seconds.
    at: (i64, u32, i32),
    terminal: &'a str,
    badge: &'a str,
    person: Option<&'a str>,
    clocking: [u8; 16],
    gateway: Option<&'a str>,
}

pub fn encode(p: &Presence) -> Vec<u8> {
    let s = Stored {
        zone: &p.zone,
        from: &p.from,
        at: (
            p.at.timestamp(),
            p.at.timestamp_subsec_nanos(),
            p.at.offset().local_minus_utc(),
        ),
        terminal: &p.terminal,
        badge: &p.badge,
        person: p.person.as_deref(),
        clocking: p.clocking.0,
        gateway: p.gateway.as_deref(),
    };
    // Strings and integers always encode.
    postcard::to_allocvec(&s).unwrap_or_default()
}

pub fn decode(bytes: &[u8], map: &mut PresenceMap) -> Result<Presence, String> {
    let s: Stored = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
    let (secs, nanos, off) = s.at;
    let at = FixedOffset::east_opt(off)
        .and_then(|o| o.timestamp_opt(secs, nanos).single())
        .ok_or_else(|| format!("bad time {secs}.{nanos}{off:+}"))?;
    Ok(Presence {
        zone: map.intern(s.zone),
        from: map.intern(s.from),
        at,
        terminal: map.intern(s.terminal),
        badge: Box::from(s.badge),
        person: s.person.map(Box::from),
        clocking: ClockingId(s.clocking),
        gateway: s.gateway.map(|g| map.intern(g)),
    })
}

impl Presence {
    /// This presence as the transition shared with the other gateways of the site.
    pub fn transition(&self, gateway: &str) -> PresenceTransition {
        PresenceTransition {
            gateway: gateway.to_owned(),
            person: self.person.as_deref().map(str::to_owned),
            badge: self.badge.to_string(),
            zone: self.zone.to_string(),
            from: self.from.to_string(),
            occurred_at: self.at,
            terminal: self.terminal.to_string(),
            clocking_id: self.clocking.to_string(),
        }
    }

    /// Another gateway's transition, as a presence entry held for it.
    pub fn from_transition(t: &PresenceTransition, map: &mut PresenceMap) -> Option<Presence> {
        Some(Presence {
            zone: map.intern(&t.zone),
            from: map.intern(&t.from),
            at: t.occurred_at,
            terminal: map.intern(&t.terminal),
            badge: Box::from(t.badge.as_str()),
            person: t.person.as_deref().map(Box::from),
            clocking: t.clocking_id.parse().ok()?,
            gateway: Some(map.intern(&t.gateway)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn presence(map: &mut PresenceMap, zone: &str, secs: i64, id: u8, gw: &str) -> Presence {
        Presence {
            zone: map.intern(zone),
            from: map.intern(OUTSIDE),
            at: FixedOffset::east_opt(3600)
                .unwrap()
                .timestamp_opt(1_780_000_000 + secs, 0)
                .unwrap(),
            terminal: map.intern("gate"),
            badge: "4711".into(),
            person: None,
            clocking: ClockingId([id; 16]),
            gateway: Some(map.intern(gw)),
        }
    }

    #[test]
    fn latest_wins_and_the_same_transition_twice_changes_nothing() {
        let mut m = PresenceMap::new();
        let a = presence(&mut m, "hall", 10, 1, "g1");
        let b = presence(&mut m, "lab", 20, 2, "g2");
        assert_eq!(m.apply("b:4711", b.clone()), Some(None));
        assert_eq!(m.apply("b:4711", a.clone()), None, "older loses");
        assert_eq!(m.apply("b:4711", b.clone()), None, "idempotent");
        assert_eq!(m.get("b:4711"), Some(&b));
        // Same instant: the clocking id decides, the same way everywhere.
        let c = presence(&mut m, "yard", 20, 3, "g3");
        assert_eq!(m.apply("b:4711", c.clone()), Some(Some(b.clone())));
        m.restore("b:4711", Some(b.clone()));
        assert_eq!(m.get("b:4711"), Some(&b));
    }

    #[test]
    fn stored_form_round_trips() {
        let mut m = PresenceMap::new();
        let mut p = presence(&mut m, "hall", 10, 7, "g1");
        p.person = Some("E-1".into());
        let back = decode(&encode(&p), &mut m).unwrap();
        assert_eq!(back, p);
        assert!(Arc::ptr_eq(&back.zone, &p.zone), "names are shared");
        let t = p.transition("g1");
        let parsed = PresenceTransition::parse(&t.to_json()).unwrap();
        assert_eq!(parsed, t);
        assert_eq!(Presence::from_transition(&parsed, &mut m).unwrap(), p);
        assert!(PresenceTransition::parse(br#"{"gateway":"g"}"#).is_err());
        let mut bad: Value = serde_json::from_slice(&t.to_json()).unwrap();
        bad["clocking_id"] = json!("xyz");
        assert!(PresenceTransition::parse(bad.to_string().as_bytes()).is_err());
    }

    /// Any delivery order of the same transitions (with duplicates, as at-least-once delivery
    /// and retained re-sends produce) converges to the same state on every gateway.
    #[test]
    fn any_delivery_order_converges_to_the_same_state() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let zones = ["outside", "hall", "lab", "yard"];
        for round in 0..200 {
            let mut names = PresenceMap::new();
            let subjects: Vec<String> = (0..rng.random_range(1..8))
                .map(|i| format!("p:{i}"))
                .collect();
            let mut transitions: Vec<(String, Presence)> = (0..rng.random_range(1..60))
                .map(|_| {
                    let s = subjects[rng.random_range(0..subjects.len())].clone();
                    let zone = zones[rng.random_range(0..zones.len())];
                    // Few distinct instants, so ties (broken by the id) are common.
                    let secs = rng.random_range(0..20);
                    let id = rng.random::<u8>();
                    let gw = format!("g{}", rng.random_range(0..3));
                    let p = presence(&mut names, zone, secs, id, &gw);
                    (s, p)
                })
                .collect();
            // The expected state: per subject, the maximum by (instant, id).
            let mut expected: HashMap<String, Presence> = HashMap::new();
            for (s, p) in &transitions {
                let e = expected.entry(s.clone()).or_insert_with(|| p.clone());
                if p.order() > e.order() {
                    *e = p.clone();
                }
            }
            for _ in 0..5 {
                let mut delivered = transitions.clone();
                // Duplicates, as redeliveries and retained messages produce.
                for _ in 0..rng.random_range(0..10) {
                    let i = rng.random_range(0..transitions.len());
                    delivered.push(transitions[i].clone());
                }
                delivered.shuffle(&mut rng);
                let mut m = PresenceMap::new();
                for (s, p) in delivered {
                    m.apply(&s, p);
                }
                let got: HashMap<String, Presence> =
                    m.iter().map(|(k, v)| (k.to_owned(), v.clone())).collect();
                assert_eq!(got, expected, "round {round}");
            }
            transitions.clear();
        }
    }
}
