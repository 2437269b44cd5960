//! The decision function: a clocking, the person holding the badge, their presence, their
//! shifts and the rules in; a Protime status, the reason and the presence effect out. Pure: no
//! I/O, no clock, no locks. The README's decision table is this function, row by row, and the
//! table-driven tests below check every row.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, Utc};

use super::directory::{Person, Shift};
use super::presence::{order_of, Held, Presence};
use super::rules::{Gate, Rules, OUTSIDE};
use crate::config::AntiPassback;
use crate::model::{AccessStatus, ClockingId, Direction};

/// What is being decided: a clocking (or an access check) as its source gave it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub id: ClockingId,
    pub terminal: &'a str,
    pub badge: &'a str,
    pub at: DateTime<FixedOffset>,
    pub direction: Direction,
    /// The status the source reported (a device, or the cloud for a mirrored clocking).
    pub reported: Option<AccessStatus>,
    /// The clocking comes from a cloud mirror (Protime, Aktion) with the cloud's status.
    pub mirror: bool,
}

/// The zones a passage takes a person between, with the direction it was read in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    pub from: Arc<str>,
    pub to: Arc<str>,
    pub direction: Direction,
    /// The clocking's direction was `unknown`; presence told it.
    pub inferred: bool,
}

/// What the decision does to the person's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Unchanged,
    /// The person is now in the passage's `to` zone.
    Move,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Reported,
    Mirrored,
    UnknownBadge,
    Locked,
    NoZones,
    DirectionUnknown,
    NotInGroup(Arc<str>),
    NoShift(Arc<str>),
    Late,
    Lockout { zone: Arc<str>, secs: i64 },
    WrongZone { held: Arc<str>, left: Arc<str> },
    InNeitherZone { held: Arc<str> },
    LeftMonitoredZone(Arc<str>),
    Passed { from: Arc<str>, to: Arc<str> },
}

impl Reason {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Reported => "reported_by_device",
            Reason::Mirrored => "decided_by_cloud",
            Reason::UnknownBadge => "unknown_badge",
            Reason::Locked => "person_locked",
            Reason::NoZones => "terminal_without_zones",
            Reason::DirectionUnknown => "direction_unknown",
            Reason::NotInGroup(_) => "group_not_allowed",
            Reason::NoShift(_) => "outside_shift",
            Reason::Late => "older_than_presence",
            Reason::Lockout { .. } => "reentry_lockout",
            Reason::WrongZone { .. } => "antipassback",
            Reason::InNeitherZone { .. } => "antipassback_other_zone",
            Reason::LeftMonitoredZone(_) => "left_monitored_zone",
            Reason::Passed { .. } => "ok",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Reported => f.write_str("status reported by the terminal"),
            Reason::Mirrored => f.write_str("status decided by the cloud (mirrored clocking)"),
            Reason::UnknownBadge => f.write_str("no person holds this badge"),
            Reason::Locked => f.write_str("the person is locked"),
            Reason::NoZones => f.write_str("the terminal has no zones"),
            Reason::DirectionUnknown => {
                f.write_str("direction unknown and the person's presence does not tell it")
            }
            Reason::NotInGroup(z) => write!(f, "none of the person's groups may enter {z}"),
            Reason::NoShift(z) => write!(f, "{z} requires a scheduled shift and none is due"),
            Reason::Late => f.write_str(
                "older than the person's presence: decided without anti-passback, presence kept",
            ),
            Reason::Lockout { zone, secs } => {
                write!(
                    f,
                    "re-entry into {zone} is locked for {secs} s after a passage"
                )
            }
            Reason::WrongZone { held, left } => {
                write!(
                    f,
                    "the person is in {held}, not in {left} which this passage leaves"
                )
            }
            Reason::InNeitherZone { held } => {
                write!(
                    f,
                    "the person is in {held}, a zone this terminal does not connect"
                )
            }
            Reason::LeftMonitoredZone(z) => write!(f, "left the monitored zone {z}"),
            Reason::Passed { from, to } => write!(f, "from {from} to {to}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub status: AccessStatus,
    pub reason: Reason,
    /// The zones of the passage, when the terminal has zones and the direction is known.
    pub passage: Option<Passage>,
    pub effect: Effect,
}

impl Decision {
    fn new(status: AccessStatus, reason: Reason) -> Decision {
        Decision {
            status,
            reason,
            passage: None,
            effect: Effect::Unchanged,
        }
    }

    fn at(mut self, passage: Option<Passage>, effect: Effect) -> Decision {
        self.passage = passage;
        self.effect = if self.passage.is_some() {
            effect
        } else {
            Effect::Unchanged
        };
        self
    }

    /// The person's presence after this decision, when it moves them.
    pub fn new_presence(&self, a: &Attempt, person: Option<&str>) -> Option<Presence> {
        let passage = self
            .passage
            .as_ref()
            .filter(|_| self.effect == Effect::Move)?;
        Some(Presence {
            zone: passage.to.clone(),
            from: passage.from.clone(),
            at: a.at,
            terminal: Arc::from(a.terminal),
            badge: Box::from(a.badge),
            person: person.map(Box::from),
            clocking: a.id,
            gateway: None,
        })
    }
}

/// Decide the status of `a`. `person` is the person holding the badge (None when no person
/// source knows it, or none is configured), `presence` what is held for that person (or badge),
/// `shifts` their scheduled shifts.
pub fn decide(
    a: &Attempt,
    person: Option<&Person>,
    presence: Option<&Presence>,
    shifts: &[Shift],
    rules: &Rules,
) -> Decision {
    let at_utc = a.at.with_timezone(&Utc);
    let held = Held::of(presence, at_utc, rules);
    let gate = rules.gate(a.terminal);
    let newer = presence.is_none_or(|p| order_of(a.at, a.id) > p.order());

    // Rows 1-2: a status reported by the terminal or decided by the cloud passes through. The
    // person is moved when the terminal let them pass and the clocking is newer than presence.
    if let Some(status) = a.reported {
        let reason = if a.mirror {
            Reason::Mirrored
        } else {
            Reason::Reported
        };
        let passed = matches!(status, AccessStatus::AccessOk | AccessStatus::OutZone);
        let passage = gate.and_then(|g| resolve(g, a.direction, held).ok());
        let effect = if passed && newer {
            Effect::Move
        } else {
            Effect::Unchanged
        };
        return Decision::new(status, reason).at(passage, effect);
    }
    // Row 3.
    if rules.directory_in_use && person.is_none() {
        return Decision::new(AccessStatus::UnknownBadge, Reason::UnknownBadge);
    }
    // Row 4.
    if person.is_some_and(|p| p.locked) {
        return Decision::new(AccessStatus::AccessRefused, Reason::Locked);
    }
    // Row 5.
    let Some(gate) = gate else {
        return Decision::new(AccessStatus::AccessOk, Reason::NoZones);
    };
    let mode = rules.antipassback_of(gate);
    // Rows 6-7: which way; `unknown` is read from presence where that is unambiguous.
    let passage = match resolve(gate, a.direction, held) {
        Ok(p) => p,
        Err(Some(elsewhere)) if mode != AntiPassback::Off && matches!(held, Held::Known(_)) => {
            return Decision::new(
                AccessStatus::AntiPassbackError,
                Reason::InNeitherZone { held: elsewhere },
            );
        }
        Err(_) => return Decision::new(AccessStatus::AccessOk, Reason::DirectionUnknown),
    };
    let entered = rules.zone(&passage.to);
    // Row 8: the zone entered admits only some groups.
    if let Some(z) = entered.filter(|z| !z.allowed_groups.is_empty()) {
        let member = person.is_some_and(|p| p.groups.iter().any(|g| z.allowed_groups.contains(g)));
        if !member {
            return Decision::new(
                AccessStatus::AccessRefused,
                Reason::NotInGroup(z.name.clone()),
            )
            .at(Some(passage), Effect::Unchanged);
        }
    }
    // Row 9: the zone entered needs a shift due now (within the tolerance).
    if let Some(z) = entered.filter(|z| z.require_shift) {
        let due = person.is_some()
            && shifts.iter().any(|s| {
                s.begin - z.shift_tolerance <= at_utc && at_utc <= s.end + z.shift_tolerance
            });
        if !due {
            return Decision::new(AccessStatus::AccessRefused, Reason::NoShift(z.name.clone()))
                .at(Some(passage), Effect::Unchanged);
        }
    }
    let exit_status = rules
        .zone(&passage.from)
        .and_then(|z| z.exit_status)
        .unwrap_or(AccessStatus::AccessOk);
    // Row 10: a late clocking (a backfill older than what presence holds) cannot be checked
    // against the sequence and must not undo a newer passage.
    if !newer {
        return Decision::new(exit_status, Reason::Late).at(Some(passage), Effect::Unchanged);
    }
    let violation_effect = if mode == AntiPassback::Soft {
        Effect::Move
    } else {
        Effect::Unchanged
    };
    // Row 11: timed re-entry lockout (also with anti-passback off).
    if rules.reentry_lockout > chrono::Duration::zero() && &*passage.to != OUTSIDE {
        if let Some(p) = presence {
            let recent = at_utc - p.at.with_timezone(&Utc) < rules.reentry_lockout;
            if recent && (p.zone == passage.to || p.from == passage.to) {
                return Decision::new(
                    AccessStatus::AntiPassbackError,
                    Reason::Lockout {
                        zone: passage.to.clone(),
                        secs: rules.reentry_lockout.num_seconds(),
                    },
                )
                .at(Some(passage), violation_effect);
            }
        }
    }
    // Row 12: anti-passback: the passage must leave the zone the person is in.
    if mode != AntiPassback::Off {
        if let Held::Known(p) = held {
            if p.zone != passage.from {
                let reason = Reason::WrongZone {
                    held: p.zone.clone(),
                    left: passage.from.clone(),
                };
                return Decision::new(AccessStatus::AntiPassbackError, reason)
                    .at(Some(passage), violation_effect);
            }
        }
    }
    // Rows 13-14.
    let reason = if exit_status == AccessStatus::OutZone {
        Reason::LeftMonitoredZone(passage.from.clone())
    } else {
        Reason::Passed {
            from: passage.from.clone(),
            to: passage.to.clone(),
        }
    };
    Decision::new(exit_status, reason).at(Some(passage), Effect::Move)
}

/// The passage through `gate` in `direction`; `unknown` is inferred from where the person is.
/// Err(Some(zone)) when presence puts them in a zone the gate does not connect, Err(None) when
/// nothing tells the direction.
fn resolve(gate: &Gate, direction: Direction, held: Held) -> Result<Passage, Option<Arc<str>>> {
    let passage = |from: &Arc<str>, to: &Arc<str>, direction, inferred| Passage {
        from: from.clone(),
        to: to.clone(),
        direction,
        inferred,
    };
    match direction {
        Direction::In => Ok(passage(&gate.from, &gate.to, Direction::In, false)),
        Direction::Out => Ok(passage(&gate.to, &gate.from, Direction::Out, false)),
        Direction::Unknown => match held.location() {
            Some(p) if p.zone == gate.from => {
                Ok(passage(&gate.from, &gate.to, Direction::In, true))
            }
            Some(p) if p.zone == gate.to => Ok(passage(&gate.to, &gate.from, Direction::Out, true)),
            Some(p) => Err(Some(p.zone.clone())),
            None => Err(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONFIG: &str = r#"
        [agent]
        site = "s"
        timezone = "Europe/Brussels"
        [mqtt]
        url = "mqtt://127.0.0.1:1"
        [access]
        antipassback = "hard"
        people_file = "people.csv"
        [[zones]]
        name = "hall"
        [[zones]]
        name = "lab"
        exit_status = "OutZone"
        allowed_groups = ["chemists"]
        [[zones]]
        name = "plant"
        require_shift = true
        shift_tolerance_mins = 15
        [[terminals]]
        id = "main"
        zone_from = "outside"
        zone_to = "hall"
        [[terminals]]
        id = "lab-door"
        zone_from = "hall"
        zone_to = "lab"
        [[terminals]]
        id = "plant-door"
        zone_from = "hall"
        zone_to = "plant"
        [[terminals]]
        id = "kiosk"
    "#;

    fn base() -> Rules {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("people.csv"), "badge,person\n").unwrap();
        Rules::from_config(&Config::parse(CONFIG, dir.path()).unwrap())
    }

    fn t(s: &str) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(s).unwrap()
    }

    fn person(groups: &[&str], locked: bool) -> Person {
        Person {
            id: "E-1".into(),
            name: None,
            badges: vec!["4711".into()],
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            locked,
        }
    }

    fn at(zone: &str, from: &str, when: &str) -> Presence {
        Presence {
            zone: Arc::from(zone),
            from: Arc::from(from),
            at: t(when),
            terminal: Arc::from("main"),
            badge: "4711".into(),
            person: Some("E-1".into()),
            clocking: ClockingId([0; 16]),
            gateway: None,
        }
    }

    fn shift(begin: &str, end: &str) -> Shift {
        Shift {
            name: "s".into(),
            begin: t(begin).with_timezone(&Utc),
            end: t(end).with_timezone(&Utc),
        }
    }

    struct Row {
        what: &'static str,
        terminal: &'static str,
        direction: Direction,
        at: &'static str,
        reported: Option<AccessStatus>,
        mirror: bool,
        person: Option<Person>,
        presence: Option<Presence>,
        shifts: Vec<Shift>,
        status: AccessStatus,
        code: &'static str,
        /// The zone presence moves to, or None when it is unchanged.
        moves_to: Option<&'static str>,
    }

    fn row(what: &'static str, terminal: &'static str, direction: Direction) -> Row {
        Row {
            what,
            terminal,
            direction,
            at: "2026-05-04T09:00:00+02:00",
            reported: None,
            mirror: false,
            person: Some(person(&[], false)),
            presence: None,
            shifts: Vec::new(),
            status: AccessStatus::AccessOk,
            code: "ok",
            moves_to: None,
        }
    }

    fn check(rules: &Rules, rows: Vec<Row>) {
        for r in rows {
            let a = Attempt {
                id: ClockingId([9; 16]),
                terminal: r.terminal,
                badge: "4711",
                at: t(r.at),
                direction: r.direction,
                reported: r.reported,
                mirror: r.mirror,
            };
            let d = decide(&a, r.person.as_ref(), r.presence.as_ref(), &r.shifts, rules);
            assert_eq!(
                (d.status, d.reason.code()),
                (r.status, r.code),
                "{}: {d:?}",
                r.what
            );
            let moved = d.new_presence(&a, Some("E-1")).map(|p| p.zone.to_string());
            assert_eq!(moved.as_deref(), r.moves_to, "{}: effect {d:?}", r.what);
            assert!(!d.reason.to_string().is_empty());
        }
    }

    use AccessStatus::*;
    use Direction::{In, Out, Unknown};

    /// Every row of the README's decision table, in its order.
    #[test]
    fn decision_table() {
        let rules = base();
        let early = "2026-05-04T08:00:00+02:00";
        let rows = vec![
            // 1. Reported by the terminal: passes through.
            Row {
                reported: Some(WrongPinCode),
                status: WrongPinCode,
                code: "reported_by_device",
                ..row("1 wrong pin", "main", In)
            },
            Row {
                reported: Some(AlarmCode),
                status: AlarmCode,
                code: "reported_by_device",
                ..row("1 alarm", "main", In)
            },
            Row {
                reported: Some(AccessOk),
                status: AccessOk,
                code: "reported_by_device",
                moves_to: Some("hall"),
                ..row("1 reported ok moves", "main", In)
            },
            Row {
                reported: Some(AccessOk),
                person: None,
                status: AccessOk,
                code: "reported_by_device",
                ..row("1 reported ok without zones", "kiosk", In)
            },
            // 2. Mirrored from the cloud: the cloud's status; presence moves when newer.
            Row {
                reported: Some(AccessOk),
                mirror: true,
                presence: Some(at("outside", "hall", early)),
                status: AccessOk,
                code: "decided_by_cloud",
                moves_to: Some("hall"),
                ..row("2 mirror, direction inferred", "main", Unknown)
            },
            Row {
                reported: Some(OutZone),
                mirror: true,
                presence: Some(at("lab", "hall", early)),
                status: OutZone,
                code: "decided_by_cloud",
                moves_to: Some("hall"),
                ..row("2 mirror out of lab", "lab-door", Unknown)
            },
            Row {
                reported: Some(AccessOk),
                mirror: true,
                presence: Some(at("hall", "outside", "2026-05-04T10:00:00+02:00")),
                status: AccessOk,
                code: "decided_by_cloud",
                ..row("2 mirror older than presence", "main", Out)
            },
            Row {
                reported: Some(AntiPassbackError),
                mirror: true,
                presence: Some(at("hall", "outside", early)),
                status: AntiPassbackError,
                code: "decided_by_cloud",
                ..row("2 mirror refusal does not move", "main", In)
            },
            // 3. Unknown badge.
            Row {
                person: None,
                status: UnknownBadge,
                code: "unknown_badge",
                ..row("3 unknown badge", "main", In)
            },
            Row {
                person: None,
                status: UnknownBadge,
                code: "unknown_badge",
                ..row("3 unknown badge, no zones", "kiosk", In)
            },
            // 4. Locked.
            Row {
                person: Some(person(&["chemists"], true)),
                status: AccessRefused,
                code: "person_locked",
                ..row("4 locked", "main", In)
            },
            // 5. No zones.
            Row {
                status: AccessOk,
                code: "terminal_without_zones",
                ..row("5 kiosk", "kiosk", In)
            },
            // 6. Direction unknown: inferred from presence, else no move.
            Row {
                presence: Some(at("hall", "outside", early)),
                status: AccessOk,
                code: "ok",
                moves_to: Some("outside"),
                ..row("6 inferred out", "main", Unknown)
            },
            Row {
                presence: Some(at("outside", "hall", early)),
                status: AccessOk,
                code: "ok",
                moves_to: Some("hall"),
                ..row("6 inferred in", "main", Unknown)
            },
            Row {
                status: AccessOk,
                code: "direction_unknown",
                ..row("6 nothing to infer from", "main", Unknown)
            },
            // 7. Direction unknown, person in a zone the gate does not connect.
            Row {
                presence: Some(at("plant", "hall", early)),
                status: AntiPassbackError,
                code: "antipassback_other_zone",
                ..row("7 elsewhere", "main", Unknown)
            },
            // 8. Groups.
            Row {
                status: AccessRefused,
                code: "group_not_allowed",
                ..row("8 not a chemist", "lab-door", In)
            },
            Row {
                person: Some(person(&["chemists"], false)),
                status: AccessOk,
                code: "ok",
                moves_to: Some("lab"),
                ..row("8 a chemist", "lab-door", In)
            },
            // 9. Shift required.
            Row {
                status: AccessRefused,
                code: "outside_shift",
                ..row("9 no shift", "plant-door", In)
            },
            Row {
                shifts: vec![shift(
                    "2026-05-04T09:10:00+02:00",
                    "2026-05-04T17:00:00+02:00",
                )],
                status: AccessOk,
                code: "ok",
                moves_to: Some("plant"),
                ..row("9 within tolerance before the shift", "plant-door", In)
            },
            Row {
                shifts: vec![shift(
                    "2026-05-04T09:20:00+02:00",
                    "2026-05-04T17:00:00+02:00",
                )],
                status: AccessRefused,
                code: "outside_shift",
                ..row("9 beyond the tolerance", "plant-door", In)
            },
            Row {
                status: AccessOk,
                code: "ok",
                moves_to: Some("hall"),
                ..row("9 leaving needs no shift", "plant-door", Out)
            },
            // 10. Late clocking.
            Row {
                presence: Some(at("hall", "outside", "2026-05-04T10:00:00+02:00")),
                status: AccessOk,
                code: "older_than_presence",
                ..row("10 backfilled", "main", In)
            },
            // 12. Anti-passback (hard: presence stays).
            Row {
                presence: Some(at("hall", "outside", early)),
                status: AntiPassbackError,
                code: "antipassback",
                ..row("12 in twice", "main", In)
            },
            Row {
                presence: Some(at("outside", "hall", early)),
                status: AntiPassbackError,
                code: "antipassback",
                ..row("12 out twice", "main", Out)
            },
            // 13. OutZone when leaving a monitored zone.
            Row {
                person: Some(person(&["chemists"], false)),
                presence: Some(at("lab", "hall", early)),
                status: OutZone,
                code: "left_monitored_zone",
                moves_to: Some("hall"),
                ..row("13 out of the lab", "lab-door", Out)
            },
            // 14. Otherwise AccessOk.
            Row {
                presence: Some(at("outside", "hall", early)),
                status: AccessOk,
                code: "ok",
                moves_to: Some("hall"),
                ..row("14 in after out", "main", In)
            },
            Row {
                status: AccessOk,
                code: "ok",
                moves_to: Some("hall"),
                ..row("14 first passage", "main", In)
            },
        ];
        check(&rules, rows);
    }

    #[test]
    fn soft_flags_but_moves_and_off_never_flags() {
        let soft = base().with_antipassback(AntiPassback::Soft);
        let held = || Some(at("hall", "outside", "2026-05-04T08:00:00+02:00"));
        check(
            &soft,
            vec![Row {
                presence: held(),
                status: AntiPassbackError,
                code: "antipassback",
                moves_to: Some("hall"),
                ..row("soft in twice", "main", In)
            }],
        );
        let off = base().with_antipassback(AntiPassback::Off);
        check(
            &off,
            vec![
                Row {
                    presence: held(),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("hall"),
                    ..row("off in twice", "main", In)
                },
                Row {
                    presence: Some(at("plant", "hall", "2026-05-04T08:00:00+02:00")),
                    status: AccessOk,
                    code: "direction_unknown",
                    ..row("off elsewhere", "main", Unknown)
                },
            ],
        );
        // A zone's own mode overrides the global one for the gates leading into it.
        let rules = base().with_zone_mode("hall", AntiPassback::Soft);
        check(
            &rules,
            vec![Row {
                presence: held(),
                status: AntiPassbackError,
                code: "antipassback",
                moves_to: Some("hall"),
                ..row("hall is soft", "main", In)
            }],
        );
    }

    #[test]
    fn reentry_lockout() {
        let rules = base().with_antipassback(AntiPassback::Off).with_lockout(60);
        check(
            &rules,
            vec![
                // Out of the hall 30 s ago: no way back in for 60 s.
                Row {
                    at: "2026-05-04T09:00:30+02:00",
                    presence: Some(at("outside", "hall", "2026-05-04T09:00:00+02:00")),
                    status: AntiPassbackError,
                    code: "reentry_lockout",
                    ..row("re-entry within 60 s", "main", In)
                },
                // In 30 s ago, in again (badge passed back): locked too, even with anti-passback off.
                Row {
                    at: "2026-05-04T09:00:30+02:00",
                    presence: Some(at("hall", "outside", "2026-05-04T09:00:00+02:00")),
                    status: AntiPassbackError,
                    code: "reentry_lockout",
                    ..row("passback within 60 s", "main", In)
                },
                Row {
                    at: "2026-05-04T09:01:00+02:00",
                    presence: Some(at("outside", "hall", "2026-05-04T09:00:00+02:00")),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("hall"),
                    ..row("after 60 s", "main", In)
                },
                // Leaving is never locked out.
                Row {
                    at: "2026-05-04T09:00:10+02:00",
                    presence: Some(at("hall", "outside", "2026-05-04T09:00:00+02:00")),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("outside"),
                    ..row("leave at once", "main", Out)
                },
            ],
        );
        let soft = base()
            .with_antipassback(AntiPassback::Soft)
            .with_lockout(60);
        check(
            &soft,
            vec![Row {
                at: "2026-05-04T09:00:30+02:00",
                presence: Some(at("outside", "hall", "2026-05-04T09:00:00+02:00")),
                status: AntiPassbackError,
                code: "reentry_lockout",
                moves_to: Some("hall"),
                ..row("soft lockout moves", "main", In)
            }],
        );
    }

    #[test]
    fn forgive_time_and_ttl_around_midnight_and_dst() {
        // Forgiven at local midnight: an entry just before midnight no longer blocks after it.
        let rules = base().with_forgive("00:00");
        let inside = |when| Some(at("hall", "outside", when));
        check(
            &rules,
            vec![
                Row {
                    at: "2026-01-10T23:59:30+01:00",
                    presence: inside("2026-01-10T23:59:00+01:00"),
                    status: AntiPassbackError,
                    code: "antipassback",
                    ..row("before midnight", "main", In)
                },
                Row {
                    at: "2026-01-11T00:00:30+01:00",
                    presence: inside("2026-01-10T23:59:00+01:00"),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("hall"),
                    ..row("after midnight", "main", In)
                },
                // Presence from after the forgive instant is not forgiven.
                Row {
                    at: "2026-01-11T00:05:00+01:00",
                    presence: inside("2026-01-11T00:01:00+01:00"),
                    status: AntiPassbackError,
                    code: "antipassback",
                    ..row("entered after midnight", "main", In)
                },
                // Forgiven presence still tells the direction of an unknown clocking.
                Row {
                    at: "2026-01-11T00:00:30+01:00",
                    presence: inside("2026-01-10T23:59:00+01:00"),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("outside"),
                    ..row("forgiven but located", "main", Unknown)
                },
            ],
        );
        // On the spring change 02:30 does not exist: the forgive happens at 03:30 summer time.
        let rules = base().with_forgive("02:30");
        check(
            &rules,
            vec![
                Row {
                    at: "2026-03-29T03:20:00+02:00",
                    presence: inside("2026-03-29T01:00:00+01:00"),
                    status: AntiPassbackError,
                    code: "antipassback",
                    ..row("spring gap, not yet", "main", In)
                },
                Row {
                    at: "2026-03-29T03:31:00+02:00",
                    presence: inside("2026-03-29T01:00:00+01:00"),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("hall"),
                    ..row("spring gap, forgiven", "main", In)
                },
            ],
        );
        // The TTL counts real hours: across the spring change 24 wall-clock hours are 23 real ones.
        let rules = base().with_ttl(24);
        check(
            &rules,
            vec![
                Row {
                    at: "2026-03-29T20:30:00+02:00",
                    presence: inside("2026-03-28T20:00:00+01:00"),
                    status: AntiPassbackError,
                    code: "antipassback",
                    ..row("23.5 real hours", "main", In)
                },
                Row {
                    at: "2026-03-29T21:00:00+02:00",
                    presence: inside("2026-03-28T20:00:00+01:00"),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("hall"),
                    ..row("24 real hours", "main", In)
                },
                // Expired presence does not tell a direction either.
                Row {
                    at: "2026-03-29T21:00:00+02:00",
                    presence: inside("2026-03-28T20:00:00+01:00"),
                    status: AccessOk,
                    code: "direction_unknown",
                    ..row("expired, unknown direction", "main", Unknown)
                },
                // Across the autumn change 24 wall-clock hours are 25 real ones.
                Row {
                    at: "2026-10-25T19:30:00+01:00",
                    presence: inside("2026-10-24T20:00:00+02:00"),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("hall"),
                    ..row("autumn: 24.5 real hours", "main", In)
                },
                Row {
                    at: "2026-10-25T18:30:00+01:00",
                    presence: inside("2026-10-24T20:00:00+02:00"),
                    status: AntiPassbackError,
                    code: "antipassback",
                    ..row("autumn: 23.5 real hours", "main", In)
                },
            ],
        );
    }

    #[test]
    fn shifts_crossing_midnight() {
        let rules = base();
        let night = || {
            vec![shift(
                "2026-05-04T22:00:00+02:00",
                "2026-05-05T06:00:00+02:00",
            )]
        };
        check(
            &rules,
            vec![
                Row {
                    at: "2026-05-04T21:50:00+02:00",
                    shifts: night(),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("plant"),
                    ..row("before, within tolerance", "plant-door", In)
                },
                Row {
                    at: "2026-05-05T00:30:00+02:00",
                    shifts: night(),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("plant"),
                    ..row("after midnight", "plant-door", In)
                },
                Row {
                    at: "2026-05-05T06:14:00+02:00",
                    shifts: night(),
                    status: AccessOk,
                    code: "ok",
                    moves_to: Some("plant"),
                    ..row("end plus tolerance", "plant-door", In)
                },
                Row {
                    at: "2026-05-05T06:16:00+02:00",
                    shifts: night(),
                    status: AccessRefused,
                    code: "outside_shift",
                    ..row("too late", "plant-door", In)
                },
                Row {
                    at: "2026-05-04T21:44:00+02:00",
                    shifts: night(),
                    status: AccessRefused,
                    code: "outside_shift",
                    ..row("too early", "plant-door", In)
                },
            ],
        );
    }

    impl Rules {
        fn with_antipassback(mut self, m: AntiPassback) -> Rules {
            self.antipassback = m;
            self
        }
        fn with_zone_mode(mut self, zone: &str, m: AntiPassback) -> Rules {
            self.antipassback = AntiPassback::Hard;
            for z in &mut self.zones {
                if &*z.name == zone {
                    z.antipassback = Some(m);
                }
            }
            self
        }
        fn with_lockout(mut self, secs: i64) -> Rules {
            self.reentry_lockout = chrono::Duration::seconds(secs);
            self
        }
        fn with_forgive(mut self, hhmm: &str) -> Rules {
            self.forgive_at = Some(chrono::NaiveTime::parse_from_str(hhmm, "%H:%M").unwrap());
            self
        }
        fn with_ttl(mut self, hours: i64) -> Rules {
            self.presence_ttl = Some(chrono::Duration::hours(hours));
            self
        }
    }
}
