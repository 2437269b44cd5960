//! The health document: what `GET /healthz` answers and `badgegate status` reads back and
//! renders. One set of types for both ends, so the server and the CLI cannot drift apart.
//!
//! Fields are declared in alphabetical order: the document was first built as a `serde_json`
//! map, which sorts its keys, and declaring them in that order keeps the bytes on the wire (and
//! `status --json`) unchanged. Sections of agents without that part (no MQTT, no Protime sink,
//! no terminal links, no cloud sources, no zones) are left out, not null.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Deserializer, Serialize};

use crate::metrics::{SourceHealth, TerminalHealth};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Dead letters over every sink; only with a cloud (Protime) sink configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<u64>,
    /// Clockings confirmed per sink since the start (`status` turns two readings into a rate).
    pub delivered: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<Mqtt>,
    /// Absent when the store could not be read; null when nothing is pending.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub oldest_pending_age_secs: Option<Option<f64>>,
    /// Clockings held per sink missing from the config (kept until `queue drop-sink`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub orphaned: BTreeMap<String, u64>,
    /// Pending clockings per sink; absent when the store could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<BTreeMap<String, u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protime: Option<Protime>,
    pub site: String,
    /// Per cloud source (`crosschex`, `aktion`, `protime` for the mirror).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, Source>,
    pub status: Status,
    pub store: Store,
    /// Per device-link terminal id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub terminals: BTreeMap<String, Terminal>,
    pub version: String,
    /// Persons per declared zone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub zones: BTreeMap<String, u64>,
}

/// `ok` (HTTP 200) or `store_unwritable` (HTTP 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    StoreUnwritable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Store {
    /// File size; absent when the store could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Clockings held; absent when the store could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clockings: Option<u64>,
    pub error: Option<String>,
    /// PUBACK confirmations committed but not fsync'd yet.
    pub unsynced_confirmations: u64,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mqtt {
    /// The access engine's own connection.
    pub access_connected: bool,
    pub connected: bool,
    pub in_flight: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Protime {
    pub last_error: Option<String>,
    pub reachable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Terminal {
    pub backfilled_records: u64,
    /// Terminal clock minus the gateway's wall clock in the terminal's zone.
    pub clock_drift_secs: i64,
    pub connected: bool,
    /// New (unacknowledged) records on the device at the last count.
    pub device_backlog: u64,
    pub frames_rejected: u64,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_record_at: Option<String>,
    pub realtime_records: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub clockings: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_success_at: Option<String>,
    pub people: u64,
    pub polls: u64,
    /// Where the source reads from next (a watermark, "delta", "initial load").
    pub position: Option<String>,
    pub shifts: u64,
    pub skipped: u64,
    pub up: bool,
}

impl From<&TerminalHealth> for Terminal {
    fn from(t: &TerminalHealth) -> Terminal {
        Terminal {
            backfilled_records: t.backfilled_records.load(Ordering::Relaxed),
            clock_drift_secs: t.clock_drift_secs.load(Ordering::Relaxed),
            connected: t.connected.load(Ordering::Relaxed),
            device_backlog: t.device_backlog.load(Ordering::Relaxed),
            frames_rejected: t.frames_rejected.load(Ordering::Relaxed),
            last_error: read(&t.last_error),
            last_record_at: rfc3339_ms(t.last_record_ms.load(Ordering::Relaxed)),
            realtime_records: t.realtime_records.load(Ordering::Relaxed),
        }
    }
}

impl From<&SourceHealth> for Source {
    fn from(s: &SourceHealth) -> Source {
        Source {
            clockings: s.clockings.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            last_error: read(&s.last_error),
            last_success_at: rfc3339_ms(s.last_success_ms.load(Ordering::Relaxed)),
            people: s.people.load(Ordering::Relaxed),
            polls: s.polls.load(Ordering::Relaxed),
            position: read(&s.position),
            shifts: s.shifts.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            up: s.up.load(Ordering::Relaxed),
        }
    }
}

/// Pending clockings per orphaned sink (configured no more, kept until `queue drop-sink`).
pub fn orphaned(stats: &crate::store::QueueStats) -> BTreeMap<String, u64> {
    stats
        .orphaned
        .iter()
        .map(|k| (k.sink.clone(), k.pending))
        .collect()
}

fn read(slot: &std::sync::Mutex<Option<String>>) -> Option<String> {
    slot.lock().ok().and_then(|g| g.clone())
}

/// Unix milliseconds as RFC 3339; 0 means "never".
fn rfc3339_ms(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()))
        .flatten()
}

/// A present field, null included, is `Some`: keeps "null" apart from "absent" (`default`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_absent_survive_a_round_trip() {
        let text = r#"{"delivered":{"mqtt":3,"protime":0},"oldest_pending_age_secs":null,"pending":{"mqtt":0},"site":"plant-1","status":"ok","store":{"bytes":4096,"clockings":0,"error":null,"unsynced_confirmations":0,"writable":true},"version":"0.1.0"}"#;
        let h: Health = serde_json::from_str(text).unwrap();
        assert_eq!(h.oldest_pending_age_secs, Some(None));
        assert_eq!(serde_json::to_string(&h).unwrap(), text);

        let unreadable = r#"{"delivered":{},"site":"s","status":"store_unwritable","store":{"error":"disk gone","unsynced_confirmations":0,"writable":false},"version":"0.1.0"}"#;
        let h: Health = serde_json::from_str(unreadable).unwrap();
        assert_eq!(h.oldest_pending_age_secs, None);
        assert_eq!(h.status, Status::StoreUnwritable);
        assert_eq!(serde_json::to_string(&h).unwrap(), unreadable);
    }

    /// Every section filled: its keys come out sorted at every level (the order serde_json's
    /// map gave the document before it had types), and it reads back the same.
    #[test]
    fn a_full_document_keeps_sorted_keys_and_round_trips() {
        let terminal = Terminal {
            backfilled_records: 1,
            clock_drift_secs: -2,
            connected: false,
            device_backlog: 3,
            frames_rejected: 4,
            last_error: Some("no answer".into()),
            last_record_at: Some("2026-11-22T08:10:03.123+00:00".into()),
            realtime_records: 5,
        };
        let source = Source {
            clockings: 1,
            errors: 2,
            last_error: None,
            last_success_at: None,
            people: 3,
            polls: 4,
            position: Some("delta".into()),
            shifts: 5,
            skipped: 6,
            up: true,
        };
        let h = Health {
            dead_letters: Some(2),
            delivered: [("mqtt".to_owned(), 7), ("protime".to_owned(), 1)].into(),
            mqtt: Some(Mqtt {
                access_connected: true,
                connected: true,
                in_flight: 3,
                last_error: None,
            }),
            oldest_pending_age_secs: Some(Some(303.2)),
            orphaned: BTreeMap::new(),
            pending: Some([("mqtt".to_owned(), 5), ("protime".to_owned(), 0)].into()),
            protime: Some(Protime {
                last_error: Some("HTTP 503".into()),
                reachable: false,
            }),
            site: "plant-1".into(),
            sources: [("aktion".to_owned(), source)].into(),
            status: Status::Ok,
            store: Store {
                bytes: Some(4096),
                clockings: Some(5),
                error: None,
                unsynced_confirmations: 1,
                writable: true,
            },
            terminals: [("gate-north".to_owned(), terminal)].into(),
            version: "0.1.0".into(),
            zones: [("production".to_owned(), 412), ("yard".to_owned(), 0)].into(),
        };
        let text = serde_json::to_string(&h).unwrap();
        let sorted: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(text, sorted.to_string(), "keys in alphabetical order");
        assert_eq!(serde_json::from_str::<Health>(&text).unwrap(), h);
    }
}
