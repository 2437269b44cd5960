//! Who is where, as the API, MQTT and the CLI show it: occupancy per zone and the muster list
//! (person, since, last terminal). Pure functions of presence, the rules and the time.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::presence::PresenceMap;
use super::rules::Rules;

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One zone: `{"zone","count","people":[{"person","badge","since","terminal"}...],"updated_at"}`,
/// the people in the order they entered. The MQTT occupancy payload and `GET
/// /v1/zones/{zone}/people`. None for a zone that is not declared.
pub fn zone(map: &PresenceMap, rules: &Rules, name: &str, now: DateTime<Utc>) -> Option<Value> {
    rules.zone(name)?;
    let occupancy = map.occupancy(rules, now);
    let people = occupancy.get(name).map_or(&[][..], Vec::as_slice);
    Some(json!({
        "zone": name,
        "count": people.len(),
        "people": people.iter().map(|p| p.to_json()).collect::<Vec<_>>(),
        "updated_at": stamp(now),
    }))
}

/// Every declared zone with its count: `GET /v1/zones`.
pub fn zones(map: &PresenceMap, rules: &Rules, now: DateTime<Utc>) -> Value {
    let occupancy = map.occupancy(rules, now);
    json!({
        "zones": rules.zones.iter().map(|z| json!({
            "zone": &*z.name,
            "count": occupancy.get(&*z.name).map_or(0, Vec::len),
        })).collect::<Vec<_>>(),
        "updated_at": stamp(now),
    })
}

/// Every declared zone's payload, in config order.
pub fn all_zones(map: &PresenceMap, rules: &Rules, now: DateTime<Utc>) -> Vec<Value> {
    rules
        .zones
        .iter()
        .filter_map(|z| zone(map, rules, &z.name, now))
        .collect()
}

/// `badgegate zones` as text: the counts, or one zone's muster list, in 80 columns.
pub fn render(doc: &Value) -> String {
    let mut out = Vec::new();
    if let Some(people) = doc["people"].as_array() {
        out.push(format!(
            "{}: {} inside (as of {})",
            doc["zone"].as_str().unwrap_or("?"),
            doc["count"],
            doc["updated_at"].as_str().unwrap_or("-")
        ));
        out.push(format!(
            "{:<20} {:<16} {:<25} {}",
            "PERSON", "BADGE", "SINCE", "TERMINAL"
        ));
        for p in people {
            let s = |k: &str| p[k].as_str().unwrap_or("-").to_owned();
            out.push(format!(
                "{:<20} {:<16} {:<25} {}",
                clip(&s("person"), 20),
                clip(&s("badge"), 16),
                s("since"),
                clip(&s("terminal"), 16)
            ));
        }
    } else {
        out.push(format!(
            "{:<30} {:>8}   (as of {})",
            "ZONE",
            "INSIDE",
            doc["updated_at"].as_str().unwrap_or("-")
        ));
        for z in doc["zones"].as_array().into_iter().flatten() {
            out.push(format!(
                "{:<30} {:>8}",
                clip(z["zone"].as_str().unwrap_or("?"), 30),
                z["count"]
            ));
        }
    }
    out.join("\n")
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
