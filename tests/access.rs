//! The access engine end to end: the real agent binary, a real Mosquitto, the real store on disk.
//! Statuses at ingest, the muster list, access checks over HTTP and MQTT, presence across a
//! crash, UnknownBadge re-publication, two gateways converging through the broker (also after
//! one was offline and after a broker restart), and a fast start with 50,000 persons.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Zones and terminals: `door` leads from outside into the hall, leaving the hall is OutZone.
fn access_extra(door: &str, site_sync: bool) -> String {
    format!(
        r#"
[[terminals]]
id = "{door}"
kind = "http"
zone_from = "outside"
zone_to = "hall"

[access]
antipassback = "hard"
people_file = "people.csv"
site_sync = {site_sync}
occupancy_interval_ms = 100

[[zones]]
name = "hall"
exit_status = "OutZone"
"#
    )
}

fn people(dir: &Path, rows: &[(&str, &str)]) {
    let mut text = String::from("badge,person,groups\n");
    for (badge, person) in rows {
        text.push_str(&format!("{badge},{person},staff\n"));
    }
    std::fs::write(dir.join("people.csv"), text).unwrap();
}

fn at(hh_mm: &str) -> String {
    format!("2026-05-04T{hh_mm}:00+02:00")
}

/// POST one clocking; the 202's status.
async fn pass(
    api: &Api,
    agent: &AgentProc,
    door: &str,
    badge: &str,
    hh_mm: &str,
    dir: &str,
) -> String {
    let (code, body) = api
        .post(agent, &clocking(door, badge, &at(hh_mm), dir))
        .await;
    assert_eq!(code, 202, "{body}");
    body["accepted"][0]["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no status in {body}"))
        .to_owned()
}

/// The persons in the hall, as the agent's muster list shows them.
async fn inside(api: &Api, agent: &AgentProc) -> BTreeSet<String> {
    let (code, v) = api.get_json(agent, "/v1/zones/hall/people").await;
    assert_eq!(code, 200, "{v}");
    let people = v["people"].as_array().unwrap();
    assert_eq!(v["count"], people.len());
    people
        .iter()
        .map(|p| p["person"].as_str().unwrap().to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

async fn wait_inside(api: &Api, agent: &AgentProc, want: &[&str], what: &str) {
    let want = set(want);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = inside(api, agent).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the hall holds {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next message on `sub` matching `pred`.
async fn next_matching(
    sub: &mut Subscriber,
    what: &str,
    pred: impl Fn(&str, &Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sub.next(left).await {
            Some((topic, v, _)) if pred(&topic, &v) => return v,
            Some(_) => {}
            None => panic!("no {what} within {WAIT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_muster_list_checks_and_presence_across_a_crash() {
    let mosquitto = Mosquitto::start();
    let mut sub = Subscriber::start(mosquitto.addr(), &format!("badgegate/{SITE}/#")).await;
    let dir = tempfile::tempdir().unwrap();
    people(dir.path(), &[("100", "E-100"), ("101", "E-101")]);
    let mut agent = AgentProc::start_with(
        dir.path(),
        &mosquitto.url(),
        "",
        &access_extra("door", false),
    );
    let api = Api::new();

    assert_eq!(
        pass(&api, &agent, "door", "100", "08:00", "in").await,
        "AccessOk"
    );
    assert_eq!(
        pass(&api, &agent, "door", "100", "08:01", "in").await,
        "AntiPassbackError"
    );
    assert_eq!(
        pass(&api, &agent, "door", "999", "08:01", "in").await,
        "UnknownBadge"
    );
    assert_eq!(
        pass(&api, &agent, "door", "101", "08:02", "unknown").await,
        "AccessOk",
        "unknown direction: nothing held, no move"
    );
    assert_eq!(
        pass(&api, &agent, "door", "101", "08:03", "in").await,
        "AccessOk"
    );
    // A status the terminal reported passes through.
    let mut pin = clocking("door", "101", &at("08:04"), "in");
    pin["status"] = json!("WrongPinCode");
    let (_, body) = api.post(&agent, &pin).await;
    assert_eq!(body["accepted"][0]["status"], "WrongPinCode");

    // The clockings carry the person and the status on MQTT (one terminal's in order).
    let refused = next_matching(&mut sub, "the AntiPassbackError clocking", |t, v| {
        t.contains("/clockings/") && v["status"] == "AntiPassbackError"
    })
    .await;
    assert_eq!(refused["person"], "E-100");
    let unknown = next_matching(&mut sub, "the UnknownBadge clocking", |t, v| {
        t.contains("/clockings/") && v["badge"] == "999"
    })
    .await;
    assert_eq!(
        (unknown["status"].as_str(), &unknown["person"]),
        (Some("UnknownBadge"), &Value::Null)
    );

    // Occupancy: retained on MQTT, and over the API.
    let mut zones_sub = Subscriber::start(
        mosquitto.addr(),
        &format!("badgegate/{SITE}/zones/+/occupancy"),
    )
    .await;
    let occupancy = next_matching(&mut zones_sub, "occupancy 2", |t, v| {
        t == format!("badgegate/{SITE}/zones/hall/occupancy") && v["count"] == 2
    })
    .await;
    assert_eq!(occupancy["zone"], "hall");
    assert_eq!(
        occupancy["people"][0]["person"], "E-100",
        "in the order they entered"
    );
    let (_, zones) = api.get_json(&agent, "/v1/zones").await;
    assert_eq!(zones["zones"], json!([{"zone": "hall", "count": 2}]));
    let (_, muster) = api.get_json(&agent, "/v1/zones/hall/people").await;
    assert_eq!(muster["people"][1]["person"], "E-101");
    assert_eq!(muster["people"][1]["since"], "2026-05-04T08:03:00+02:00");
    assert_eq!(muster["people"][1]["terminal"], "door");
    let (code, v) = api.get_json(&agent, "/v1/zones/attic/people").await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("unknown_zone"))
    );

    // An access check answers without recording anything.
    let received = api
        .metric(
            &agent,
            "badgegate_clockings_received_total{source=\"http\"}",
        )
        .await;
    let (code, v) = api
        .post_to(
            &agent,
            "/v1/access/check",
            &json!({"terminal": "door", "badge": "100", "direction": "in"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "AntiPassbackError");
    assert_eq!(v["person"], "E-100");
    assert_eq!(
        (v["zone_from"].as_str(), v["zone_to"].as_str()),
        (Some("outside"), Some("hall"))
    );
    assert!(v["reason"].as_str().unwrap().contains("hall"), "{v}");
    let (_, v) = api
        .post_to(
            &agent,
            "/v1/access/check",
            &json!({"terminal": "door", "badge": "100"}),
        )
        .await;
    assert_eq!(
        (v["status"].as_str(), v["direction"].as_str()),
        (Some("OutZone"), Some("out")),
        "inferred: {v}"
    );
    for (body, code, field) in [
        (
            json!({"terminal": "nope", "badge": "1"}),
            "unknown_terminal",
            "terminal",
        ),
        (json!({"terminal": "door"}), "missing_field", "badge"),
        (
            json!({"terminal": "door", "badge": "1", "direction": "up"}),
            "invalid_direction",
            "direction",
        ),
        (
            json!({"terminal": "door", "badge": "1", "at": "noon"}),
            "invalid_timestamp",
            "at",
        ),
    ] {
        let (status, v) = api.post_to(&agent, "/v1/access/check", &body).await;
        assert_eq!(
            (
                status,
                v["error"]["code"].as_str(),
                v["error"]["field"].as_str()
            ),
            (400, Some(code), Some(field)),
            "{body}"
        );
    }
    assert_eq!(
        api.metric(
            &agent,
            "badgegate_clockings_received_total{source=\"http\"}"
        )
        .await,
        received,
        "checks record nothing"
    );
    assert_eq!(
        api.metric(&agent, "badgegate_zone_occupancy{zone=\"hall\"}")
            .await,
        2.0
    );
    assert_eq!(
        api.metric(
            &agent,
            "badgegate_access_decisions_total{status=\"AntiPassbackError\"}"
        )
        .await,
        1.0
    );

    // The CLI shows the same while the agent runs.
    let out = badgegate()
        .args(["zones", "--config"])
        .arg(&agent.config_path)
        .arg("hall")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("E-100") && text.contains("2 inside"),
        "{text}"
    );

    // A crash: presence is what was committed with the clockings.
    agent.kill9();
    // Badge 999 now belongs to someone: at the next start its UnknownBadge clocking is
    // re-published with the person, status unchanged.
    people(
        dir.path(),
        &[("100", "E-100"), ("101", "E-101"), ("999", "E-999")],
    );
    agent.spawn();
    let again = next_matching(&mut sub, "the re-published clocking", |t, v| {
        t.contains("/clockings/") && v["id"] == unknown["id"] && v["person"] == "E-999"
    })
    .await;
    assert_eq!(again["status"], "UnknownBadge");
    assert_eq!(inside(&api, &agent).await, set(&["E-100", "E-101"]));
    assert_eq!(
        pass(&api, &agent, "door", "100", "08:10", "in").await,
        "AntiPassbackError"
    );
    assert_eq!(
        pass(&api, &agent, "door", "100", "08:11", "out").await,
        "OutZone"
    );
    assert_eq!(
        pass(&api, &agent, "door", "999", "08:12", "in").await,
        "AccessOk"
    );
    assert_eq!(inside(&api, &agent).await, set(&["E-101", "E-999"]));

    // Stopped: the CLI reads the store.
    assert!(agent.terminate().success());
    let out = badgegate()
        .args(["zones", "--json", "--config"])
        .arg(&agent.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["zones"], json!([{"zone": "hall", "count": 2}]));
}

/// Two gateways, each with its own door into the same hall, sharing presence through one real
/// Mosquitto: interleaved clockings, site-wide anti-passback, one gateway offline for a while,
/// and a broker restart that loses every retained message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_converge_through_a_real_mosquitto() {
    let mut mosquitto = Mosquitto::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let everyone: Vec<(String, String)> =
        (1..=6).map(|i| (format!("{i}"), format!("P{i}"))).collect();
    let rows: Vec<(&str, &str)> = everyone
        .iter()
        .map(|(b, p)| (b.as_str(), p.as_str()))
        .collect();
    people(da.path(), &rows);
    people(db.path(), &rows);
    let a = AgentProc::start_named(
        da.path(),
        &mosquitto.url(),
        "gw-a",
        "",
        &access_extra("door-a", true),
    );
    let mut b = AgentProc::start_named(
        db.path(),
        &mosquitto.url(),
        "gw-b",
        "",
        &access_extra("door-b", true),
    );
    let api = Api::new();
    api.wait_access_connected(&a, WAIT).await;
    api.wait_access_connected(&b, WAIT).await;

    // Interleaved: both gateways at once, different people.
    let on_a = async {
        assert_eq!(
            pass(&api, &a, "door-a", "1", "08:00", "in").await,
            "AccessOk"
        );
        assert_eq!(
            pass(&api, &a, "door-a", "3", "08:02", "in").await,
            "AccessOk"
        );
        assert_eq!(
            pass(&api, &a, "door-a", "3", "08:03", "out").await,
            "OutZone"
        );
    };
    let on_b = async {
        assert_eq!(
            pass(&api, &b, "door-b", "2", "08:01", "in").await,
            "AccessOk"
        );
    };
    tokio::join!(on_a, on_b);
    wait_inside(&api, &a, &["P1", "P2"], "gateway A").await;
    wait_inside(&api, &b, &["P1", "P2"], "gateway B").await;

    // Site-wide anti-passback: P1 came in through A and cannot come in again through B.
    assert_eq!(
        pass(&api, &b, "door-b", "1", "08:04", "in").await,
        "AntiPassbackError"
    );
    assert_eq!(
        pass(&api, &b, "door-b", "1", "08:05", "out").await,
        "OutZone"
    );
    wait_inside(&api, &a, &["P2"], "A after P1 left through B").await;

    // B is down while things happen at A; when it is back it catches up from the broker.
    b.kill9();
    assert_eq!(
        pass(&api, &a, "door-a", "2", "08:06", "out").await,
        "OutZone",
        "A knows P2 came in through B"
    );
    assert_eq!(
        pass(&api, &a, "door-a", "4", "08:07", "in").await,
        "AccessOk"
    );
    b.spawn();
    wait_inside(&api, &b, &["P4"], "B after being offline").await;

    // The broker dies and comes back empty (no persistence): transitions made meanwhile are
    // still marked unsent in each store and are published once it is back.
    mosquitto.kill();
    assert_eq!(
        pass(&api, &b, "door-b", "5", "08:08", "in").await,
        "AccessOk"
    );
    assert_eq!(
        pass(&api, &a, "door-a", "6", "08:09", "in").await,
        "AccessOk"
    );
    mosquitto.restart();
    wait_inside(&api, &a, &["P4", "P5", "P6"], "A after the broker restart").await;
    wait_inside(&api, &b, &["P4", "P5", "P6"], "B after the broker restart").await;

    // The retained occupancy says the same.
    let mut sub = Subscriber::start(
        mosquitto.addr(),
        &format!("badgegate/{SITE}/zones/+/occupancy"),
    )
    .await;
    next_matching(&mut sub, "occupancy 3", |_, v| v["count"] == 3).await;
    assert!(
        api.metric(&a, "badgegate_presence_sync_applied_total")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_check_over_mqtt_with_a_real_subscriber() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    people(dir.path(), &[("100", "E-100")]);
    let agent = AgentProc::start_with(
        dir.path(),
        &mosquitto.url(),
        "",
        &access_extra("door", false),
    );
    let api = Api::new();
    assert_eq!(
        pass(&api, &agent, "door", "100", "08:00", "in").await,
        "AccessOk"
    );
    api.wait_access_connected(&agent, WAIT).await;

    let mut replies = Subscriber::start(mosquitto.addr(), "plc/replies/#").await;
    let mut opts = MqttOptions::new("test-plc", "127.0.0.1", mosquitto.port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let poller = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                break;
            }
        }
    });
    let topic = format!("badgegate/{SITE}/access/check");
    let request = |v: Value| serde_json::to_vec(&v).unwrap();
    // A terminal of another gateway: this one stays silent. Then a bad request and a good one;
    // they are answered in order, so the first reply proves the silence.
    for body in [
        json!({"terminal": "elsewhere", "badge": "100", "reply_to": "plc/replies/1", "correlation_id": "c-0"}),
        json!({"terminal": "door", "badge": "100", "direction": "sideways", "reply_to": "plc/replies/1", "correlation_id": "c-1"}),
        json!({"terminal": "door", "badge": "100", "direction": "in", "reply_to": "plc/replies/1", "correlation_id": {"n": 2}}),
    ] {
        client
            .publish(&topic, QoS::AtLeastOnce, false, request(body))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let (_, bad, _) = replies.next(WAIT).await.expect("a reply");
    assert_eq!(bad["correlation_id"], "c-1", "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_direction");
    let (topic, good, retained) = replies.next(WAIT).await.expect("a reply");
    assert_eq!((topic.as_str(), retained), ("plc/replies/1", false));
    assert_eq!(good["correlation_id"], json!({"n": 2}));
    assert_eq!(good["status"], "AntiPassbackError");
    assert_eq!(good["person"], "E-100");
    assert_eq!(good["zone_to"], "hall");
    eprintln!("two answers over MQTT in {:?}", started.elapsed());
    assert_eq!(
        api.metric(&agent, "badgegate_access_checks_total").await,
        1.0,
        "one valid check answered"
    );
    assert_eq!(
        api.metric(
            &agent,
            "badgegate_clockings_received_total{source=\"http\"}"
        )
        .await,
        1.0,
        "checks record nothing"
    );
    poller.abort();
}

/// 50,000 persons' presence in the store: the agent starts and answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_persons_presence_loaded_without_a_slow_start() {
    use badgegate::access::presence::{encode, Presence};
    use badgegate::model::ClockingId;
    use badgegate::store::{Change, SinkId, Store, TableWrite, Writer};
    use std::sync::Arc;

    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let everyone: Vec<(String, String)> = (0..50_000u32)
        .map(|i| (i.to_string(), format!("E-{i}")))
        .collect();
    let rows: Vec<(&str, &str)> = everyone
        .iter()
        .map(|(b, p)| (b.as_str(), p.as_str()))
        .collect();
    people(dir.path(), &rows);
    let data = dir.path().join("data");
    {
        let store = Arc::new(Store::open(&data, &[SinkId::Mqtt]).unwrap());
        let since = chrono::DateTime::parse_from_rfc3339("2026-05-04T07:00:00+02:00").unwrap();
        let rows: Vec<TableWrite> = (0..50_000u32)
            .map(|i| {
                let p = Presence {
                    zone: "hall".into(),
                    from: "outside".into(),
                    at: since,
                    terminal: "door".into(),
                    badge: i.to_string().into(),
                    person: Some(format!("E-{i}").into()),
                    clocking: ClockingId([(i % 251) as u8; 16]),
                    gateway: None,
                };
                TableWrite::Presence {
                    subject: p.subject(),
                    value: encode(&p),
                    unsent: None,
                }
            })
            .collect();
        let (writer, handle) = Writer::start(store, 30, None);
        handle.change(Change::Tables(rows)).await.unwrap();
        drop(handle);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
    }
    let started = Instant::now();
    let agent = AgentProc::start_with(
        dir.path(),
        &mosquitto.url(),
        "",
        &access_extra("door", false),
    );
    let api = Api::new();
    let (code, zones) = api.get_json(&agent, "/v1/zones").await;
    let took = started.elapsed();
    eprintln!("agent with 50,000 persons' presence answered after {took:?}");
    assert_eq!(code, 200);
    assert_eq!(zones["zones"][0]["count"], 50_000);
    // An unoptimised build on a shared 2-core machine, and a first start that also stores the
    // 50,000 persons of the people file; `cargo bench` measures the release build.
    assert!(took < Duration::from_secs(15), "start took {took:?}");
    let (_, v) = api
        .post_to(
            &agent,
            "/v1/access/check",
            &json!({"terminal": "door", "badge": "4711", "direction": "in"}),
        )
        .await;
    assert_eq!(
        (v["status"].as_str(), v["person"].as_str()),
        (Some("AntiPassbackError"), Some("E-4711")),
        "{v}"
    );
    // A second start: people and presence both come from the store.
    let mut agent = agent;
    agent.kill9();
    let started = Instant::now();
    agent.spawn();
    let (_, zones) = api.get_json(&agent, "/v1/zones").await;
    let took = started.elapsed();
    eprintln!("restart with 50,000 persons answered after {took:?}");
    assert_eq!(zones["zones"][0]["count"], 50_000);
    assert!(took < Duration::from_secs(10), "restart took {took:?}");
}

/// The status an access check gives `badge` at the door now.
async fn check(api: &Api, agent: &AgentProc, badge: &str) -> String {
    let (code, v) = api
        .post_to(
            agent,
            "/v1/access/check",
            &json!({"terminal": "door", "badge": badge, "direction": "in"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    v["status"].as_str().unwrap().to_owned()
}

/// check-config and run read the people file with the rest of the config: a bad line is a
/// problem under `access.people_file`, reported with every other problem, exit 64.
#[test]
fn a_broken_people_file_is_a_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("people.csv"),
        "badge,person,groups\n1,A,staff\n1,B,staff\n",
    )
    .unwrap();
    let config = dir.path().join("badgegate.toml");
    let text = agent_config(
        &dir.path().join("data"),
        free_port(),
        "mqtt://127.0.0.1:1883",
        "",
        &access_extra("door", false),
    );
    std::fs::write(
        &config,
        text.replace("\"Europe/Brussels\"\n", "\"Europe/Bruxelles\"\n"),
    )
    .unwrap();
    let o = badgegate()
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("agent.timezone:"), "{out}");
    assert!(lines[1].starts_with("access.people_file:"), "{out}");
    assert!(
        lines[1].contains("people.csv") && lines[1].contains("line 3"),
        "{out}"
    );
    let o = badgegate()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("access.people_file:"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_people_file_is_reloaded_when_it_changes_and_a_broken_one_is_ignored() {
    let mosquitto = Mosquitto::start();
    let mut sub =
        Subscriber::start(mosquitto.addr(), &format!("badgegate/{SITE}/clockings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    people(dir.path(), &[("100", "E-100")]);
    let agent = AgentProc::start_with(
        dir.path(),
        &mosquitto.url(),
        "",
        &access_extra("door", false),
    );
    let api = Api::new();
    assert_eq!(check(&api, &agent, "100").await, "AccessOk");
    assert_eq!(
        pass(&api, &agent, "door", "200", "08:00", "in").await,
        "UnknownBadge"
    );
    let first = next_matching(&mut sub, "the unknown badge's clocking", |_, v| {
        v["badge"] == "200"
    })
    .await;
    assert_eq!(first["person"], Value::Null);

    // Badge 200 is handed out: no restart needed.
    people(dir.path(), &[("100", "E-100"), ("200", "E-200")]);
    eventually("badge 200 known after the reload", WAIT, || async {
        check(&api, &agent, "200").await == "AccessOk"
    })
    .await;
    // The earlier clocking is re-published with its person, its status unchanged.
    let again = next_matching(&mut sub, "the re-published clocking", |_, v| {
        v["badge"] == "200" && v["person"] == "E-200"
    })
    .await;
    assert_eq!(
        (again["id"].clone(), again["status"].clone()),
        (first["id"].clone(), json!("UnknownBadge"))
    );

    // A broken file (a half-written edit) changes nothing and is reported.
    std::fs::write(
        dir.path().join("people.csv"),
        "badge,person,groups\n\"unterminated\n",
    )
    .unwrap();
    eventually("the broken file reported", WAIT, || async {
        agent.log().contains("people file changed but is not valid")
    })
    .await;
    assert_eq!(check(&api, &agent, "200").await, "AccessOk");
    assert_eq!(check(&api, &agent, "100").await, "AccessOk");

    // Withdrawing a badge takes effect too.
    people(dir.path(), &[("100", "E-100")]);
    eventually("badge 200 withdrawn", WAIT, || async {
        check(&api, &agent, "200").await == "UnknownBadge"
    })
    .await;
}
