//! Counters and gauges shared by every part of the agent, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::model::{AccessStatus, Source};
use crate::store::QueueStats;

#[derive(Default)]
pub struct Metrics {
    pub received: [AtomicU64; 5],
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub store_errors: AtomicU64,
    pub store_full: AtomicU64,
    /// Local API requests refused by `http.rate_limit_per_sec`.
    pub http_rate_limited: AtomicU64,
    pub mqtt: SinkMetrics,
    pub protime: SinkMetrics,
    pub protime_dead_letters: AtomicU64,
    pub access: AccessMetrics,
    /// One entry per device-link terminal, fixed at start.
    pub terminals: BTreeMap<String, Arc<TerminalHealth>>,
    /// One entry per configured cloud source (`crosschex`, `aktion`, `protime` for the mirror),
    /// fixed at start.
    pub sources: BTreeMap<&'static str, Arc<SourceHealth>>,
}

/// What a cloud source reports about its polling.
#[derive(Default)]
pub struct SourceHealth {
    /// The last poll succeeded.
    pub up: AtomicBool,
    pub polls: AtomicU64,
    pub errors: AtomicU64,
    /// Clockings the source stored (new ones; re-reads are not counted).
    pub clockings: AtomicU64,
    /// Vendor items that could not become clockings (no badge...), each logged.
    pub skipped: AtomicU64,
    /// Unix milliseconds of the last successful poll; 0 before the first.
    pub last_success_ms: AtomicI64,
    /// Persons and scheduled shifts loaded at the last refresh (sources that have them).
    pub people: AtomicU64,
    pub shifts: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Where the source will read from next, as text (a watermark, "delta" / "initial load").
    pub position: Mutex<Option<String>>,
}

impl SourceHealth {
    pub fn succeeded(&self) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.up.store(true, Ordering::Relaxed);
        self.last_success_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        set(&self.last_error, None);
    }

    pub fn failed(&self, error: String) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.up.store(false, Ordering::Relaxed);
        set(&self.last_error, Some(error));
    }

    pub fn set_position(&self, position: String) {
        set(&self.position, Some(position));
    }

    pub fn to_json(&self) -> Value {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = self.last_success_ms.load(Ordering::Relaxed);
        json!({
            "up": self.up.load(Ordering::Relaxed),
            "last_success_at": (last > 0).then(|| chrono::DateTime::from_timestamp_millis(last).map(|t| t.to_rfc3339())).flatten(),
            "polls": r(&self.polls),
            "errors": r(&self.errors),
            "clockings": r(&self.clockings),
            "skipped": r(&self.skipped),
            "people": r(&self.people),
            "shifts": r(&self.shifts),
            "position": get(&self.position),
            "last_error": get(&self.last_error),
        })
    }
}

fn set(slot: &Mutex<Option<String>>, v: Option<String>) {
    if let Ok(mut g) = slot.lock() {
        *g = v;
    }
}

fn get(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().ok().and_then(|g| g.clone())
}

/// What a device link reports about its terminal.
#[derive(Default)]
pub struct TerminalHealth {
    pub connected: AtomicBool,
    /// Unix milliseconds of the newest record received; 0 before the first.
    pub last_record_ms: AtomicI64,
    /// New (unacknowledged) records on the device at the last count.
    pub device_backlog: AtomicU64,
    /// Terminal clock minus the gateway's wall clock in the terminal's zone, in seconds.
    pub clock_drift_secs: AtomicI64,
    pub clock_sets: AtomicU64,
    pub frames_rejected: AtomicU64,
    pub garbage_bytes: AtomicU64,
    pub realtime_records: AtomicU64,
    pub backfilled_records: AtomicU64,
    pub connects: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl TerminalHealth {
    pub fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    pub fn to_json(&self) -> Value {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = self.last_record_ms.load(Ordering::Relaxed);
        json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "last_record_at": (last > 0).then(|| chrono::DateTime::from_timestamp_millis(last).map(|t| t.to_rfc3339())).flatten(),
            "device_backlog": r(&self.device_backlog),
            "clock_drift_secs": self.clock_drift_secs.load(Ordering::Relaxed),
            "frames_rejected": r(&self.frames_rejected),
            "realtime_records": r(&self.realtime_records),
            "backfilled_records": r(&self.backfilled_records),
            "last_error": self.last_error.lock().ok().and_then(|g| g.clone()),
        })
    }
}

/// What the access engine counts.
#[derive(Default)]
pub struct AccessMetrics {
    /// Statuses the engine decided, by [`AccessStatus::index`](crate::model::AccessStatus::index).
    pub decisions: [AtomicU64; 7],
    /// Mirrored cloud clockings compared with the local decision for the same clocking.
    pub mirror_agree: AtomicU64,
    pub mirror_mismatch: AtomicU64,
    /// Mirrored clockings with no local decision to compare with.
    pub mirror_unmatched: AtomicU64,
    /// `POST /v1/access/check` and MQTT access checks answered.
    pub checks: AtomicU64,
    /// Presence transitions received from the other gateways of the site, and how many were newer.
    pub sync_received: AtomicU64,
    pub sync_applied: AtomicU64,
    /// UnknownBadge clockings re-published with the person their badge gained.
    pub republished: AtomicU64,
    /// The access engine's MQTT connection is up and subscribed.
    pub mqtt_connected: AtomicBool,
}

/// What one sink reports about its uplink.
#[derive(Default)]
pub struct SinkMetrics {
    pub connected: AtomicBool,
    pub delivered: AtomicU64,
    pub published: AtomicU64,
    pub reconnects: AtomicU64,
    pub in_flight: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl SinkMetrics {
    pub fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

fn source_index(s: Source) -> usize {
    match s {
        Source::Anviz => 0,
        Source::Http => 1,
        Source::Crosschex => 2,
        Source::Protime => 3,
        Source::Aktion => 4,
    }
}

const SOURCES: [Source; 5] = [
    Source::Anviz,
    Source::Http,
    Source::Crosschex,
    Source::Protime,
    Source::Aktion,
];

impl Metrics {
    pub fn new<'a>(link_terminals: impl IntoIterator<Item = &'a str>) -> Metrics {
        Metrics {
            terminals: link_terminals
                .into_iter()
                .map(|t| (t.to_owned(), Arc::new(TerminalHealth::default())))
                .collect(),
            ..Metrics::default()
        }
    }

    /// Registers the configured cloud sources (see [`Metrics::sources`]).
    pub fn with_sources(mut self, sources: impl IntoIterator<Item = Source>) -> Metrics {
        self.sources = sources
            .into_iter()
            .map(|s| (s.as_str(), Arc::new(SourceHealth::default())))
            .collect();
        self
    }

    /// The health slot of a registered source.
    pub fn source(&self, s: Source) -> Arc<SourceHealth> {
        self.sources.get(s.as_str()).cloned().unwrap_or_default()
    }

    pub fn count_received(&self, s: Source, n: u64) {
        self.received[source_index(s)].fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition (version 0.0.4). `zones`: the occupancy of each zone.
    pub fn render(
        &self,
        stats: Option<&QueueStats>,
        store_ok: bool,
        zones: &[(String, usize)],
    ) -> String {
        let mut out = String::new();
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let received: Vec<(String, f64)> = SOURCES
            .iter()
            .map(|s| {
                (
                    format!("{{source=\"{}\"}}", s.as_str()),
                    r(&self.received[source_index(*s)]) as f64,
                )
            })
            .collect();
        metric(
            "badgegate_clockings_received_total",
            "counter",
            "Clockings received, by source (including duplicates).",
            &received,
        );
        metric(
            "badgegate_clockings_stored_total",
            "counter",
            "Clockings durably stored (new ids).",
            &[(String::new(), r(&self.stored) as f64)],
        );
        metric(
            "badgegate_clockings_duplicate_total",
            "counter",
            "Clockings received again with an id already stored or remembered.",
            &[(String::new(), r(&self.duplicates) as f64)],
        );
        metric(
            "badgegate_ingest_rejected_total",
            "counter",
            "Ingest requests rejected as invalid.",
            &[(String::new(), r(&self.rejected) as f64)],
        );
        metric(
            "badgegate_store_errors_total",
            "counter",
            "Store commits that failed (ingest refused).",
            &[(String::new(), r(&self.store_errors) as f64)],
        );
        metric(
            "badgegate_store_full_total",
            "counter",
            "Ingests refused because the store is full.",
            &[(String::new(), r(&self.store_full) as f64)],
        );
        metric(
            "badgegate_http_rate_limited_total",
            "counter",
            "Local API requests refused with 429 (http.rate_limit_per_sec).",
            &[(String::new(), r(&self.http_rate_limited) as f64)],
        );
        metric(
            "badgegate_store_writable",
            "gauge",
            "1 when the last store commit succeeded.",
            &[(String::new(), if store_ok { 1.0 } else { 0.0 })],
        );
        let m = &self.mqtt;
        metric(
            "badgegate_mqtt_connected",
            "gauge",
            "1 while the MQTT uplink is connected.",
            &[(
                String::new(),
                if m.connected.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                },
            )],
        );
        metric(
            "badgegate_mqtt_reconnects_total",
            "counter",
            "MQTT connection attempts after the first.",
            &[(String::new(), r(&m.reconnects) as f64)],
        );
        metric(
            "badgegate_mqtt_published_total",
            "counter",
            "Clocking publishes written (including re-sends after a reconnect).",
            &[(String::new(), r(&m.published) as f64)],
        );
        metric(
            "badgegate_mqtt_in_flight",
            "gauge",
            "Publishes awaiting their PUBACK.",
            &[(String::new(), r(&m.in_flight) as f64)],
        );
        metric(
            "badgegate_delivered_total",
            "counter",
            "Clockings confirmed by a sink.",
            &[
                ("{sink=\"mqtt\"}".into(), r(&m.delivered) as f64),
                (
                    "{sink=\"protime\"}".into(),
                    r(&self.protime.delivered) as f64,
                ),
            ],
        );
        metric(
            "badgegate_protime_reachable",
            "gauge",
            "1 while the last Protime call reached Protime.",
            &[(
                String::new(),
                f64::from(u8::from(self.protime.connected.load(Ordering::Relaxed))),
            )],
        );
        let a = &self.access;
        let decisions: Vec<(String, f64)> = AccessStatus::ALL
            .iter()
            .map(|s| {
                (
                    format!("{{status=\"{}\"}}", s.as_str()),
                    r(&a.decisions[s.index()]) as f64,
                )
            })
            .collect();
        metric(
            "badgegate_access_decisions_total",
            "counter",
            "Statuses decided by the local access engine.",
            &decisions,
        );
        metric(
            "badgegate_access_mirror_total",
            "counter",
            "Mirrored cloud clockings compared with the local decision: agree, mismatch, or unmatched (no local decision).",
            &[
                ("{result=\"agree\"}".into(), r(&a.mirror_agree) as f64),
                ("{result=\"mismatch\"}".into(), r(&a.mirror_mismatch) as f64),
                ("{result=\"unmatched\"}".into(), r(&a.mirror_unmatched) as f64),
            ],
        );
        metric(
            "badgegate_access_checks_total",
            "counter",
            "Access checks answered (HTTP and MQTT).",
            &[(String::new(), r(&a.checks) as f64)],
        );
        metric(
            "badgegate_presence_sync_received_total",
            "counter",
            "Presence transitions received from the other gateways of the site.",
            &[(String::new(), r(&a.sync_received) as f64)],
        );
        metric(
            "badgegate_presence_sync_applied_total",
            "counter",
            "Received presence transitions that were newer than the presence held.",
            &[(String::new(), r(&a.sync_applied) as f64)],
        );
        metric(
            "badgegate_unknown_badge_republished_total",
            "counter",
            "UnknownBadge clockings re-published with the person their badge gained.",
            &[(String::new(), r(&a.republished) as f64)],
        );
        if !zones.is_empty() {
            let samples: Vec<(String, f64)> = zones
                .iter()
                .map(|(z, n)| (format!("{{zone=\"{z}\"}}"), *n as f64))
                .collect();
            metric(
                "badgegate_zone_occupancy",
                "gauge",
                "Persons in the zone (presence not expired).",
                &samples,
            );
        }
        if !self.terminals.is_empty() {
            let per = |f: &dyn Fn(&TerminalHealth) -> f64| -> Vec<(String, f64)> {
                self.terminals
                    .iter()
                    .map(|(id, t)| (format!("{{terminal=\"{id}\"}}"), f(t)))
                    .collect()
            };
            metric(
                "badgegate_terminal_connected",
                "gauge",
                "1 while the link to the terminal is up.",
                &per(&|t| f64::from(u8::from(t.connected.load(Ordering::Relaxed)))),
            );
            metric(
                "badgegate_terminal_last_record_timestamp_seconds",
                "gauge",
                "Unix time of the newest record received from the terminal (0 before the first).",
                &per(&|t| t.last_record_ms.load(Ordering::Relaxed) as f64 / 1000.0),
            );
            metric(
                "badgegate_terminal_device_backlog",
                "gauge",
                "Records on the terminal not yet acknowledged by the agent, at the last count.",
                &per(&|t| t.device_backlog.load(Ordering::Relaxed) as f64),
            );
            metric(
                "badgegate_terminal_clock_drift_seconds",
                "gauge",
                "Terminal clock minus the gateway clock (terminal zone), at the last check.",
                &per(&|t| t.clock_drift_secs.load(Ordering::Relaxed) as f64),
            );
            metric(
                "badgegate_terminal_frames_rejected_total",
                "counter",
                "Frames from the terminal rejected (bad CRC, oversize length).",
                &per(&|t| t.frames_rejected.load(Ordering::Relaxed) as f64),
            );
            metric(
                "badgegate_terminal_records_total",
                "counter",
                "Records committed from the terminal (real-time and backfill, before deduplication).",
                &per(&|t| {
                    (t.realtime_records.load(Ordering::Relaxed)
                        + t.backfilled_records.load(Ordering::Relaxed)) as f64
                }),
            );
        }
        if !self.sources.is_empty() {
            let per = |f: &dyn Fn(&SourceHealth) -> f64| -> Vec<(String, f64)> {
                self.sources
                    .iter()
                    .map(|(name, h)| (format!("{{source=\"{name}\"}}"), f(h)))
                    .collect()
            };
            let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
            metric(
                "badgegate_source_up",
                "gauge",
                "1 while the cloud source's last poll succeeded.",
                &per(&|h| f64::from(u8::from(h.up.load(Ordering::Relaxed)))),
            );
            metric(
                "badgegate_source_last_success_timestamp_seconds",
                "gauge",
                "Unix time of the cloud source's last successful poll (0 before the first).",
                &per(&|h| h.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0),
            );
            metric(
                "badgegate_source_polls_total",
                "counter",
                "Polls of the cloud source.",
                &per(&|h| n(&h.polls)),
            );
            metric(
                "badgegate_source_errors_total",
                "counter",
                "Polls of the cloud source that failed.",
                &per(&|h| n(&h.errors)),
            );
            metric(
                "badgegate_source_clockings_total",
                "counter",
                "New clockings stored from the cloud source.",
                &per(&|h| n(&h.clockings)),
            );
            metric(
                "badgegate_source_skipped_total",
                "counter",
                "Vendor items that could not become clockings (logged).",
                &per(&|h| n(&h.skipped)),
            );
            metric(
                "badgegate_source_people",
                "gauge",
                "Persons loaded from the cloud source at its last refresh.",
                &per(&|h| n(&h.people)),
            );
            metric(
                "badgegate_source_shifts",
                "gauge",
                "Scheduled shifts loaded from the cloud source at its last refresh.",
                &per(&|h| n(&h.shifts)),
            );
        }
        if let Some(stats) = stats {
            let pending: Vec<_> = stats
                .sinks
                .iter()
                .map(|s| (format!("{{sink=\"{}\"}}", s.sink), s.pending as f64))
                .collect();
            metric(
                "badgegate_pending",
                "gauge",
                "Clockings not yet confirmed, by sink.",
                &pending,
            );
            let oldest: Vec<_> = stats
                .sinks
                .iter()
                .map(|s| {
                    (
                        format!("{{sink=\"{}\"}}", s.sink),
                        s.oldest_pending_age_secs.unwrap_or(0.0),
                    )
                })
                .collect();
            metric(
                "badgegate_oldest_pending_age_seconds",
                "gauge",
                "Age of the oldest unconfirmed clocking, by sink (0 when none).",
                &oldest,
            );
            let dead: Vec<_> = stats
                .sinks
                .iter()
                .map(|s| (format!("{{sink=\"{}\"}}", s.sink), s.dead_letters as f64))
                .collect();
            metric(
                "badgegate_dead_letters",
                "gauge",
                "Clockings a sink's destination rejected, set aside until replayed.",
                &dead,
            );
            metric(
                "badgegate_store_bytes",
                "gauge",
                "Size of the store file.",
                &[(String::new(), stats.store_bytes as f64)],
            );
        }
        out
    }
}
