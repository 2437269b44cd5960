//! docs/mqtt.md and the JSON Schemas in docs/schema/ describe what the agent really publishes.
//!
//! A real Mosquitto, the real agent binary and a raw MQTT subscriber on `badgegate/plant-1/#`:
//! clockings come in over the HTTP ingest API (every direction, every status including
//! `UnknownBadgeNumber`, terminals in five time zones, DST edges) and from a simulated Anviz
//! terminal; the status topic goes `online`, `offline` (the broker's last will after SIGKILL),
//! `online`, `offline` (the agent's own on SIGTERM). Every payload received is validated against
//! the schemas, and broken payloads must be rejected by them, so the schemas cannot be vacuous.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use badgegate::kit::simulator::{Simulator, SimulatorConfig};
use badgegate::model::{ClockingId, Direction};
use badgegate::terminals::anviz::codec::Record;
use chrono::{DateTime, NaiveDate, Timelike};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use support::*;
use tokio::sync::mpsc;

/// Upper bound for every wait; each one ends as soon as its event happened.
const WAIT: Duration = Duration::from_secs(60);
const PREFIX: &str = "badgegate";

fn doc_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn load_json(rel: &str) -> Value {
    let text = std::fs::read_to_string(doc_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
}

/// The two schemas, checked against the draft 2020-12 meta-schema and compiled with format
/// validation on (`date-time`, `date`), which draft 2020-12 otherwise treats as annotations.
struct Schemas {
    clocking: jsonschema::Validator,
    status: jsonschema::Validator,
    occupancy: jsonschema::Validator,
    presence: jsonschema::Validator,
    reply: jsonschema::Validator,
    mismatch: jsonschema::Validator,
}

impl Schemas {
    fn load() -> Schemas {
        let compile = |rel: &str| {
            let schema = load_json(rel);
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{rel} declares draft 2020-12"
            );
            if let Err(e) = jsonschema::meta::validate(&schema) {
                panic!("{rel} is not a valid draft 2020-12 schema: {e}");
            }
            jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{rel} does not compile: {e}"))
        };
        Schemas {
            clocking: compile("docs/schema/clocking.schema.json"),
            status: compile("docs/schema/status.schema.json"),
            occupancy: compile("docs/schema/occupancy.schema.json"),
            presence: compile("docs/schema/presence.schema.json"),
            reply: compile("docs/schema/access-reply.schema.json"),
            mismatch: compile("docs/schema/access-mismatch.schema.json"),
        }
    }

    fn errors(validator: &jsonschema::Validator, v: &Value) -> Vec<String> {
        validator
            .iter_errors(v)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    /// A clocking payload: valid JSON, valid against the schema, consistent with its topic and
    /// with itself (date and minute of day are the local parts of `occurred_at`, the id is the
    /// documented derivation).
    fn check_clocking(&self, topic: &str, payload: &[u8]) -> Value {
        let v: Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
            panic!(
                "clocking on {topic} is not JSON ({e}): {}",
                String::from_utf8_lossy(payload)
            )
        });
        let errors = Self::errors(&self.clocking, &v);
        assert!(
            errors.is_empty(),
            "emitted clocking violates clocking.schema.json: {errors:?}\n{v}"
        );
        let terminal = v["terminal"].as_str().unwrap();
        assert_eq!(topic, format!("{PREFIX}/{SITE}/clockings/{terminal}"));
        assert_eq!(v["site"], SITE);

        let occurred = DateTime::parse_from_rfc3339(v["occurred_at"].as_str().unwrap()).unwrap();
        assert_eq!(
            v["date"],
            occurred.date_naive().format("%Y-%m-%d").to_string(),
            "date is occurred_at's local date: {v}"
        );
        assert_eq!(
            v["time_of_day_minutes"],
            occurred.hour() * 60 + occurred.minute(),
            "time_of_day_minutes is occurred_at's local minute of day: {v}"
        );
        let direction: Direction = v["direction"].as_str().unwrap().parse().unwrap();
        let id = ClockingId::derive(
            SITE,
            terminal,
            v["badge"].as_str().unwrap(),
            occurred,
            direction,
        );
        assert_eq!(v["id"], id.to_string(), "id derivation as documented: {v}");
        DateTime::parse_from_rfc3339(v["received_at"].as_str().unwrap()).unwrap();
        v
    }

    /// A JSON payload valid against `validator` (named `what` in failures).
    fn check_json(validator: &jsonschema::Validator, what: &str, payload: &[u8]) -> Value {
        let v: Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
            panic!(
                "{what} is not JSON ({e}): {}",
                String::from_utf8_lossy(payload)
            )
        });
        let errors = Self::errors(validator, &v);
        assert!(
            errors.is_empty(),
            "emitted {what} violates its schema: {errors:?}\n{v}"
        );
        v
    }

    /// An occupancy payload: valid, consistent with its topic, count = people.
    fn check_occupancy(&self, topic: &str, payload: &[u8]) -> Value {
        let v = Self::check_json(&self.occupancy, "occupancy", payload);
        let zone = v["zone"].as_str().unwrap();
        assert_eq!(topic, format!("{PREFIX}/{SITE}/zones/{zone}/occupancy"));
        assert_eq!(v["count"], v["people"].as_array().unwrap().len());
        v
    }

    /// A presence transition: valid, on its gateway's and subject's topic.
    fn check_presence(&self, topic: &str, payload: &[u8]) -> Value {
        let v = Self::check_json(&self.presence, "presence transition", payload);
        let subject = match v["person"].as_str() {
            Some(p) => format!("p:{p}"),
            None => format!("b:{}", v["badge"].as_str().unwrap()),
        };
        assert_eq!(
            topic,
            format!(
                "{PREFIX}/{SITE}/presence/{}/{}",
                badgegate::access::mqtt::topic_level(v["gateway"].as_str().unwrap()),
                badgegate::access::mqtt::topic_level(&subject)
            )
        );
        v
    }

    /// Schemas that accept everything prove nothing: each must reject broken variants.
    fn assert_rejects(
        validator: &jsonschema::Validator,
        what: &str,
        valid: &Value,
        mutations: &[(&str, Value)],
    ) {
        assert!(
            validator.is_valid(valid),
            "the base {what} is valid: {valid}"
        );
        for field in valid.as_object().unwrap().keys() {
            let mut v = valid.clone();
            v.as_object_mut().unwrap().remove(field);
            assert!(
                !validator.is_valid(&v),
                "{what} schema accepts it without {field}"
            );
        }
        let mut v = valid.clone();
        v["extra"] = json!(1);
        assert!(
            !validator.is_valid(&v),
            "{what} schema accepts an unknown field"
        );
        for (field, value) in mutations {
            let mut v = valid.clone();
            let mut target = &mut v;
            for part in field.split('.') {
                target = match part.parse::<usize>() {
                    Ok(i) => &mut target[i],
                    Err(_) => &mut target[part],
                };
            }
            *target = value.clone();
            assert!(
                !validator.is_valid(&v),
                "{what} schema accepts {field} = {value}"
            );
        }
    }

    /// A status payload: raw text, not a JSON document, and one of the schema's values.
    fn check_status(&self, payload: &[u8]) -> String {
        let text = std::str::from_utf8(payload).expect("status payload is UTF-8 text");
        assert!(
            !text.starts_with('"') && text.trim() == text,
            "status is raw text, not JSON-quoted or padded: {text:?}"
        );
        let errors = Self::errors(&self.status, &Value::String(text.to_owned()));
        assert!(
            errors.is_empty(),
            "status payload violates status.schema.json: {errors:?}"
        );
        text.to_owned()
    }

    /// The schemas must reject broken payloads derived from a valid one, or they prove nothing.
    fn assert_rejects_broken(&self, valid: &Value) {
        assert!(self.clocking.is_valid(valid), "the base payload is valid");
        let mut broken: Vec<(String, Value)> = Vec::new();
        for field in valid.as_object().unwrap().keys() {
            let mut v = valid.clone();
            v.as_object_mut().unwrap().remove(field);
            broken.push((format!("without {field}"), v));
        }
        let mutations: &[(&str, Value)] = &[
            ("direction IN", json!("IN")),
            ("direction both", json!("both")),
            (
                "status UnknownBadgeNumber (input only)",
                json!("UnknownBadgeNumber"),
            ),
            ("status accessok", json!("accessok")),
            ("source mqtt", json!("mqtt")),
            ("id uppercase", json!("3F0C1E2D3C4B5A69788796A5B4C3D2E1")),
            ("id 31 digits", json!("3f0c1e2d3c4b5a69788796a5b4c3d2e")),
            ("id not hex", json!("3f0c1e2d3c4b5a69788796a5b4c3d2eg")),
            ("time_of_day_minutes 1440", json!(1440)),
            ("time_of_day_minutes -1", json!(-1)),
            ("time_of_day_minutes 90.5", json!(90.5)),
            ("time_of_day_minutes as string", json!("90")),
            ("occurred_at with Z", json!("2026-07-01T22:30:00Z")),
            ("occurred_at without offset", json!("2026-07-02T00:30:00")),
            ("occurred_at space", json!("2026-07-02 00:30:00+02:00")),
            ("occurred_at hour 24", json!("2026-07-02T24:30:00+02:00")),
            (
                "received_at with +00:00",
                json!("2026-07-01T22:30:00.512+00:00"),
            ),
            ("received_at without millis", json!("2026-07-01T22:30:00Z")),
            ("date without zero padding", json!("2026-7-2")),
            ("date month 13", json!("2026-13-02")),
            ("date Feb 30 (format)", json!("2026-02-30")),
            ("badge empty", json!("")),
            ("badge control character", json!("47\n11")),
            ("badge 65 characters", json!("9".repeat(65))),
            ("badge as number", json!(4711)),
            ("person empty", json!("")),
            ("person as number", json!(42)),
            ("site with slash", json!("plant/1")),
            ("terminal with wildcard", json!("gate+1")),
        ];
        for (what, value) in mutations {
            let field = what.split(' ').next().unwrap();
            let mut v = valid.clone();
            v[field] = value.clone();
            broken.push(((*what).to_owned(), v));
        }
        let mut v = valid.clone();
        v["extra"] = json!(1);
        broken.push(("an unknown field".into(), v));
        broken.push(("an array".into(), json!([valid])));
        broken.push(("a string".into(), json!(valid.to_string())));

        let accepted: Vec<&str> = broken
            .iter()
            .filter(|(_, v)| self.clocking.is_valid(v))
            .map(|(what, _)| what.as_str())
            .collect();
        assert!(
            accepted.is_empty(),
            "clocking.schema.json accepts broken payloads: {accepted:?}"
        );

        for bad in [
            json!("Online"),
            json!("OFFLINE"),
            json!(""),
            json!("online\n"),
            json!(true),
            json!({"status": "online"}),
        ] {
            assert!(
                !self.status.is_valid(&bad),
                "status.schema.json accepts {bad}"
            );
        }
    }
}

/// One MQTT message as it was on the wire.
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// A subscriber that keeps the raw payload bytes (the status payload is text, not JSON) and the
/// retain flag.
struct RawSubscriber {
    rx: mpsc::UnboundedReceiver<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl RawSubscriber {
    /// Connect, subscribe with QoS 1 and return once the SUBACK arrived.
    async fn start(broker: SocketAddr, filter: &str) -> RawSubscriber {
        let mut opts = MqttOptions::new(
            format!("schema-sub-{}", free_port()),
            broker.ip().to_string(),
            broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(&filter, QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready.recv())
            .await
            .expect("no SUBACK in time");
        RawSubscriber { rx, task }
    }

    async fn next(&mut self, waiting_for: &str) -> Msg {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no message within {WAIT:?} while waiting for {waiting_for}"))
    }
}

impl Drop for RawSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the subscriber on `badgegate/plant-1/#` saw: first deliveries by id (in arrival order)
/// and the status payloads.
#[derive(Default)]
struct Seen {
    clockings: HashMap<String, (Vec<u8>, Value)>,
    order: Vec<String>,
    statuses: Vec<String>,
    redeliveries: usize,
    occupancy: Vec<Value>,
    presence: Vec<Value>,
}

impl Seen {
    /// Validate one message of any topic; a topic docs/mqtt.md does not list fails the test.
    fn take(&mut self, schemas: &Schemas, m: Msg) {
        let status_topic = format!("{PREFIX}/{SITE}/status");
        let clockings = format!("{PREFIX}/{SITE}/clockings/");
        if m.topic == status_topic {
            self.statuses.push(schemas.check_status(&m.payload));
        } else if m.topic.starts_with(&format!("{PREFIX}/{SITE}/zones/")) {
            self.occupancy
                .push(schemas.check_occupancy(&m.topic, &m.payload));
        } else if m.topic.starts_with(&format!("{PREFIX}/{SITE}/presence/")) {
            self.presence
                .push(schemas.check_presence(&m.topic, &m.payload));
        } else if m.topic == format!("{PREFIX}/{SITE}/access/check") {
            // Requests (the test's own) are not the agent's payloads.
        } else if m.topic.starts_with(&clockings) {
            let v = schemas.check_clocking(&m.topic, &m.payload);
            let id = v["id"].as_str().unwrap().to_owned();
            if let Some((first, _)) = self.clockings.get(&id) {
                // At least once: a redelivery carries the very same payload.
                assert_eq!(first, &m.payload, "a redelivery of {id} differs");
                self.redeliveries += 1;
            } else {
                self.order.push(id.clone());
                self.clockings.insert(id, (m.payload, v));
            }
        } else {
            panic!(
                "{} is published but not documented in docs/mqtt.md",
                m.topic
            );
        }
    }

    /// Take messages until every id in `want` has arrived.
    async fn until_ids(&mut self, schemas: &Schemas, sub: &mut RawSubscriber, want: &[String]) {
        while let Some(missing) = want.iter().find(|id| !self.clockings.contains_key(*id)) {
            let m = sub.next(&format!("clocking {missing}")).await;
            self.take(schemas, m);
        }
    }

    /// Take messages until the next status message, returning it.
    async fn until_status(&mut self, schemas: &Schemas, sub: &mut RawSubscriber) -> String {
        let before = self.statuses.len();
        while self.statuses.len() == before {
            let m = sub.next("a status message").await;
            self.take(schemas, m);
        }
        self.statuses.last().unwrap().clone()
    }
}

/// A fresh subscriber to the status topic gets the retained value at once.
async fn retained_status(schemas: &Schemas, broker: SocketAddr) -> String {
    let mut sub = RawSubscriber::start(broker, &format!("{PREFIX}/{SITE}/status")).await;
    let m = sub.next("the retained status").await;
    assert!(m.retain, "the status is retained");
    schemas.check_status(&m.payload)
}

/// One clocking posted to the ingest API and the fields the agent must emit for it.
struct Case {
    terminal: &'static str,
    badge: &'static str,
    posted_at: &'static str,
    direction: Option<&'static str>,
    status: Option<&'static str>,
    occurred_at: &'static str,
    date: &'static str,
    minutes: u64,
    emitted_direction: &'static str,
    emitted_status: &'static str,
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // Brussels in summer (+02:00): 22:30 UTC is 00:30 on the next local day.
    Case { terminal: "gate-1", badge: "4711", posted_at: "2026-07-01T22:30:00Z", direction: Some("in"), status: None,
           occurred_at: "2026-07-02T00:30:00+02:00", date: "2026-07-02", minutes: 30, emitted_direction: "in", emitted_status: "AccessOk" },
    // Local midnight is minute 0.
    Case { terminal: "gate-1", badge: "000123", posted_at: "2026-07-01T22:00:00Z", direction: Some("out"), status: None,
           occurred_at: "2026-07-02T00:00:00+02:00", date: "2026-07-02", minutes: 0, emitted_direction: "out", emitted_status: "AccessOk" },
    // Brussels in winter (+01:00).
    Case { terminal: "gate-1", badge: "4711", posted_at: "2026-01-15T08:05:00+01:00", direction: Some("out"), status: Some("AccessRefused"),
           occurred_at: "2026-01-15T08:05:00+01:00", date: "2026-01-15", minutes: 485, emitted_direction: "out", emitted_status: "AccessRefused" },
    // Just after the spring change (01:00 UTC, 2026-03-29).
    Case { terminal: "gate-1", badge: "4711", posted_at: "2026-03-29T01:30:00Z", direction: Some("in"), status: Some("OutZone"),
           occurred_at: "2026-03-29T03:30:00+02:00", date: "2026-03-29", minutes: 210, emitted_direction: "in", emitted_status: "OutZone" },
    // The autumn overlap: local 02:30 twice, told apart only by the offset.
    Case { terminal: "gate-1", badge: "9001", posted_at: "2026-10-25T00:30:00Z", direction: Some("in"), status: Some("UnknownBadgeNumber"),
           occurred_at: "2026-10-25T02:30:00+02:00", date: "2026-10-25", minutes: 150, emitted_direction: "in", emitted_status: "UnknownBadge" },
    Case { terminal: "gate-1", badge: "9001", posted_at: "2026-10-25T01:30:00Z", direction: Some("in"), status: Some("UnknownBadge"),
           occurred_at: "2026-10-25T02:30:00+01:00", date: "2026-10-25", minutes: 150, emitted_direction: "in", emitted_status: "UnknownBadge" },
    // New York (-04:00 in summer): the same instant as the first case, still the previous day.
    Case { terminal: "gate-2", badge: "4711", posted_at: "2026-07-01T22:30:00Z", direction: Some("unknown"), status: Some("WrongPinCode"),
           occurred_at: "2026-07-01T18:30:00-04:00", date: "2026-07-01", minutes: 1110, emitted_direction: "unknown", emitted_status: "WrongPinCode" },
    // No direction given: unknown. Seconds and their fraction are kept, minutes are truncated.
    Case { terminal: "gate-2", badge: "4712", posted_at: "2026-12-24T23:59:59.250-05:00", direction: None, status: Some("AlarmCode"),
           occurred_at: "2026-12-24T23:59:59.250-05:00", date: "2026-12-24", minutes: 1439, emitted_direction: "unknown", emitted_status: "AlarmCode" },
    // Kolkata (+05:30).
    Case { terminal: "gate-3", badge: "4711", posted_at: "2026-03-10T00:00:00Z", direction: Some("in"), status: Some("AntiPassbackError"),
           occurred_at: "2026-03-10T05:30:00+05:30", date: "2026-03-10", minutes: 330, emitted_direction: "in", emitted_status: "AntiPassbackError" },
    // UTC: "+00:00", never "Z".
    Case { terminal: "gate-utc", badge: "4711", posted_at: "2026-03-10T00:00:00+01:00", direction: Some("out"), status: Some("AccessOk"),
           occurred_at: "2026-03-09T23:00:00+00:00", date: "2026-03-09", minutes: 1380, emitted_direction: "out", emitted_status: "AccessOk" },
];

fn anviz_record(user: u64, time: (u32, u32, u32), state: u8) -> Record {
    Record {
        user_code: user,
        local_time: NaiveDate::from_ymd_opt(2026, 6, 1)
            .unwrap()
            .and_hms_opt(time.0, time.1, time.2)
            .unwrap(),
        backup_code: 8,
        record_type: state,
        work_code: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_payload_matches_the_documented_schemas() {
    let schemas = Schemas::load();
    let mosquitto = Mosquitto::start();

    // An Anviz terminal in Tokyo with two records waiting; the agent backfills them at connect.
    let sim = Simulator::new(SimulatorConfig {
        device_id: 3,
        ..SimulatorConfig::default()
    });
    let sim_addr = sim.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    sim.add_record(anviz_record(4242, (6, 0, 0), 0), false);
    sim.add_record(anviz_record(4242, (17, 45, 30), 1), false);
    let anviz_expected = [
        ("2026-06-01T06:00:00+09:00", 360, Direction::In),
        ("2026-06-01T17:45:30+09:00", 1065, Direction::Out),
    ];

    let mut sub = RawSubscriber::start(mosquitto.addr(), &format!("{PREFIX}/{SITE}/#")).await;
    let extra = format!(
        r#"
[[terminals]]
id = "gate-3"
kind = "http"
timezone = "Asia/Kolkata"

[[terminals]]
id = "gate-utc"
kind = "http"
timezone = "UTC"

[[terminals]]
id = "north"
kind = "anviz"
address = "{sim_addr}"
device_id = 3
timezone = "Asia/Tokyo"
request_timeout_ms = 2000
keepalive_secs = 1
backfill_interval_secs = 2
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start_with(dir.path(), &mosquitto.url(), "", &extra);
    let api = Api::new();
    let mut seen = Seen::default();

    // After connecting, the agent's first message is `online`.
    assert_eq!(seen.until_status(&schemas, &mut sub).await, "online");
    assert!(
        seen.clockings.is_empty(),
        "online comes before any clocking"
    );

    // Clockings over the ingest API, in one batch.
    let body: Vec<Value> = CASES
        .iter()
        .map(|c| {
            let mut v = clocking(c.terminal, c.badge, c.posted_at, "in");
            match c.direction {
                Some(d) => v["direction"] = json!(d),
                None => {
                    v.as_object_mut().unwrap().remove("direction");
                }
            }
            if let Some(s) = c.status {
                v["status"] = json!(s);
            }
            v
        })
        .collect();
    let (code, answer) = api.post(&agent, &Value::Array(body)).await;
    assert_eq!(code, 202, "{answer}");
    let http_ids: Vec<String> = answer["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(http_ids.len(), CASES.len());

    let anviz_ids: Vec<String> = anviz_expected
        .iter()
        .map(|(at, _, dir)| {
            let at = DateTime::parse_from_rfc3339(at).unwrap();
            ClockingId::derive(SITE, "north", "4242", at, *dir).to_string()
        })
        .collect();
    let all_ids: Vec<String> = http_ids.iter().chain(&anviz_ids).cloned().collect();
    seen.until_ids(&schemas, &mut sub, &all_ids).await;

    for (case, id) in CASES.iter().zip(&http_ids) {
        let v = &seen.clockings[id].1;
        let what = format!("{} {} {}: {v}", case.terminal, case.badge, case.posted_at);
        assert_eq!(v["terminal"], case.terminal, "{what}");
        assert_eq!(v["badge"], case.badge, "{what}");
        assert_eq!(v["person"], Value::Null, "{what}");
        assert_eq!(v["occurred_at"], case.occurred_at, "{what}");
        assert_eq!(v["date"], case.date, "{what}");
        assert_eq!(v["time_of_day_minutes"], case.minutes, "{what}");
        assert_eq!(v["direction"], case.emitted_direction, "{what}");
        assert_eq!(v["status"], case.emitted_status, "{what}");
        assert_eq!(v["source"], "http", "{what}");
    }
    for ((at, minutes, dir), id) in anviz_expected.iter().zip(&anviz_ids) {
        let v = &seen.clockings[id].1;
        assert_eq!(v["terminal"], "north");
        assert_eq!(v["badge"], "4242");
        assert_eq!(v["person"], Value::Null);
        assert_eq!(v["occurred_at"], *at);
        assert_eq!(v["date"], "2026-06-01");
        assert_eq!(v["time_of_day_minutes"], *minutes);
        assert_eq!(v["direction"], dir.as_str());
        assert_eq!(v["status"], "AccessOk");
        assert_eq!(v["source"], "anviz");
    }
    // Every value of the direction and status enums that badgegate emits was covered.
    let emitted = |field: &str| -> HashSet<String> {
        seen.clockings
            .values()
            .map(|(_, v)| v[field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(emitted("direction").len(), 3);
    assert_eq!(emitted("status").len(), 7);
    assert_eq!(
        emitted("source"),
        HashSet::from(["http".to_owned(), "anviz".to_owned()])
    );
    // First deliveries of one terminal arrive in the order the agent stored them.
    for terminal in ["gate-1", "gate-2", "north"] {
        let want: Vec<&String> = all_ids
            .iter()
            .filter(|id| seen.clockings[*id].1["terminal"] == terminal)
            .collect();
        let got: Vec<&String> = seen
            .order
            .iter()
            .filter(|id| seen.clockings[*id].1["terminal"] == terminal)
            .collect();
        assert_eq!(got, want, "order on {terminal}");
    }

    // The status is retained: a subscriber arriving later gets `online` at once.
    assert_eq!(retained_status(&schemas, mosquitto.addr()).await, "online");

    // A crash: the broker publishes the agent's last will.
    agent.kill9();
    assert_eq!(seen.until_status(&schemas, &mut sub).await, "offline");
    // Back up: `online` again (with any redeliveries validated and compared on the way).
    agent.spawn();
    assert_eq!(seen.until_status(&schemas, &mut sub).await, "online");
    // A clean stop: the agent says `offline` itself and exits 0.
    let status = agent.terminate();
    assert!(status.success(), "clean stop exits 0: {status:?}");
    assert_eq!(seen.until_status(&schemas, &mut sub).await, "offline");
    assert_eq!(retained_status(&schemas, mosquitto.addr()).await, "offline");
    assert_eq!(
        seen.statuses,
        ["online", "offline", "online", "offline"],
        "status sequence"
    );
    eprintln!(
        "validated {} clockings ({} redeliveries) and {} status messages",
        seen.clockings.len(),
        seen.redeliveries,
        seen.statuses.len() + 2
    );

    // The schemas are not vacuous: broken variants of real payloads are rejected.
    schemas.assert_rejects_broken(&seen.clockings[&http_ids[0]].1);
    schemas.assert_rejects_broken(&seen.clockings[&anviz_ids[0]].1);

    if std::env::var_os("BADGEGATE_PRINT_PAYLOADS").is_some() {
        for id in &seen.order {
            println!("{}", String::from_utf8_lossy(&seen.clockings[id].0));
        }
    }
}

/// The access engine's payloads: occupancy, presence transitions (also one from another
/// gateway, written by the test from the schema, which the agent must apply), access check
/// replies, mismatch events; and the HTTP access answers and muster list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_payloads_match_the_documented_schemas() {
    let schemas = Schemas::load();
    let mosquitto = Mosquitto::start();
    let mut sub = RawSubscriber::start(mosquitto.addr(), &format!("{PREFIX}/{SITE}/#")).await;
    let mut replies = RawSubscriber::start(mosquitto.addr(), "plc/replies").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("people.csv"),
        "badge,person,groups\n4711,E-4711,staff\n",
    )
    .unwrap();
    let extra = r#"
[[terminals]]
id = "door"
kind = "http"
zone_from = "outside"
zone_to = "hall"

[access]
antipassback = "hard"
people_file = "people.csv"
site_sync = true
occupancy_interval_ms = 100

[[zones]]
name = "hall"
exit_status = "OutZone"
"#;
    let agent = AgentProc::start_named(dir.path(), &mosquitto.url(), "gw-schema", "", extra);
    let api = Api::new();
    api.wait_access_connected(&agent, WAIT).await;

    // Another gateway's transition, written as docs/mqtt.md and presence.schema.json say.
    let foreign = json!({
        "gateway": "gw-other", "person": "E-5", "badge": "5", "zone": "hall", "from": "outside",
        "occurred_at": "2026-05-04T07:30:00+02:00", "terminal": "door-east",
        "clocking_id": "0123456789abcdef0123456789abcdef"
    });
    assert!(schemas.presence.is_valid(&foreign));
    let mut opts = MqttOptions::new("schema-plc", "127.0.0.1", mosquitto.port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
        .publish(
            format!("{PREFIX}/{SITE}/presence/gw-other/p%3AE-5"),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&foreign).unwrap(),
        )
        .await
        .unwrap();
    for (badge, at) in [
        ("4711", "2026-05-04T08:00:00+02:00"),
        ("4711", "2026-05-04T08:01:00+02:00"),
        ("9999", "2026-05-04T08:02:00+02:00"),
    ] {
        let (code, body) = api.post(&agent, &clocking("door", badge, at, "in")).await;
        assert_eq!(code, 202, "{body}");
    }
    let check = format!("{PREFIX}/{SITE}/access/check");
    for req in [
        json!({"terminal": "door", "badge": "4711", "reply_to": "plc/replies", "correlation_id": "r-1"}),
        json!({"terminal": "door", "badge": "", "reply_to": "plc/replies", "correlation_id": 2}),
    ] {
        client
            .publish(
                &check,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&req).unwrap(),
            )
            .await
            .unwrap();
    }

    let mut seen = Seen::default();
    let done = |seen: &Seen| {
        seen.occupancy.iter().any(|o| o["count"] == 2)
            && seen.presence.iter().any(|p| p["person"] == "E-4711")
            && seen.clockings.len() == 3
    };
    while !done(&seen) {
        let m = sub
            .next("occupancy 2, E-4711's transition and 3 clockings")
            .await;
        seen.take(&schemas, m);
    }
    let occupancy = seen
        .occupancy
        .iter()
        .find(|o| o["count"] == 2)
        .unwrap()
        .clone();
    let people: Vec<&str> = occupancy["people"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["person"].as_str().unwrap())
        .collect();
    assert_eq!(
        people,
        ["E-5", "E-4711"],
        "the other gateway's person is applied"
    );
    let transition = seen
        .presence
        .iter()
        .find(|p| p["person"] == "E-4711")
        .unwrap()
        .clone();
    assert_eq!(transition["gateway"], "gw-schema");
    assert_eq!(transition["zone"], "hall");

    let answer = Schemas::check_json(
        &schemas.reply,
        "access reply",
        &replies.next("a reply").await.payload,
    );
    assert_eq!(
        (answer["correlation_id"].as_str(), answer["status"].as_str()),
        (Some("r-1"), Some("OutZone")),
        "{answer}"
    );
    let error = Schemas::check_json(
        &schemas.reply,
        "access error reply",
        &replies.next("an error reply").await.payload,
    );
    assert_eq!(error["error"]["code"], "invalid_badge");

    // Retained: a late subscriber gets occupancy and transitions at once.
    let mut late = RawSubscriber::start(
        mosquitto.addr(),
        &format!("{PREFIX}/{SITE}/zones/hall/occupancy"),
    )
    .await;
    let m = late.next("the retained occupancy").await;
    assert!(m.retain);
    schemas.check_occupancy(&m.topic, &m.payload);

    // The HTTP forms.
    let (_, muster) = api.get_json(&agent, "/v1/zones/hall/people").await;
    schemas.check_occupancy(
        &format!("{PREFIX}/{SITE}/zones/hall/occupancy"),
        muster.to_string().as_bytes(),
    );
    let (_, mut http_answer) = api
        .post_to(
            &agent,
            "/v1/access/check",
            &json!({"terminal": "door", "badge": "9999"}),
        )
        .await;
    http_answer["correlation_id"] = Value::Null;
    let http_answer = Schemas::check_json(
        &schemas.reply,
        "HTTP access answer",
        http_answer.to_string().as_bytes(),
    );
    assert_eq!(http_answer["status"], "UnknownBadge");

    // A mismatch event as the engine renders it.
    let mismatch = badgegate::access::engine::Mismatch {
        terminal: "door".into(),
        badge: "4711".into(),
        person: Some("E-4711".into()),
        occurred_at: DateTime::parse_from_rfc3339("2026-05-04T08:01:00+02:00").unwrap(),
        source: badgegate::model::Source::Protime,
        local_status: badgegate::model::AccessStatus::AntiPassbackError,
        cloud_status: badgegate::model::AccessStatus::AccessOk,
        local_id: ClockingId([1; 16]),
        cloud_id: ClockingId([2; 16]),
    }
    .to_json();
    Schemas::check_json(
        &schemas.mismatch,
        "mismatch",
        mismatch.to_string().as_bytes(),
    );

    // None of the schemas is vacuous.
    Schemas::assert_rejects(
        &schemas.occupancy,
        "occupancy",
        &occupancy,
        &[
            ("count", json!(-1)),
            ("count", json!("2")),
            ("zone", json!("a/b")),
            ("people.0.since", json!("2026-05-04T08:00:00Z")),
            ("people.0.badge", json!("")),
            ("updated_at", json!("2026-05-04T08:00:00+02:00")),
        ],
    );
    Schemas::assert_rejects(
        &schemas.presence,
        "presence",
        &transition,
        &[
            ("clocking_id", json!("XYZ")),
            ("occurred_at", json!("yesterday")),
            ("person", json!("")),
            ("gateway", json!("")),
        ],
    );
    Schemas::assert_rejects(
        &schemas.reply,
        "access reply",
        &answer,
        &[
            ("status", json!("Maybe")),
            ("reason_code", json!("because")),
            ("direction", json!("up")),
        ],
    );
    Schemas::assert_rejects(
        &schemas.reply,
        "access error reply",
        &error,
        &[("error.code", json!("oops")), ("error.message", json!(""))],
    );
    Schemas::assert_rejects(
        &schemas.mismatch,
        "mismatch",
        &mismatch,
        &[
            ("source", json!("http")),
            ("cloud_status", json!("UnknownBadgeNumber")),
            ("local_clocking_id", json!("1")),
        ],
    );
    poller.abort();
}

/// The example payloads in docs/mqtt.md (every ```json block) are valid clockings, consistent
/// with themselves, and broken variants of them are rejected.
#[test]
fn documented_examples_match_the_schema() {
    let schemas = Schemas::load();
    let doc = std::fs::read_to_string(doc_path("docs/mqtt.md")).unwrap();
    let examples: Vec<&str> = doc
        .split("```json\n")
        .skip(1)
        .map(|s| s.split("```").next().unwrap())
        .collect();
    assert!(examples.len() >= 2, "docs/mqtt.md shows example payloads");
    let mut kinds = HashSet::new();
    for text in examples {
        let v: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("example is not JSON ({e}):\n{text}"));
        // Each example is checked against the schema of its payload kind.
        let kind = if v.get("people").is_some() {
            schemas.check_occupancy(
                &format!(
                    "{PREFIX}/{SITE}/zones/{}/occupancy",
                    v["zone"].as_str().unwrap_or_default()
                ),
                text.as_bytes(),
            );
            "occupancy"
        } else if v.get("gateway").is_some() {
            Schemas::check_json(&schemas.presence, "presence example", text.as_bytes());
            "presence"
        } else if v.get("cloud_status").is_some() {
            Schemas::check_json(&schemas.mismatch, "mismatch example", text.as_bytes());
            "mismatch"
        } else if v.get("reply_to").is_some() {
            // A request: what the agent accepts, not what it emits.
            assert!(v["terminal"].is_string() && v["badge"].is_string(), "{v}");
            "request"
        } else if v.get("correlation_id").is_some() {
            Schemas::check_json(&schemas.reply, "access reply example", text.as_bytes());
            "reply"
        } else {
            let topic = format!(
                "{PREFIX}/{SITE}/clockings/{}",
                v["terminal"].as_str().unwrap_or_default()
            );
            schemas.check_clocking(&topic, text.as_bytes());
            schemas.assert_rejects_broken(&v);
            "clocking"
        };
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 6, "an example of every payload: {kinds:?}");
    for topic in [
        "`{topic_prefix}/{site}/clockings/{terminal}`",
        "`{topic_prefix}/{site}/status`",
        "`{topic_prefix}/{site}/zones/{zone}/occupancy`",
        "`{topic_prefix}/{site}/access/check`",
        "`{topic_prefix}/{site}/access/mismatch`",
        "`{topic_prefix}/{site}/presence/{gateway}/{subject}`",
    ] {
        assert!(doc.contains(topic), "docs/mqtt.md documents {topic}");
    }
}
