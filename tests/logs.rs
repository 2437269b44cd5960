//! JSON logs parse cleanly: the real agent with `--log-format json` through scenarios that log a
//! lot (bad ingest bodies, an unknown terminal, the broker down and up, a people file reloaded
//! and a broken one refused); every stderr line is a JSON object with one `message`, no key
//! twice, and plain values (no `Some(..)`, `None` or Debug-quoted strings).

mod support;

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A JSON value whose objects, at any depth, have no key twice (serde_json keeps the last).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some((key, Strict(v))) = map.next_entry::<String, Strict>()? {
            if object.insert(key.clone(), v).is_some() {
                return Err(serde::de::Error::custom(format!("key {key:?} twice")));
            }
        }
        Ok(Strict(Value::Object(object)))
    }
}

/// What is wrong with one log line, if anything.
fn problem(line: &str) -> Option<String> {
    let v = match serde_json::from_str::<Strict>(line) {
        Ok(Strict(v)) => v,
        Err(e) => return Some(format!("not clean JSON: {e}")),
    };
    let Some(o) = v.as_object() else {
        return Some("not a JSON object".into());
    };
    if !o.get("message").is_some_and(Value::is_string) {
        return Some("no message".into());
    }
    fn debug_formatted(v: &Value) -> Option<String> {
        match v {
            Value::String(s)
                if s.starts_with("Some(")
                    || s == "None"
                    || s.starts_with('"')
                    || s.starts_with("[\"") =>
            {
                Some(format!("Debug-formatted value {s:?}"))
            }
            Value::Array(a) => a.iter().find_map(debug_formatted),
            Value::Object(o) => o.values().find_map(debug_formatted),
            _ => None,
        }
    }
    debug_formatted(&v)
}

#[test]
fn the_checker_catches_what_the_issue_showed() {
    let issue = r#"{"level":"INFO","message":"ingest rejected","code":"unknown_terminal","index":"Some(0)","field":"Some(\"terminal\")","message":"terminal \"x\" is not configured"}"#;
    assert!(problem(issue).unwrap().contains("twice"));
    assert!(problem(r#"{"message":"m","index":"Some(0)"}"#).is_some());
    assert!(problem(r#"{"message":"m","terminal":"\"x\""}"#).is_some());
    assert!(problem(r#"{"message":"m","sinks":"[\"mqtt\"]"}"#).is_some());
    assert!(problem(r#"{"message":"m","x":"None"}"#).is_some());
    assert!(problem("plain text").is_some());
    assert_eq!(
        problem(
            r#"{"message":"ingest rejected","index":0,"reason":"terminal \"x\" is not configured"}"#
        ),
        None
    );
}

const DOOR: &str = r#"
[[terminals]]
id = "door"
kind = "http"
zone_from = "outside"
zone_to = "hall"

[access]
people_file = "people.csv"

[[zones]]
name = "hall"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_log_line_has_one_message_and_plain_values() {
    let mut mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.csv");
    std::fs::write(&people, "badge,person,groups\n100,E-100,staff\n").unwrap();
    let mut agent = AgentProc::start_json_logs(dir.path(), &mosquitto.url(), DOOR);
    let api = Api::new();
    api.wait_connected(&agent, WAIT).await;

    // Bad bodies: each is refused and logged.
    let good = clocking("gate-1", "100", "2026-03-02T08:00:00+01:00", "in");
    let bad = [
        json!("not a batch"),
        json!({"terminal": "nowhere", "badge": "1", "occurred_at": "2026-03-02T08:00:00+01:00", "direction": "in"}),
        json!([good.clone(), {"terminal": "gate-1", "badge": "", "occurred_at": "yesterday", "direction": "sideways"}]),
        json!({"terminal": "gate-1", "badge": "1", "occurred_at": "2026-03-02T08:00:00+01:00", "direction": "in", "colour": "red"}),
    ];
    for body in &bad {
        let (code, answer) = api.post(&agent, body).await;
        assert_eq!(code / 100, 4, "{body} -> {answer}");
    }
    let r = api
        .client
        .post(agent.url("/v1/clockings"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // The broker down and up, with clockings stored meanwhile.
    mosquitto.kill();
    api.wait_health(&agent, "MQTT down", WAIT, |v| {
        v["mqtt"]["connected"] == false
    })
    .await;
    api.post_all(&agent, &many(20, "logs")).await;
    mosquitto.restart();
    api.wait_connected(&agent, WAIT).await;
    api.wait_drained(&agent, WAIT).await;

    // The people file reloaded, then a broken one refused.
    std::fs::write(
        &people,
        "badge,person,groups\n100,E-100,staff\n200,E-200,staff\n",
    )
    .unwrap();
    eventually("the reload logged", WAIT, || async {
        agent.log().contains("people file reloaded")
    })
    .await;
    std::fs::write(&people, "badge,person,groups\n\"unterminated\n").unwrap();
    eventually("the broken file logged", WAIT, || async {
        agent.log().contains("people file changed but is not valid")
    })
    .await;
    assert!(agent.terminate().success());

    let log = agent.log();
    let mut messages = BTreeSet::new();
    let bad_lines: Vec<String> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                if let Some(m) = v["message"].as_str() {
                    messages.insert(m.to_owned());
                }
            }
            problem(l).map(|p| format!("{p}: {l}"))
        })
        .collect();
    assert!(bad_lines.is_empty(), "{}", bad_lines.join("\n"));
    // The scenarios did log what they were meant to.
    for m in [
        "badgegate started",
        "ingest rejected",
        "people file reloaded",
        "people file changed but is not valid; the persons loaded before stay in force",
    ] {
        assert!(
            messages.contains(m),
            "{m:?} not logged; messages: {messages:?}"
        );
    }
    let rejected = log
        .lines()
        .filter(|l| l.contains("\"ingest rejected\""))
        .count();
    assert_eq!(rejected, bad.len() + 1, "{log}");
}
