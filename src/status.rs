//! `badgegate status`: a running agent at a glance, from its `/healthz`, in 80 columns.

use crate::health::{Health, Status};

/// Render the health document (and the per-sink delivery rates measured by the caller) as text
/// lines of at most 80 columns.
pub fn render(h: &Health, rates: &[(String, f64)]) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "badgegate {}  site {}  {}",
        h.version,
        h.site,
        if h.status == Status::Ok {
            "OK"
        } else {
            "PROBLEM"
        }
    ));
    let store = &h.store;
    out.push(format!(
        "store      {}  {}  {} clockings held",
        if store.writable {
            "writable"
        } else {
            "NOT WRITABLE"
        },
        human_bytes(store.bytes.unwrap_or(0)),
        store.clockings.unwrap_or(0)
    ));
    if let Some(e) = &store.error {
        out.push(fit("           error: ", e));
    }
    if let Some(p) = &h.protime {
        out.push(format!(
            "protime    {}",
            if p.reachable {
                "reachable"
            } else {
                "UNREACHABLE or refusing"
            }
        ));
        if let Some(e) = &p.last_error {
            out.push(fit("           last error: ", e));
        }
    }
    if let Some(m) = &h.mqtt {
        out.push(format!(
            "uplink     mqtt {}  in flight {}",
            if m.connected {
                "connected"
            } else {
                "DISCONNECTED"
            },
            m.in_flight
        ));
        if let Some(e) = &m.last_error {
            out.push(fit("           last error: ", e));
        }
    }
    out.push(format!(
        "{:<10} {:<10} {:>10}  {:>14}  {:>10}  {:>8}",
        "sinks", "SINK", "PENDING", "OLDEST", "RATE/s", "ETA"
    ));
    let oldest = h.oldest_pending_age_secs.flatten();
    for (sink, &pending) in h.pending.iter().flatten() {
        let rate = rates.iter().find(|(k, _)| k == sink).map(|(_, r)| *r);
        let eta = match rate {
            Some(r) if r > 0.0 && pending > 0 => human_secs(pending as f64 / r),
            _ => "-".to_owned(),
        };
        out.push(format!(
            "{:<10} {:<10} {:>10}  {:>14}  {:>10}  {:>8}",
            "",
            sink,
            pending,
            oldest
                .filter(|_| pending > 0)
                .map_or_else(|| "-".to_owned(), human_secs),
            rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}")),
            eta
        ));
    }
    for (sink, pending) in &h.orphaned {
        out.push(format!(
            "{:<10} {:<10} orphaned: {pending} pending, not in this config",
            "", sink
        ));
    }
    if !h.terminals.is_empty() {
        out.push(format!(
            "{:<10} {:<14} {:<5} {:<19} {:>7} {:>6} {:>7}",
            "terminals", "ID", "LINK", "LAST RECORD", "ON DEV", "DRIFT", "BAD"
        ));
    }
    for (id, t) in &h.terminals {
        out.push(format!(
            "{:<10} {:<14} {:<5} {:<19} {:>7} {:>6} {:>7}",
            "",
            clip(id, 14),
            if t.connected { "up" } else { "DOWN" },
            short_time(t.last_record_at.as_deref()),
            t.device_backlog,
            format!("{:+}s", t.clock_drift_secs),
            t.frames_rejected
        ));
        if let (false, Some(e)) = (t.connected, &t.last_error) {
            out.push(fit(&" ".repeat(26), e));
        }
    }
    if !h.sources.is_empty() {
        out.push(format!(
            "{:<10} {:<10} {:<5} {:<19} {:>9} {:>7} {:>7}",
            "sources", "SOURCE", "STATE", "LAST OK", "CLOCKINGS", "PEOPLE", "SHIFTS"
        ));
    }
    for (name, src) in &h.sources {
        out.push(format!(
            "{:<10} {:<10} {:<5} {:<19} {:>9} {:>7} {:>7}",
            "",
            clip(name, 10),
            if src.up { "ok" } else { "FAIL" },
            short_time(src.last_success_at.as_deref()),
            src.clockings,
            src.people,
            src.shifts
        ));
        if let (false, Some(e)) = (src.up, &src.last_error) {
            out.push(fit(&" ".repeat(22), e));
        }
    }
    if !h.zones.is_empty() {
        let mut line = String::from("zones     ");
        for (zone, n) in &h.zones {
            let item = format!(" {zone} {n}");
            if line.chars().count() + item.chars().count() > 80 {
                out.push(std::mem::replace(&mut line, " ".repeat(10)));
            }
            line.push_str(&item);
        }
        out.push(line);
    }
    out.push(format!(
        "dead       {}",
        h.dead_letters.map_or_else(
            || "no cloud sink configured".to_owned(),
            |n| format!("{n} dead letter(s)")
        )
    ));
    out.join("\n")
}

/// An RFC 3339 time as `YYYY-MM-DD HH:MM:SS`, or `-`.
fn short_time(t: Option<&str>) -> String {
    t.map(|v| v.get(..19).unwrap_or(v).replace('T', " "))
        .unwrap_or_else(|| "-".into())
}

/// `prefix` then as much of `text` as fits in 80 columns.
fn fit(prefix: &str, text: &str) -> String {
    format!(
        "{prefix}{}",
        clip(text, 80usize.saturating_sub(prefix.chars().count()))
    )
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

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

pub fn human_secs(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_section_fits_80_columns() {
        let h: Health = serde_json::from_value(json!({
            "status": "ok", "site": "plant-1", "version": "0.1.0",
            "delivered": {"mqtt": 10, "protime": 0},
            "store": {"writable": true, "bytes": 12_345_678, "clockings": 1234, "error": null, "unsynced_confirmations": 0},
            "mqtt": {"connected": false, "access_connected": false, "in_flight": 0, "last_error": "network error: Connection refused (os error 111) while connecting to the broker at 10.0.0.5:1883"},
            "pending": {"mqtt": 1234},
            "orphaned": {"protime": 5},
            "oldest_pending_age_secs": 303.2,
            "terminals": {
                "gate-north-with-a-long-name": {"connected": true, "last_record_at": "2026-11-22T08:10:03.123+00:00", "device_backlog": 3, "clock_drift_secs": -2, "frames_rejected": 1, "realtime_records": 7, "backfilled_records": 0, "last_error": null},
                "gate-south": {"connected": false, "last_record_at": null, "device_backlog": 0, "clock_drift_secs": 0, "frames_rejected": 0, "realtime_records": 0, "backfilled_records": 0, "last_error": "no answer to command 0x3C within 5s"}
            },
            "sources": {
                "aktion": {"up": true, "last_success_at": "2026-11-22T08:10:03.123+00:00", "clockings": 12, "people": 340, "shifts": 1200, "polls": 5, "errors": 0, "skipped": 0, "position": "delta", "last_error": null},
                "crosschex": {"up": false, "last_success_at": null, "clockings": 0, "people": 0, "shifts": 0, "polls": 5, "errors": 5, "skipped": 0, "position": null, "last_error": "CrossChex Cloud attendance.record/getrecord: rate limited: HTTP 200 FREQUENT_REQUEST: too frequent"}
            },
            "zones": {"production": 412, "warehouse-with-a-long-name": 12, "lab": 3, "canteen": 40, "office-building-b": 17, "yard": 0}
        }))
        .unwrap();
        let text = render(&h, &[("mqtt".into(), 12.5)]);
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "too wide: {line:?}");
        }
        for want in [
            "store",
            "uplink",
            "DISCONNECTED",
            "mqtt",
            "1234",
            "protime    orphaned: 5 pending, not in this config",
            "5m 3s",
            "12.5",
            "terminals",
            "gate-south",
            "DOWN",
            "-2s",
            "sources",
            "aktion",
            "1200",
            "FAIL",
            "getrecord: rate limited",
            "dead",
            "production 412",
            "yard 0",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
