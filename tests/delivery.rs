//! Delivery guarantees end to end: real Mosquitto, the real agent binary, the store on disk.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use badgegate::kit::relay::{Mode, Relay};
use serde_json::Value;
use support::*;

const LONG: Duration = Duration::from_secs(60);

fn id_set(ids: &[String]) -> HashSet<String> {
    ids.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_delivery_with_payload_fields() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    let agent = AgentProc::start(dir.path(), &mosquitto.url());
    let api = Api::new();

    // 23:30 UTC on 1 July is 01:30 the next day in Brussels (UTC+2).
    let (status, body) = api
        .post(
            &agent,
            &clocking("gate-1", "4711", "2026-07-01T23:30:00Z", "in"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["accepted"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);

    let (topic, msg, retained) = sub.next(LONG).await.expect("no clocking delivered");
    assert_eq!(topic, "badgegate/plant-1/clockings/gate-1");
    assert!(!retained);
    assert_eq!(msg["id"], id);
    assert_eq!(msg["site"], "plant-1");
    assert_eq!(msg["terminal"], "gate-1");
    assert_eq!(msg["badge"], "4711");
    assert_eq!(msg["person"], Value::Null);
    assert_eq!(msg["occurred_at"], "2026-07-02T01:30:00+02:00");
    assert_eq!(msg["date"], "2026-07-02");
    assert_eq!(msg["time_of_day_minutes"], 90);
    assert_eq!(msg["direction"], "in");
    assert_eq!(msg["status"], "AccessOk");
    assert_eq!(msg["source"], "http");
    assert!(msg["received_at"].as_str().unwrap().ends_with('Z'));

    // gate-2 keeps New York time; a device-reported status passes through, the old spelling too.
    let mut c = clocking("gate-2", "12", "2026-01-15T14:05:00+01:00", "out");
    c["status"] = "UnknownBadgeNumber".into();
    let (status, _) = api.post(&agent, &c).await;
    assert_eq!(status, 202);
    let (topic, msg, _) = sub.next(LONG).await.expect("no clocking delivered");
    assert_eq!(topic, "badgegate/plant-1/clockings/gate-2");
    assert_eq!(msg["occurred_at"], "2026-01-15T08:05:00-05:00");
    assert_eq!(msg["date"], "2026-01-15");
    assert_eq!(msg["time_of_day_minutes"], 8 * 60 + 5);
    assert_eq!(msg["status"], "UnknownBadge");
    api.wait_drained(&agent, LONG).await;
    assert_eq!(
        api.stored(&agent).await,
        0,
        "delivered clockings leave the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_during_1000_ingests_then_every_clocking_delivered_in_order() {
    let mut mosquitto = Mosquitto::start();
    let uplink = Relay::start(mosquitto.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(dir.path(), &format!("mqtt://{}", uplink.addr()));
    let api = Api::new();

    mosquitto.kill();
    let items = many(1000, "outage");
    let ids = api.post_all(&agent, &items).await;
    assert_eq!(api.pending(&agent).await, 1000);
    let (code, health) = api.get_json(&agent, "/healthz").await;
    assert_eq!(code, 200);
    assert_eq!(health["mqtt"]["connected"], false);
    assert_eq!(health["pending"]["mqtt"], 1000);

    // Bring the broker back, subscribe, and only then let the agent reach it.
    uplink.set_mode(Mode::Cut);
    mosquitto.restart();
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    uplink.set_mode(Mode::Pass);
    let got = sub.collect_ids(&id_set(&ids), LONG).await;
    let got_ids: HashSet<String> = got
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got_ids, id_set(&ids), "set equality on ids");

    // Per-terminal order: first arrivals follow ingest order.
    for terminal in ["gate-1", "gate-2"] {
        let sent: Vec<&String> = ids
            .iter()
            .zip(&items)
            .filter(|(_, c)| c["terminal"] == terminal)
            .map(|(id, _)| id)
            .collect();
        let mut seen = HashSet::new();
        let arrived: Vec<String> = got
            .iter()
            .filter(|v| v["terminal"] == terminal)
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .filter(|id| seen.insert(id.clone()))
            .collect();
        assert_eq!(
            arrived.iter().collect::<Vec<_>>(),
            sent,
            "order on {terminal}"
        );
    }
    api.wait_drained(&agent, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_right_after_202_then_restarted_delivers_everything() {
    let mosquitto = Mosquitto::start();
    let uplink = Relay::start(mosquitto.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start(dir.path(), &format!("mqtt://{}", uplink.addr()));
    let api = Api::new();
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;

    // Half while the uplink works (some in flight when the kill lands), half while it is cut.
    let first = api.post_all(&agent, &many(300, "before")).await;
    uplink.set_mode(Mode::Cut);
    let second = api.post_all(&agent, &many(300, "cut")).await;
    agent.kill9();

    uplink.set_mode(Mode::Pass);
    agent.spawn();
    let mut want = id_set(&first);
    want.extend(second);
    let got = sub.collect_ids(&want, LONG).await;
    let got_ids: HashSet<String> = got
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got_ids, want);
    api.wait_drained(&agent, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_with_publishes_in_flight_redelivers_them() {
    let mut mosquitto = Mosquitto::start();
    let uplink = Relay::start(mosquitto.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(dir.path(), &format!("mqtt://{}", uplink.addr()));
    let api = Api::new();
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;

    api.wait_connected(&agent, LONG).await;
    // The broker receives the publishes but its PUBACKs are held back: all stay in flight.
    uplink.set_mode(Mode::HoldAcks);
    let ids = api.post_all(&agent, &many(40, "inflight")).await;
    let first = sub.collect_ids(&id_set(&ids), LONG).await;
    assert_eq!(first.len(), 40, "the broker got every publish once");
    assert_eq!(
        api.pending(&agent).await,
        40,
        "nothing confirmed without a PUBACK"
    );
    assert_eq!(api.metric(&agent, "badgegate_mqtt_in_flight").await, 40.0);

    // Kill the broker with all 40 unacknowledged, restart it: every one is published again.
    uplink.set_mode(Mode::Cut);
    mosquitto.kill();
    sub.forget_ready();
    mosquitto.restart();
    sub.wait_ready().await;
    uplink.set_mode(Mode::Pass);
    let again = sub.collect_ids(&id_set(&ids), LONG).await;
    assert_eq!(again.len(), 40, "each unacknowledged clocking re-sent once");
    api.wait_drained(&agent, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_clocking_twice_gets_one_id_and_one_delivery() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    let agent = AgentProc::start(dir.path(), &mosquitto.url());
    let api = Api::new();

    let c = clocking("gate-1", "77", "2026-04-01T07:00:00+02:00", "in");
    let (s1, b1) = api.post(&agent, &c).await;
    // The same instant written with another offset is the same clocking.
    let same = clocking("gate-1", "77", "2026-04-01T05:00:00Z", "in");
    let (s2, b2) = api.post(&agent, &same).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(b1["accepted"][0]["id"], b2["accepted"][0]["id"]);
    assert_eq!(b1["accepted"][0]["duplicate"], false);
    assert_eq!(b2["accepted"][0]["duplicate"], true);

    // A sentinel on the same terminal: per-terminal order means a second copy would come first.
    let (_, b3) = api
        .post(
            &agent,
            &clocking("gate-1", "78", "2026-04-01T07:01:00+02:00", "in"),
        )
        .await;
    let (_, m1, _) = sub.next(LONG).await.unwrap();
    let (_, m2, _) = sub.next(LONG).await.unwrap();
    assert_eq!(m1["id"], b1["accepted"][0]["id"]);
    assert_eq!(m2["id"], b3["accepted"][0]["id"]);

    // Still one delivery after it left the store: the id is remembered.
    api.wait_drained(&agent, LONG).await;
    let (_, b4) = api.post(&agent, &c).await;
    assert_eq!(b4["accepted"][0]["duplicate"], true);
    let (_, b5) = api
        .post(
            &agent,
            &clocking("gate-1", "79", "2026-04-01T07:02:00+02:00", "in"),
        )
        .await;
    let (_, m3, _) = sub.next(LONG).await.unwrap();
    assert_eq!(m3["id"], b5["accepted"][0]["id"]);
    assert_eq!(
        api.metric(&agent, "badgegate_clockings_duplicate_total")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_loses_nothing() {
    let mosquitto = Mosquitto::start();
    let uplink = Relay::start(mosquitto.addr()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start(dir.path(), &format!("mqtt://{}", uplink.addr()));
    let api = Api::new();

    // Clockings acknowledged while the uplink is cut are pending when SIGTERM arrives.
    uplink.set_mode(Mode::Cut);
    let sent = api.post_all(&agent, &many(200, "term")).await;
    let exit = agent.terminate();
    assert_eq!(exit.code(), Some(0), "{}", agent.log());

    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    uplink.set_mode(Mode::Pass);
    agent.spawn();
    let got = sub.collect_ids(&id_set(&sent), LONG).await;
    assert!(got.len() >= sent.len());
    api.wait_drained(&agent, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_online_after_connect_offline_on_stop_and_as_last_will() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut status = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/status").await;
    let mut agent = AgentProc::start(dir.path(), &mosquitto.url());
    let (topic, v, _) = status.next(LONG).await.unwrap();
    assert_eq!(
        (topic.as_str(), v),
        ("badgegate/plant-1/status", Value::String("online".into()))
    );

    // A clean stop says offline itself.
    assert_eq!(agent.terminate().code(), Some(0));
    let (_, v, _) = status.next(LONG).await.unwrap();
    assert_eq!(v, "offline");

    // A crash: the broker publishes the last will.
    agent.spawn();
    let (_, v, _) = status.next(LONG).await.unwrap();
    assert_eq!(v, "online", "online again after every connect");
    agent.kill9();
    let (_, v, _) = status.next(LONG).await.unwrap();
    assert_eq!(v, "offline", "the broker publishes the last will");
    // A late subscriber sees the retained status.
    let mut late = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/status").await;
    let (_, v, retained) = late.next(LONG).await.unwrap();
    assert_eq!((v, retained), (Value::String("offline".into()), true));
}
