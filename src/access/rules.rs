//! The access configuration compiled for deciding: zones by name, each terminal's transition,
//! and the time rules (lockout, daily forgive time, presence TTL).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::config::{AntiPassback, Config};
use crate::model::{local_to_instant, AccessStatus};

/// The implicit zone everyone is in before their first passage.
pub const OUTSIDE: &str = "outside";

#[derive(Debug, Clone)]
pub struct ZoneRules {
    pub name: Arc<str>,
    pub require_shift: bool,
    pub shift_tolerance: Duration,
    pub exit_status: Option<AccessStatus>,
    pub allowed_groups: Vec<String>,
    pub antipassback: Option<AntiPassback>,
}

/// A terminal between two zones: `in` moves a person `from → to`, `out` moves them back.
#[derive(Debug, Clone)]
pub struct Gate {
    pub terminal: Arc<str>,
    pub from: Arc<str>,
    pub to: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub antipassback: AntiPassback,
    /// Zero: no timed lockout.
    pub reentry_lockout: Duration,
    pub forgive_at: Option<NaiveTime>,
    pub presence_ttl: Option<Duration>,
    /// The zone of `forgive_at`.
    pub timezone: Tz,
    /// A person source is configured (people file, Protime or Aktion mirror): a badge no person
    /// holds is an `UnknownBadge`. Without one, badges are the identities and are never unknown.
    pub directory_in_use: bool,
    /// A cloud mirror is configured: local decisions are kept for comparing with the cloud's.
    pub compare_mirrors: bool,
    /// Declared zones, in config order (`outside` is not among them).
    pub zones: Vec<ZoneRules>,
    gates: HashMap<String, Gate>,
    /// One shared name per zone, so presence entries do not each hold a copy.
    names: HashMap<String, Arc<str>>,
}

impl Rules {
    pub fn from_config(c: &Config) -> Rules {
        let mut rules = Rules {
            antipassback: c.access.antipassback,
            reentry_lockout: c.access.reentry_lockout,
            forgive_at: c.access.forgive_at,
            presence_ttl: c.access.presence_ttl,
            timezone: c.agent.timezone,
            directory_in_use: c.access.people_file.is_some()
                || c.sinks.protime.as_ref().is_some_and(|p| p.mirror)
                || c.sources.aktion.is_some(),
            compare_mirrors: c.sinks.protime.as_ref().is_some_and(|p| p.mirror)
                || c.sources.aktion.is_some(),
            zones: Vec::new(),
            gates: HashMap::new(),
            names: HashMap::new(),
        };
        for z in &c.zones {
            let name = rules.intern(&z.name);
            rules.zones.push(ZoneRules {
                name,
                require_shift: z.require_shift,
                shift_tolerance: z.shift_tolerance,
                exit_status: z.exit_status,
                allowed_groups: z.allowed_groups.clone(),
                antipassback: z.antipassback,
            });
        }
        for t in &c.terminals {
            if let (Some(from), Some(to)) = (&t.zone_from, &t.zone_to) {
                let gate = Gate {
                    terminal: rules.intern(&t.id),
                    from: rules.intern(from),
                    to: rules.intern(to),
                };
                rules.gates.insert(t.id.clone(), gate);
            }
        }
        rules
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(name.to_owned(), n.clone());
        n
    }

    /// The shared copy of a name if the config knows it.
    pub fn known_name(&self, name: &str) -> Option<Arc<str>> {
        self.names.get(name).cloned()
    }

    pub fn gate(&self, terminal: &str) -> Option<&Gate> {
        self.gates.get(terminal)
    }

    pub fn zone(&self, name: &str) -> Option<&ZoneRules> {
        self.zones.iter().find(|z| &*z.name == name)
    }

    /// The anti-passback mode of a gate: the override of the zone it leads into, else the global.
    pub fn antipassback_of(&self, gate: &Gate) -> AntiPassback {
        self.zone(&gate.to)
            .and_then(|z| z.antipassback)
            .unwrap_or(self.antipassback)
    }

    /// The last forgive instant at or before `at`, if a daily forgive time is set. The forgive
    /// time is a local wall-clock time in `agent.timezone`: on the day it falls into the spring
    /// gap it is read as the instant that many minutes after the gap began, and in the autumn
    /// overlap the first pass is taken (as for terminal clocks).
    pub fn last_forgive(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = self.forgive_at?;
        let local_date = self
            .timezone
            .from_utc_datetime(&at.naive_utc())
            .date_naive();
        for days_back in 0..3 {
            let date = local_date - Duration::days(days_back);
            let instant = local_to_instant(date.and_time(t), self.timezone).with_timezone(&Utc);
            if instant <= at {
                return Some(instant);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(forgive: &str) -> Rules {
        let text = format!(
            "[agent]\nsite = \"s\"\ntimezone = \"Europe/Brussels\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[access]\nforgive_at = \"{forgive}\"\n"
        );
        Rules::from_config(&Config::parse(&text, std::path::Path::new("/")).unwrap())
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn forgive_instant_is_local_and_follows_dst() {
        let r = rules("00:00");
        // Local midnight in winter is 23:00 UTC the day before.
        assert_eq!(
            r.last_forgive(utc("2026-01-10T23:30:00+01:00")),
            Some(utc("2026-01-10T00:00:00+01:00"))
        );
        assert_eq!(
            r.last_forgive(utc("2026-01-11T00:00:00+01:00")),
            Some(utc("2026-01-11T00:00:00+01:00")),
            "at the forgive instant itself"
        );
        let r = rules("02:30");
        // 2026-03-29 02:30 does not exist in Brussels: the forgive happens at 03:30 CEST.
        assert_eq!(
            r.last_forgive(utc("2026-03-29T04:00:00+02:00")),
            Some(utc("2026-03-29T03:30:00+02:00"))
        );
        assert_eq!(
            r.last_forgive(utc("2026-03-29T03:10:00+02:00")),
            Some(utc("2026-03-28T02:30:00+01:00")),
            "before the shifted forgive, yesterday's holds"
        );
        // 2026-10-25 02:30 happens twice: the first pass (+02:00) forgives.
        assert_eq!(
            r.last_forgive(utc("2026-10-25T02:45:00+01:00")),
            Some(utc("2026-10-25T02:30:00+02:00"))
        );
    }
}
