//! The one vocabulary every part of badgegate uses: a clocking, its direction, its access status,
//! where it came from, and its stable id.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which way a person went through a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
    #[default]
    Unknown,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Unknown => "unknown",
        }
    }
}

impl FromStr for Direction {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "in" => Ok(Direction::In),
            "out" => Ok(Direction::Out),
            "unknown" => Ok(Direction::Unknown),
            _ => Err(()),
        }
    }
}

/// Protime's access status vocabulary. `UnknownBadgeNumber` (newer Protime pages) is accepted on
/// input and always emitted as `UnknownBadge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccessStatus {
    AccessOk,
    AccessRefused,
    WrongPinCode,
    AlarmCode,
    AntiPassbackError,
    OutZone,
    #[serde(alias = "UnknownBadgeNumber")]
    UnknownBadge,
}

impl AccessStatus {
    pub const ALL: [AccessStatus; 7] = [
        AccessStatus::AccessOk,
        AccessStatus::AccessRefused,
        AccessStatus::WrongPinCode,
        AccessStatus::AlarmCode,
        AccessStatus::AntiPassbackError,
        AccessStatus::OutZone,
        AccessStatus::UnknownBadge,
    ];

    /// The position in [`AccessStatus::ALL`] (for per-status counters).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AccessStatus::AccessOk => "AccessOk",
            AccessStatus::AccessRefused => "AccessRefused",
            AccessStatus::WrongPinCode => "WrongPinCode",
            AccessStatus::AlarmCode => "AlarmCode",
            AccessStatus::AntiPassbackError => "AntiPassbackError",
            AccessStatus::OutZone => "OutZone",
            AccessStatus::UnknownBadge => "UnknownBadge",
        }
    }
}

impl FromStr for AccessStatus {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "AccessOk" => AccessStatus::AccessOk,
            "AccessRefused" => AccessStatus::AccessRefused,
            "WrongPinCode" => AccessStatus::WrongPinCode,
            "AlarmCode" => AccessStatus::AlarmCode,
            "AntiPassbackError" => AccessStatus::AntiPassbackError,
            "OutZone" => AccessStatus::OutZone,
            "UnknownBadge" | "UnknownBadgeNumber" => AccessStatus::UnknownBadge,
            _ => return Err(()),
        })
    }
}

/// The path a clocking took into badgegate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Anviz,
    Http,
    Crosschex,
    Protime,
    Aktion,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Anviz => "anviz",
            Source::Http => "http",
            Source::Crosschex => "crosschex",
            Source::Protime => "protime",
            Source::Aktion => "aktion",
        }
    }
}

/// A content-derived clocking id: the first 16 bytes of SHA-256 over (site, terminal, badge,
/// occurred_at as an instant, direction). The same clocking arriving twice, by any path, gets the
/// same id, which is what the store deduplicates on and what subscribers deduplicate on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClockingId(pub [u8; 16]);

impl ClockingId {
    pub fn derive(
        site: &str,
        terminal: &str,
        badge: &str,
        occurred_at: DateTime<FixedOffset>,
        direction: Direction,
    ) -> ClockingId {
        let mut h = Sha256::new();
        // Unit separators keep ("ab","c") and ("a","bc") apart; the instant is taken in UTC so
        // that the same moment written with another offset is the same clocking.
        for part in [site, terminal, badge] {
            h.update(part.as_bytes());
            h.update([0x1f]);
        }
        let utc = occurred_at.with_timezone(&Utc);
        h.update(utc.timestamp().to_be_bytes());
        h.update(utc.timestamp_subsec_nanos().to_be_bytes());
        h.update([0x1f]);
        h.update(direction.as_str().as_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        ClockingId(id)
    }
}

impl fmt::Display for ClockingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Formatted once per MQTT publish: a table beats 16 `{:02x}` calls.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        // Only ASCII hex digits were written.
        f.write_str(std::str::from_utf8(&out).unwrap_or_default())
    }
}

impl fmt::Debug for ClockingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClockingId({self})")
    }
}

impl FromStr for ClockingId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(());
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ())?;
        }
        Ok(ClockingId(id))
    }
}

/// A badge presented at a gate at a time. `occurred_at` carries the terminal's UTC offset at that
/// instant, so the local date and minute of day are derived from it, never stored twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clocking {
    pub id: ClockingId,
    pub site: String,
    pub terminal: String,
    pub badge: String,
    pub person: Option<String>,
    #[serde(with = "compact_time")]
    pub occurred_at: DateTime<FixedOffset>,
    pub direction: Direction,
    pub status: AccessStatus,
    pub source: Source,
    #[serde(with = "compact_utc")]
    pub received_at: DateTime<Utc>,
}

/// What a source knows about a clocking before badgegate gives it an id and a status.
#[derive(Debug, Clone)]
pub struct NewClocking {
    pub terminal: String,
    pub badge: String,
    pub occurred_at: DateTime<FixedOffset>,
    pub direction: Direction,
    pub status: Option<AccessStatus>,
    pub person: Option<String>,
    pub source: Source,
}

impl Clocking {
    /// Give a new clocking its id, the terminal's local offset and the time it was received.
    pub fn from_new(
        site: &str,
        terminal_tz: Tz,
        new: NewClocking,
        status: AccessStatus,
        received_at: DateTime<Utc>,
    ) -> Clocking {
        let occurred_at = in_zone(new.occurred_at, terminal_tz);
        Clocking {
            id: ClockingId::derive(site, &new.terminal, &new.badge, occurred_at, new.direction),
            site: site.to_owned(),
            terminal: new.terminal,
            badge: new.badge,
            person: new.person,
            occurred_at,
            direction: new.direction,
            status,
            source: new.source,
            received_at,
        }
    }

    /// The local calendar date at the terminal.
    pub fn date(&self) -> NaiveDate {
        self.occurred_at.date_naive()
    }

    /// Minutes since local midnight at the terminal (0..=1439).
    pub fn time_of_day_minutes(&self) -> u16 {
        let t = self.occurred_at.time();
        (t.hour() * 60 + t.minute()) as u16
    }

    /// The MQTT payload of the contract.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Payload<'a> {
            id: String,
            site: &'a str,
            terminal: &'a str,
            badge: &'a str,
            person: Option<&'a str>,
            occurred_at: String,
            date: String,
            time_of_day_minutes: u16,
            direction: &'static str,
            status: &'static str,
            source: &'static str,
            received_at: String,
        }
        let payload = Payload {
            id: self.id.to_string(),
            site: &self.site,
            terminal: &self.terminal,
            badge: &self.badge,
            person: self.person.as_deref(),
            occurred_at: self
                .occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
            date: self.date().format("%Y-%m-%d").to_string(),
            time_of_day_minutes: self.time_of_day_minutes(),
            direction: self.direction.as_str(),
            status: self.status.as_str(),
            source: self.source.as_str(),
            received_at: self
                .received_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(&payload).unwrap_or_default()
    }
}

/// A presence transition (a person's latest accepted passage) as gateways share it on
/// `{topic_prefix}/{site}/presence/{gateway}/{subject}` (retained JSON), and as the store hands
/// other gateways' transitions to the access engine inside its transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceTransition {
    pub gateway: String,
    pub person: Option<String>,
    pub badge: String,
    pub zone: String,
    pub from: String,
    pub occurred_at: DateTime<FixedOffset>,
    pub terminal: String,
    pub clocking_id: String,
}

impl PresenceTransition {
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            gateway: &'a str,
            person: Option<&'a str>,
            badge: &'a str,
            zone: &'a str,
            from: &'a str,
            occurred_at: String,
            terminal: &'a str,
            clocking_id: &'a str,
        }
        serde_json::to_vec(&Out {
            gateway: &self.gateway,
            person: self.person.as_deref(),
            badge: &self.badge,
            zone: &self.zone,
            from: &self.from,
            occurred_at: self
                .occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
            terminal: &self.terminal,
            clocking_id: &self.clocking_id,
        })
        .unwrap_or_default()
    }

    /// Parse and check a received transition.
    pub fn parse(payload: &[u8]) -> Result<PresenceTransition, String> {
        let t: PresenceTransition = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        if t.badge.is_empty() || t.zone.is_empty() || t.from.is_empty() || t.gateway.is_empty() {
            return Err("gateway, badge, zone and from must not be empty".into());
        }
        if t.person.as_deref() == Some("") {
            return Err("person must be null or not empty".into());
        }
        t.clocking_id
            .parse::<ClockingId>()
            .map_err(|()| format!("clocking_id {:?} is not 32 hex digits", t.clocking_id))?;
        Ok(t)
    }
}

/// A badge as the contract allows it: 1 to 64 characters, none of them a control character.
pub fn valid_badge(badge: &str) -> bool {
    (1..=64).contains(&badge.chars().count()) && !badge.chars().any(char::is_control)
}

/// The same instant expressed with the offset the terminal's zone has at that instant.
pub fn in_zone(t: DateTime<FixedOffset>, tz: Tz) -> DateTime<FixedOffset> {
    t.with_timezone(&tz).fixed_offset()
}

/// Convert a terminal's local wall-clock reading to an instant. Wall clocks are ambiguous around
/// DST changes: in the autumn overlap the earlier instant is taken (the first pass through that
/// hour), in the spring gap the clock cannot show such a time, so it is read as the instant that
/// many minutes after the gap started (what a terminal that missed the change would mean).
pub fn local_to_instant(local: chrono::NaiveDateTime, tz: Tz) -> DateTime<FixedOffset> {
    match tz.from_local_datetime(&local) {
        chrono::LocalResult::Single(t) => t.fixed_offset(),
        chrono::LocalResult::Ambiguous(earliest, _) => earliest.fixed_offset(),
        chrono::LocalResult::None => {
            // Find the offset in force just before the gap and apply it.
            let before = local - chrono::Duration::hours(3);
            let offset = match tz.from_local_datetime(&before) {
                chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
                    *t.offset()
                }
                chrono::LocalResult::None => tz.offset_from_utc_datetime(&local),
            };
            let utc = local
                - chrono::Duration::seconds(chrono::Offset::fix(&offset).local_minus_utc() as i64);
            in_zone(Utc.from_utc_datetime(&utc).fixed_offset(), tz)
        }
    }
}

/// Stored as (unix seconds, nanos, offset seconds): compact in postcard and exact.
mod compact_time {
    use chrono::{DateTime, FixedOffset, TimeZone};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
        (
            t.timestamp(),
            t.timestamp_subsec_nanos(),
            t.offset().local_minus_utc(),
        )
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<FixedOffset>, D::Error> {
        let (secs, nanos, off): (i64, u32, i32) = Deserialize::deserialize(d)?;
        let offset =
            FixedOffset::east_opt(off).ok_or_else(|| serde::de::Error::custom("bad offset"))?;
        offset
            .timestamp_opt(secs, nanos)
            .single()
            .ok_or_else(|| serde::de::Error::custom("bad timestamp"))
    }
}

mod compact_utc {
    use chrono::{DateTime, TimeZone, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        t.timestamp_millis().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let ms: i64 = Deserialize::deserialize(d)?;
        Utc.timestamp_millis_opt(ms)
            .single()
            .ok_or_else(|| serde::de::Error::custom("bad timestamp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(s).unwrap()
    }

    #[test]
    fn id_is_stable_and_offset_independent() {
        let a = ClockingId::derive(
            "s",
            "gate",
            "42",
            t("2026-03-01T08:00:00+01:00"),
            Direction::In,
        );
        let b = ClockingId::derive("s", "gate", "42", t("2026-03-01T07:00:00Z"), Direction::In);
        assert_eq!(a, b);
        let c = ClockingId::derive("s", "gate", "42", t("2026-03-01T07:00:00Z"), Direction::Out);
        assert_ne!(a, c);
        let d = ClockingId::derive("s", "gat", "e42", t("2026-03-01T07:00:00Z"), Direction::In);
        assert_ne!(a, d);
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(a.to_string().parse::<ClockingId>(), Ok(a));
    }

    #[test]
    fn local_date_and_minutes_follow_terminal_zone() {
        let tz: Tz = "Europe/Brussels".parse().unwrap();
        let new = NewClocking {
            terminal: "gate".into(),
            badge: "1".into(),
            occurred_at: t("2026-07-01T22:30:00Z"),
            direction: Direction::In,
            status: None,
            person: None,
            source: Source::Http,
        };
        let c = Clocking::from_new("s", tz, new, AccessStatus::AccessOk, Utc::now());
        assert_eq!(c.date().to_string(), "2026-07-02");
        assert_eq!(c.time_of_day_minutes(), 30);
        assert_eq!(c.occurred_at.offset().local_minus_utc(), 7200);
    }

    #[test]
    fn dst_overlap_and_gap() {
        let tz: Tz = "Europe/Brussels".parse().unwrap();
        let nd = |s: &str| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        // 2026-10-25 02:30 happens twice: the first (summer time, +02:00) is taken.
        let overlap = local_to_instant(nd("2026-10-25 02:30:00"), tz);
        assert_eq!(overlap, t("2026-10-25T02:30:00+02:00"));
        // 2026-03-29 02:30 does not exist: read with the winter offset, shown in summer time.
        let gap = local_to_instant(nd("2026-03-29 02:30:00"), tz);
        assert_eq!(gap, t("2026-03-29T01:30:00Z"));
        assert_eq!(gap.offset().local_minus_utc(), 7200);
    }

    #[test]
    fn status_accepts_both_unknown_badge_spellings() {
        assert_eq!(
            "UnknownBadgeNumber".parse::<AccessStatus>(),
            Ok(AccessStatus::UnknownBadge)
        );
        let s: AccessStatus = serde_json::from_str("\"UnknownBadgeNumber\"").unwrap();
        assert_eq!(s.as_str(), "UnknownBadge");
    }

    #[test]
    fn stored_form_round_trips() {
        let tz: Tz = "Europe/Brussels".parse().unwrap();
        let new = NewClocking {
            terminal: "gate".into(),
            badge: "1".into(),
            occurred_at: t("2026-07-01T22:30:00.123Z"),
            direction: Direction::Out,
            status: None,
            person: Some("p".into()),
            source: Source::Anviz,
        };
        let c = Clocking::from_new("s", tz, new, AccessStatus::OutZone, Utc::now());
        let bytes = postcard::to_allocvec(&c).unwrap();
        let back: Clocking = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.occurred_at, c.occurred_at);
        assert_eq!(
            back.received_at.timestamp_millis(),
            c.received_at.timestamp_millis()
        );
        assert_eq!(back.id, c.id);
    }
}
