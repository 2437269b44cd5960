//! Counters and gauges shared by every part of the agent, rendered as Prometheus text.
//!
//! The agent counts in plain atomics; `GET /metrics` encodes them at scrape time through
//! `prometheus-client`'s [`Collector`], which writes the HELP/TYPE lines and escapes label values
//! (terminal ids and zone names come from the configuration and may hold any character).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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
}

fn set(slot: &Mutex<Option<String>>, v: Option<String>) {
    if let Ok(mut g) = slot.lock() {
        *g = v;
    }
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

    /// Prometheus text exposition (version 0.0.4), encoded by `prometheus-client` from the
    /// counters as they are at this scrape. `stats`: the store's queue statistics (none when the
    /// store could not be read); `zones`: the occupancy of each zone.
    pub fn render(
        self: &Arc<Self>,
        stats: Option<&QueueStats>,
        store_ok: bool,
        zones: &[(String, usize)],
    ) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: Arc::clone(self),
            stats: stats.cloned(),
            store_ok,
            zones: zones.to_vec(),
        }));
        let mut out = String::new();
        // Writing into a String cannot fail; the collector below returns no errors of its own.
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// One scrape: the hot paths keep counting in plain atomics (no registry on the hot path); this
/// collector reads them, with the store and zone snapshots the HTTP handler took, when encoded.
struct Scrape {
    metrics: Arc<Metrics>,
    stats: Option<QueueStats>,
    store_ok: bool,
    zones: Vec<(String, usize)>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

fn counter(v: &AtomicU64) -> ConstCounter<u64> {
    ConstCounter::new(v.load(Ordering::Relaxed))
}

fn gauge_u64(v: &AtomicU64) -> ConstGauge<u64> {
    ConstGauge::new(v.load(Ordering::Relaxed))
}

fn gauge_bool(v: &AtomicBool) -> ConstGauge<i64> {
    ConstGauge::new(i64::from(v.load(Ordering::Relaxed)))
}

fn gauge_ms_as_secs(v: &AtomicI64) -> ConstGauge<f64> {
    ConstGauge::new(v.load(Ordering::Relaxed) as f64 / 1000.0)
}

/// The name the crate is given: it appends `_total` to counters itself, so a counter is
/// registered without it and exposed under the name written here.
fn family_name<'a>(name: &'a str, metric: &impl EncodeMetric) -> &'a str {
    match metric.metric_type() {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

/// An unlabelled metric: HELP, TYPE and its one sample.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> fmt::Result {
    let family =
        enc.encode_descriptor(family_name(name, &metric), help, None, metric.metric_type())?;
    metric.encode(family)
}

/// A family with one label: HELP and TYPE once, then one sample per label value. A family with
/// no samples (no zones configured, ...) is left out.
fn labelled<V: EncodeLabelValue, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (V, M)>,
) -> fmt::Result {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let kind = first.metric_type();
    let mut family = enc.encode_descriptor(family_name(name, first), help, None, kind)?;
    for (value, metric) in samples {
        metric.encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &*self.metrics;
        let enc = &mut enc;
        labelled(
            enc,
            "badgegate_clockings_received_total",
            "Clockings received, by source (including duplicates).",
            "source",
            SOURCES
                .iter()
                .map(|s| (s.as_str(), counter(&m.received[source_index(*s)]))),
        )?;
        single(
            enc,
            "badgegate_clockings_stored_total",
            "Clockings durably stored (new ids).",
            counter(&m.stored),
        )?;
        single(
            enc,
            "badgegate_clockings_duplicate_total",
            "Clockings received again with an id already stored or remembered.",
            counter(&m.duplicates),
        )?;
        single(
            enc,
            "badgegate_ingest_rejected_total",
            "Ingest requests rejected as invalid.",
            counter(&m.rejected),
        )?;
        single(
            enc,
            "badgegate_store_errors_total",
            "Store commits that failed (ingest refused).",
            counter(&m.store_errors),
        )?;
        single(
            enc,
            "badgegate_store_full_total",
            "Ingests refused because the store is full.",
            counter(&m.store_full),
        )?;
        single(
            enc,
            "badgegate_http_rate_limited_total",
            "Local API requests refused with 429 (http.rate_limit_per_sec).",
            counter(&m.http_rate_limited),
        )?;
        single(
            enc,
            "badgegate_store_writable",
            "1 when the last store commit succeeded.",
            ConstGauge::new(i64::from(self.store_ok)),
        )?;
        single(
            enc,
            "badgegate_mqtt_connected",
            "1 while the MQTT uplink is connected.",
            gauge_bool(&m.mqtt.connected),
        )?;
        single(
            enc,
            "badgegate_mqtt_reconnects_total",
            "MQTT connection attempts after the first.",
            counter(&m.mqtt.reconnects),
        )?;
        single(
            enc,
            "badgegate_mqtt_published_total",
            "Clocking publishes written (including re-sends after a reconnect).",
            counter(&m.mqtt.published),
        )?;
        single(
            enc,
            "badgegate_mqtt_in_flight",
            "Publishes awaiting their PUBACK.",
            gauge_u64(&m.mqtt.in_flight),
        )?;
        labelled(
            enc,
            "badgegate_delivered_total",
            "Clockings confirmed by a sink.",
            "sink",
            [
                ("mqtt", counter(&m.mqtt.delivered)),
                ("protime", counter(&m.protime.delivered)),
            ],
        )?;
        single(
            enc,
            "badgegate_protime_reachable",
            "1 while the last Protime call reached Protime.",
            gauge_bool(&m.protime.connected),
        )?;
        let a = &m.access;
        labelled(
            enc,
            "badgegate_access_decisions_total",
            "Statuses decided by the local access engine.",
            "status",
            AccessStatus::ALL
                .iter()
                .map(|s| (s.as_str(), counter(&a.decisions[s.index()]))),
        )?;
        labelled(
            enc,
            "badgegate_access_mirror_total",
            "Mirrored cloud clockings compared with the local decision: agree, mismatch, or unmatched (no local decision).",
            "result",
            [
                ("agree", counter(&a.mirror_agree)),
                ("mismatch", counter(&a.mirror_mismatch)),
                ("unmatched", counter(&a.mirror_unmatched)),
            ],
        )?;
        single(
            enc,
            "badgegate_access_checks_total",
            "Access checks answered (HTTP and MQTT).",
            counter(&a.checks),
        )?;
        single(
            enc,
            "badgegate_presence_sync_received_total",
            "Presence transitions received from the other gateways of the site.",
            counter(&a.sync_received),
        )?;
        single(
            enc,
            "badgegate_presence_sync_applied_total",
            "Received presence transitions that were newer than the presence held.",
            counter(&a.sync_applied),
        )?;
        single(
            enc,
            "badgegate_unknown_badge_republished_total",
            "UnknownBadge clockings re-published with the person their badge gained.",
            counter(&a.republished),
        )?;
        labelled(
            enc,
            "badgegate_zone_occupancy",
            "Persons in the zone (presence not expired).",
            "zone",
            self.zones
                .iter()
                .map(|(zone, n)| (zone.as_str(), ConstGauge::new(*n))),
        )?;
        self.encode_terminals(enc)?;
        self.encode_sources(enc)?;
        if let Some(stats) = &self.stats {
            let sinks = || stats.sinks.iter();
            labelled(
                enc,
                "badgegate_pending",
                "Clockings not yet confirmed, by sink.",
                "sink",
                sinks().map(|s| (s.sink.as_str(), ConstGauge::new(s.pending))),
            )?;
            labelled(
                enc,
                "badgegate_oldest_pending_age_seconds",
                "Age of the oldest unconfirmed clocking, by sink (0 when none).",
                "sink",
                sinks().map(|s| {
                    let age = s.oldest_pending_age_secs.unwrap_or(0.0);
                    (s.sink.as_str(), ConstGauge::new(age))
                }),
            )?;
            labelled(
                enc,
                "badgegate_dead_letters",
                "Clockings a sink's destination rejected, set aside until replayed.",
                "sink",
                sinks().map(|s| (s.sink.as_str(), ConstGauge::new(s.dead_letters))),
            )?;
            single(
                enc,
                "badgegate_store_bytes",
                "Size of the store file.",
                ConstGauge::new(stats.store_bytes),
            )?;
        }
        Ok(())
    }
}

impl Scrape {
    /// Per device-link terminal, labelled `terminal` with the configured id.
    fn encode_terminals(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let terminals = || {
            self.metrics
                .terminals
                .iter()
                .map(|(id, t)| (id.as_str(), t))
        };
        labelled(
            enc,
            "badgegate_terminal_connected",
            "1 while the link to the terminal is up.",
            "terminal",
            terminals().map(|(id, t)| (id, gauge_bool(&t.connected))),
        )?;
        labelled(
            enc,
            "badgegate_terminal_last_record_timestamp_seconds",
            "Unix time of the newest record received from the terminal (0 before the first).",
            "terminal",
            terminals().map(|(id, t)| (id, gauge_ms_as_secs(&t.last_record_ms))),
        )?;
        labelled(
            enc,
            "badgegate_terminal_device_backlog",
            "Records on the terminal not yet acknowledged by the agent, at the last count.",
            "terminal",
            terminals().map(|(id, t)| (id, gauge_u64(&t.device_backlog))),
        )?;
        labelled(
            enc,
            "badgegate_terminal_clock_drift_seconds",
            "Terminal clock minus the gateway clock (terminal zone), at the last check.",
            "terminal",
            terminals().map(|(id, t)| {
                (
                    id,
                    ConstGauge::new(t.clock_drift_secs.load(Ordering::Relaxed)),
                )
            }),
        )?;
        labelled(
            enc,
            "badgegate_terminal_frames_rejected_total",
            "Frames from the terminal rejected (bad CRC, oversize length).",
            "terminal",
            terminals().map(|(id, t)| (id, counter(&t.frames_rejected))),
        )?;
        labelled(
            enc,
            "badgegate_terminal_records_total",
            "Records committed from the terminal (real-time and backfill, before deduplication).",
            "terminal",
            terminals().map(|(id, t)| {
                let n = t.realtime_records.load(Ordering::Relaxed)
                    + t.backfilled_records.load(Ordering::Relaxed);
                (id, ConstCounter::new(n))
            }),
        )
    }

    /// Per configured cloud source, labelled `source`.
    fn encode_sources(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let sources = || self.metrics.sources.iter().map(|(name, h)| (*name, h));
        labelled(
            enc,
            "badgegate_source_up",
            "1 while the cloud source's last poll succeeded.",
            "source",
            sources().map(|(s, h)| (s, gauge_bool(&h.up))),
        )?;
        labelled(
            enc,
            "badgegate_source_last_success_timestamp_seconds",
            "Unix time of the cloud source's last successful poll (0 before the first).",
            "source",
            sources().map(|(s, h)| (s, gauge_ms_as_secs(&h.last_success_ms))),
        )?;
        labelled(
            enc,
            "badgegate_source_polls_total",
            "Polls of the cloud source.",
            "source",
            sources().map(|(s, h)| (s, counter(&h.polls))),
        )?;
        labelled(
            enc,
            "badgegate_source_errors_total",
            "Polls of the cloud source that failed.",
            "source",
            sources().map(|(s, h)| (s, counter(&h.errors))),
        )?;
        labelled(
            enc,
            "badgegate_source_clockings_total",
            "New clockings stored from the cloud source.",
            "source",
            sources().map(|(s, h)| (s, counter(&h.clockings))),
        )?;
        labelled(
            enc,
            "badgegate_source_skipped_total",
            "Vendor items that could not become clockings (logged).",
            "source",
            sources().map(|(s, h)| (s, counter(&h.skipped))),
        )?;
        labelled(
            enc,
            "badgegate_source_people",
            "Persons loaded from the cloud source at its last refresh.",
            "source",
            sources().map(|(s, h)| (s, gauge_u64(&h.people))),
        )?;
        labelled(
            enc,
            "badgegate_source_shifts",
            "Scheduled shifts loaded from the cloud source at its last refresh.",
            "source",
            sources().map(|(s, h)| (s, gauge_u64(&h.shifts))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SinkStats;
    use std::collections::BTreeSet;

    /// A terminal id with every character the text format must escape.
    const AWKWARD: &str = "gate \"n\"\\x\ny";

    /// Every family the agent exposes (the names before the move to prometheus-client).
    const FAMILIES: [&str; 39] = [
        "badgegate_clockings_received_total",
        "badgegate_clockings_stored_total",
        "badgegate_clockings_duplicate_total",
        "badgegate_ingest_rejected_total",
        "badgegate_store_errors_total",
        "badgegate_store_full_total",
        "badgegate_http_rate_limited_total",
        "badgegate_store_writable",
        "badgegate_mqtt_connected",
        "badgegate_mqtt_reconnects_total",
        "badgegate_mqtt_published_total",
        "badgegate_mqtt_in_flight",
        "badgegate_delivered_total",
        "badgegate_protime_reachable",
        "badgegate_access_decisions_total",
        "badgegate_access_mirror_total",
        "badgegate_access_checks_total",
        "badgegate_presence_sync_received_total",
        "badgegate_presence_sync_applied_total",
        "badgegate_unknown_badge_republished_total",
        "badgegate_zone_occupancy",
        "badgegate_terminal_connected",
        "badgegate_terminal_last_record_timestamp_seconds",
        "badgegate_terminal_device_backlog",
        "badgegate_terminal_clock_drift_seconds",
        "badgegate_terminal_frames_rejected_total",
        "badgegate_terminal_records_total",
        "badgegate_source_up",
        "badgegate_source_last_success_timestamp_seconds",
        "badgegate_source_polls_total",
        "badgegate_source_errors_total",
        "badgegate_source_clockings_total",
        "badgegate_source_skipped_total",
        "badgegate_source_people",
        "badgegate_source_shifts",
        "badgegate_pending",
        "badgegate_oldest_pending_age_seconds",
        "badgegate_dead_letters",
        "badgegate_store_bytes",
    ];

    /// Metrics with every family present: link terminals, cloud sources, store stats, zones.
    fn scrape() -> String {
        let m = Metrics::new(["t1", AWKWARD]).with_sources([Source::Crosschex, Source::Aktion]);
        m.stored.store(7, Ordering::Relaxed);
        m.count_received(Source::Http, 3);
        let t1 = &m.terminals["t1"];
        t1.last_record_ms
            .store(1_712_345_678_123, Ordering::Relaxed);
        t1.clock_drift_secs.store(-3, Ordering::Relaxed);
        t1.connected.store(true, Ordering::Relaxed);
        let stats = QueueStats {
            store_path: "/var/lib/badgegate/store.redb".into(),
            store_bytes: 4096,
            clockings_stored: 7,
            sinks: ["mqtt", "protime"]
                .into_iter()
                .map(|sink| SinkStats {
                    sink: sink.into(),
                    pending: 3,
                    oldest_pending_age_secs: (sink == "mqtt").then_some(12.5),
                    dead_letters: 1,
                })
                .collect(),
            orphaned: Vec::new(),
        };
        let zones = [("hall".to_owned(), 2), ("yard \"b\"".to_owned(), 0)];
        Arc::new(m).render(Some(&stats), true, &zones)
    }

    #[test]
    fn awkward_label_values_are_escaped() {
        let text = scrape();
        assert!(
            text.contains("badgegate_terminal_connected{terminal=\"gate \\\"n\\\"\\\\x\\ny\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("badgegate_zone_occupancy{zone=\"yard \\\"b\\\"\"} 0\n"));
        // The newline in the id did not split a sample across lines.
        assert!(text
            .lines()
            .all(|l| l.starts_with("# ") || l.starts_with("badgegate_")));
    }

    /// One sample line, its label values unescaped.
    struct Sample<'a> {
        name: &'a str,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// None if the line is not a well-formed sample.
    fn parse_sample(line: &str) -> Option<Sample<'_>> {
        let name_end = line.find(['{', ' '])?;
        let (name, mut rest) = line.split_at(name_end);
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            rest = body;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = rest.split_once("=\"")?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next()? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            _ => return None,
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.trim_start_matches(',').to_owned(), value));
                rest = &after[end + 1..];
            }
        }
        let value = rest.strip_prefix(' ')?.parse().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    #[test]
    fn exposition_parses() {
        let text = scrape();
        let mut families = Vec::new();
        let mut family = None;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, _) = help.split_once(' ').expect("HELP has a text");
                let kind = lines.next().and_then(|l| l.strip_prefix("# TYPE "));
                let kind = kind.and_then(|k| k.strip_prefix(name)).expect(line);
                assert!(matches!(kind, " counter" | " gauge"), "{line}: {kind}");
                if kind == " counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                families.push(name);
                family = Some(name);
                continue;
            }
            let Sample { name, labels, .. } =
                parse_sample(line).unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let family = family.unwrap_or_else(|| panic!("{line:?} before any HELP/TYPE"));
            assert_eq!(name, family, "{line:?}");
            assert!(labels.len() <= 1, "{line:?}");
            for (key, _) in &labels {
                assert!(
                    !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase()),
                    "{line:?}"
                );
            }
        }
        let unique: BTreeSet<_> = families.iter().copied().collect();
        assert_eq!(unique.len(), families.len(), "a family appears twice");
        assert_eq!(unique, FAMILIES.into_iter().collect());
        let terminals: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("badgegate_terminal_connected{"))
            .filter_map(parse_sample)
            .map(|s| (s.labels[0].1.clone(), s.value))
            .collect();
        assert_eq!(
            terminals,
            [(AWKWARD.to_owned(), 0.0), ("t1".to_owned(), 1.0)]
        );
    }
}
