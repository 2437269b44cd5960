//! Fault injection end to end: links cut between PUBLISH and PUBACK, brokers and agents killed
//! with -9 in loops, a terminal link cut mid-download, clouds answering badly, a full disk. Real
//! Mosquitto, the real agent binary, its store on disk. Every test ends with set equality between
//! what was acknowledged and what was delivered, and prints one summary line:
//! `faults: <name> cycles=N acked=A delivered=D duplicates=X lost=L` (see them with --nocapture).
//!
//! `soak` (ignored; run by scripts/soak) mixes all of it for SOAK_MINUTES.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use badgegate::kit::fakes::protime::{endpoint, FakeProtime, Person, Terminal};
use badgegate::kit::fakes::Fault;
use badgegate::kit::relay::{self, Relay};
use badgegate::kit::simulator::{Simulator, SimulatorConfig};
use badgegate::model::{local_to_instant, ClockingId, Direction};
use badgegate::terminals::anviz::codec::Record;
use chrono::{NaiveDate, NaiveDateTime};
use serde_json::Value;
use support::*;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const LONG: Duration = Duration::from_secs(45);
/// `mqtt.inflight` in the test config.
const WINDOW: u64 = 64;
const CLOCKINGS: &str = "badgegate/plant-1/clockings/#";

// ---------------------------------------------------------------------------------------------
// Helpers: a background collector of deliveries, a concurrent ingest driver, the summary line.

/// Every clocking the subscriber receives, counted by id, in the background.
struct Collector {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    total: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Takes over `sub`'s message stream (its SUBACK stream stays with `sub`).
    fn start(sub: &mut Subscriber) -> Collector {
        let mut rx = std::mem::replace(&mut sub.rx, mpsc::unbounded_channel().1);
        let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (tx, total) = watch::channel(0u64);
        let task = tokio::spawn({
            let counts = counts.clone();
            async move {
                while let Some((_, v, _)) = rx.recv().await {
                    if let Some(id) = v.get("id").and_then(Value::as_str) {
                        *counts.lock().unwrap().entry(id.to_owned()).or_default() += 1;
                        tx.send_modify(|n| *n += 1);
                    }
                }
            }
        });
        Collector {
            counts,
            total,
            task,
        }
    }

    fn total(&self) -> u64 {
        *self.total.borrow()
    }

    fn counts(&self) -> HashMap<String, u32> {
        self.counts.lock().unwrap().clone()
    }

    fn count(&self, id: &str) -> u32 {
        self.counts.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    async fn wait(&self, what: &str, timeout: Duration, cond: impl Fn(&Collector) -> bool) {
        let mut rx = self.total.clone();
        let ok = tokio::time::timeout(timeout, async {
            while !cond(self) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(ok.is_ok() && cond(self), "{what}: not within {timeout:?}");
    }

    /// Waits until this many deliveries (duplicates included) arrived.
    async fn wait_total(&self, n: u64, timeout: Duration) {
        self.wait(&format!("{n} deliveries"), timeout, |c| c.total() >= n)
            .await;
    }

    /// Waits until every id in `want` arrived at least once, or `timeout`; returns how many did
    /// not.
    async fn missing_after(&self, want: &HashSet<String>, timeout: Duration) -> usize {
        let missing = |c: &Collector| {
            let counts = c.counts.lock().unwrap();
            want.iter().filter(|id| !counts.contains_key(*id)).count()
        };
        let mut rx = self.total.clone();
        let _ = tokio::time::timeout(timeout, async {
            while missing(self) > 0 {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        missing(self)
    }

    /// Waits until every id in `want` arrived at least once.
    async fn wait_ids(&self, want: &HashSet<String>, timeout: Duration) {
        let m = self.missing_after(want, timeout).await;
        assert_eq!(
            m,
            0,
            "{m} of {} ids not delivered within {timeout:?}",
            want.len()
        );
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// After the queue drained, one more clocking: Mosquitto keeps one publisher's order towards one
/// subscriber, so once it arrived every earlier (re)delivery has too and the counts are final.
async fn sentinel(api: &Api, agent: &AgentProc, col: &Collector, tag: &str) -> String {
    api.wait_drained(agent, LONG).await;
    let ids = api
        .post_all(
            agent,
            &[clocking("gate-1", tag, "2026-12-31T23:59:59+01:00", "in")],
        )
        .await;
    col.wait_ids(&ids.iter().cloned().collect(), LONG).await;
    ids[0].clone()
}

/// Prints the summary line and returns (delivered, duplicates, lost), excluding `ignore` ids.
fn summary(
    name: &str,
    cycles: usize,
    acked: &HashSet<String>,
    counts: &HashMap<String, u32>,
    ignore: &[String],
) -> (usize, u64, usize) {
    let counts: HashMap<&String, u32> = counts
        .iter()
        .filter(|(id, _)| !ignore.contains(id))
        .map(|(id, n)| (id, *n))
        .collect();
    let delivered = counts.len();
    let duplicates: u64 = counts.values().map(|n| u64::from(n - 1)).sum();
    let lost = acked.iter().filter(|id| !counts.contains_key(id)).count();
    println!(
        "faults: {name} cycles={cycles} acked={} delivered={delivered} duplicates={duplicates} lost={lost}",
        acked.len()
    );
    (delivered, duplicates, lost)
}

/// Concurrent HTTP ingest that survives the agent going away: each worker POSTs batches and
/// retries a batch until it got a 202 (content-derived ids make a retry harmless), so every
/// generated clocking ends up acknowledged.
struct Ingest {
    acked: Arc<Mutex<HashSet<String>>>,
    acked_n: watch::Receiver<u64>,
    generated: Arc<std::sync::atomic::AtomicU64>,
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl Ingest {
    fn start(url: String, workers: usize, batch: usize, tag: &str) -> Ingest {
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (acked_tx, acked_n) = watch::channel(0u64);
        let acked_tx = Arc::new(acked_tx);
        let generated = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let workers = (0..workers)
            .map(|w| {
                let (url, client, acked, acked_tx, generated, stop_rx) = (
                    url.clone(),
                    client.clone(),
                    acked.clone(),
                    acked_tx.clone(),
                    generated.clone(),
                    stop_rx.clone(),
                );
                let tag = format!("{tag}-w{w}");
                tokio::spawn(async move {
                    for b in 0.. {
                        if *stop_rx.borrow() {
                            return;
                        }
                        let body = Value::Array(many(batch, &format!("{tag}-b{b}")));
                        generated.fetch_add(batch as u64, std::sync::atomic::Ordering::Relaxed);
                        loop {
                            let r = client.post(&url).json(&body).send().await;
                            let ok = match r {
                                Ok(r) if r.status().as_u16() == 202 => r.json::<Value>().await.ok(),
                                _ => None,
                            };
                            if let Some(v) = ok {
                                let mut a = acked.lock().unwrap();
                                for x in v["accepted"].as_array().unwrap() {
                                    a.insert(x["id"].as_str().unwrap().to_owned());
                                }
                                acked_tx.send_replace(a.len() as u64);
                                break;
                            }
                            // The agent is restarting or the store refused: pace the retry.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Ingest {
            acked,
            acked_n,
            generated,
            stop,
            workers,
        }
    }

    fn acked_count(&self) -> u64 {
        *self.acked_n.borrow()
    }

    async fn wait_acked(&self, n: u64, timeout: Duration) {
        let mut rx = self.acked_n.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= n)).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "{n} clockings not acknowledged within {timeout:?} (have {})",
            self.acked_count()
        );
    }

    /// Stops after each worker's current batch is acknowledged; returns all acknowledged ids.
    async fn finish(self) -> (u64, HashSet<String>) {
        self.stop.send_replace(true);
        for w in self.workers {
            tokio::time::timeout(LONG, w)
                .await
                .expect("ingest worker did not finish")
                .unwrap();
        }
        let generated = self.generated.load(std::sync::atomic::Ordering::Relaxed);
        let acked = self.acked.lock().unwrap().clone();
        (generated, acked)
    }
}

/// kill -9 and start again on the same store (the spawn waits for the port: keep it off the
/// async workers).
fn restart_agent(agent: &mut AgentProc) {
    tokio::task::block_in_place(|| {
        agent.kill9();
        agent.spawn();
    });
}

fn restart_broker(m: &mut Mosquitto) {
    tokio::task::block_in_place(|| m.restart());
}

fn kill_broker(m: &mut Mosquitto) {
    tokio::task::block_in_place(|| m.kill());
}

/// kill -9 the broker and start it again without the broker's own losses: PUBACKs are held
/// first and the subscriber must have everything the agent saw acknowledged (Mosquitto runs
/// without persistence), and the agent is kept away until the subscriber is back, so the test
/// sees every delivery.
async fn kill_and_restart_broker(
    relay: &Relay,
    col: &Collector,
    mosquitto: &mut Mosquitto,
    sub: &mut Subscriber,
) {
    relay.hold_acks();
    col.wait_ids(&relay.client_acked(), LONG).await;
    kill_broker(mosquitto);
    relay.cut();
    // A SUBACK from before the kill must not count as the re-subscription.
    sub.forget_ready();
    restart_broker(mosquitto);
    sub.wait_ready().await;
    relay.pass();
}

/// The agent's peak resident set (VmHWM) in kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// The relay's own framing.

#[test]
fn relay_frames_mqtt_packets_across_reads() {
    assert_eq!(relay::remaining_length(&[0x30, 0x00]), Some((0, 2)));
    assert_eq!(relay::remaining_length(&[0x30, 0xC1, 0x02]), Some((321, 3)));
    assert_eq!(relay::remaining_length(&[0x30, 0xC1]), None);
    let payload = br#"{"id":"abc"}"#;
    let mut p = vec![0x32, (2 + 3 + 2 + payload.len()) as u8, 0, 3];
    p.extend_from_slice(b"a/b");
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(payload);
    let mut f = relay::Framer::default();
    f.push(&p[..4]);
    assert!(f.next_packet().is_none(), "half a packet is held");
    f.push(&p[4..]);
    f.push(&[0x40, 0x02, 0x12, 0x34]);
    let publish = relay::parse_publish(&f.next_packet().unwrap()).unwrap();
    assert_eq!(publish.topic, "a/b");
    assert_eq!(publish.pkid, Some(0x1234));
    assert_eq!(publish.id.as_deref(), Some("abc"));
    assert_eq!(
        relay::pkid_after_header(&f.next_packet().unwrap()),
        Some(0x1234)
    );
    assert!(f.next_packet().is_none());
}

// ---------------------------------------------------------------------------------------------
// a. The uplink cut between a PUBLISH reaching the broker and its PUBACK reaching the agent.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_cut_between_publish_and_puback_redelivers_and_loses_nothing() {
    const CYCLES: usize = 12;
    let mosquitto = Mosquitto::start();
    let relay = Relay::start(mosquitto.addr())
        .await
        .expect("starting the relay");
    let dir = tempfile::tempdir().unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), CLOCKINGS).await;
    let col = Collector::start(&mut sub);
    let agent = AgentProc::start(dir.path(), &relay.url());
    let api = Api::new();
    api.wait_connected(&agent, LONG).await;

    let mut acked = HashSet::new();
    for cycle in 0..CYCLES {
        let conns = relay.connections();
        relay.cut_after_publish("/clockings/");
        acked.extend(
            api.post_all(&agent, &many(40, &format!("cut{cycle}")))
                .await,
        );
        relay.wait_publish_cuts(cycle + 1, LONG).await.unwrap();
        // The agent noticed and came back through the relay.
        relay.wait_connections_above(conns, LONG).await.unwrap();
    }
    col.wait_ids(&acked, LONG).await;
    let s = sentinel(&api, &agent, &col, "sentinel").await;
    let counts = col.counts();
    let (_, duplicates, lost) = summary("publish_puback_cut", CYCLES, &acked, &counts, &[s]);

    assert_eq!(lost, 0);
    let cuts = relay.publish_cuts();
    assert_eq!(cuts.len(), CYCLES);
    for c in &cuts {
        assert!(
            c.server_acked,
            "the broker acknowledged {c:?} before the cut"
        );
        let id = c.id.as_deref().expect("the cut PUBLISH was a clocking");
        assert!(acked.contains(id));
        assert!(
            col.count(id) >= 2,
            "{id}: the broker had it, its PUBACK was lost, so the agent sent it again"
        );
    }
    assert!(duplicates >= CYCLES as u64);
    assert!(
        duplicates <= CYCLES as u64 * WINDOW,
        "at most one in-flight window re-sent per cut: {duplicates}"
    );
    eventually("every delivered clocking left the store", LONG, || async {
        api.stored(&agent).await == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// b. The broker killed with -9 and restarted, again and again, under heavy concurrent ingest.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_in_a_loop_during_heavy_ingest_loses_nothing() {
    const CYCLES: usize = 6;
    let mut mosquitto = Mosquitto::start();
    let relay = Relay::start(mosquitto.addr())
        .await
        .expect("starting the relay");
    let dir = tempfile::tempdir().unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), CLOCKINGS).await;
    let col = Collector::start(&mut sub);
    let agent = AgentProc::start(dir.path(), &relay.url());
    let api = Api::new();
    let ingest = Ingest::start(agent.url("/v1/clockings"), 3, 50, "heavy");

    for _ in 0..CYCLES {
        // Clockings are flowing through the broker when it dies.
        let before = col.total();
        col.wait_total(before + 300, LONG).await;
        // The broker keeps receiving but its PUBACKs are held: once the subscriber has everything
        // the agent saw acknowledged, whatever the broker loses in the kill is still in flight
        // at the agent (Mosquitto runs without persistence: a message it acknowledged and had
        // not passed on yet would be the broker's loss, not the agent's).
        kill_and_restart_broker(&relay, &col, &mut mosquitto, &mut sub).await;
    }
    ingest.wait_acked(3000, LONG).await;
    let (generated, acked) = ingest.finish().await;
    assert_eq!(
        generated,
        acked.len() as u64,
        "every POST eventually got its 202"
    );
    col.wait_ids(&acked, LONG).await;
    let s = sentinel(&api, &agent, &col, "sentinel").await;
    let (_, duplicates, lost) = summary("broker_kill_loop", CYCLES, &acked, &col.counts(), &[s]);
    assert_eq!(lost, 0);
    assert!(
        duplicates <= CYCLES as u64 * WINDOW,
        "at most one in-flight window re-sent per broker death: {duplicates}"
    );
}

// ---------------------------------------------------------------------------------------------
// c. The agent killed with -9 in a loop while it ingests and forwards, restarted on its store.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_in_a_loop_delivers_every_acknowledged_clocking() {
    const CYCLES: usize = 20;
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), CLOCKINGS).await;
    let col = Collector::start(&mut sub);
    let mut agent = AgentProc::start(dir.path(), &mosquitto.url());
    let api = Api::new();
    let ingest = Ingest::start(agent.url("/v1/clockings"), 2, 50, "crash");

    for _ in 0..CYCLES {
        // Both ingest and forwarding made progress since the last start.
        let (a, d) = (ingest.acked_count(), col.total());
        ingest.wait_acked(a + 100, LONG).await;
        col.wait_total(d + 50, LONG).await;
        restart_agent(&mut agent);
    }
    let (_, acked) = ingest.finish().await;
    col.wait_ids(&acked, LONG).await;
    let s = sentinel(&api, &agent, &col, "sentinel").await;
    let (_, duplicates, lost) = summary("agent_kill_loop", CYCLES, &acked, &col.counts(), &[s]);
    assert_eq!(lost, 0);
    // Re-sent after a crash: the publishes in flight (≤ WINDOW) and those whose PUBACK arrived
    // but whose confirmation was not fsync'd yet (at most 100 ms of PUBACKs; at this test's
    // rate well under a window).
    assert!(
        duplicates <= CYCLES as u64 * 2 * WINDOW,
        "at most two in-flight windows re-sent per crash: {duplicates}"
    );
    eventually("every delivered clocking left the store", LONG, || async {
        api.stored(&agent).await == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// d. An Anviz TC-B link cut in the middle of a backfill.

fn base_time() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2026, 6, 1)
        .unwrap()
        .and_hms_opt(6, 0, 0)
        .unwrap()
}

fn anviz_record(user: u64, secs: i64) -> Record {
    Record {
        user_code: user,
        local_time: base_time() + chrono::TimeDelta::seconds(secs),
        backup_code: 8,
        record_type: (secs % 2) as u8,
        work_code: 0,
    }
}

/// The id the agent gives a record from terminal `terminal` (Europe/Brussels).
fn anviz_id(terminal: &str, r: &Record) -> String {
    let direction = match r.record_type {
        0 => Direction::In,
        1 => Direction::Out,
        _ => Direction::Unknown,
    };
    ClockingId::derive(
        SITE,
        terminal,
        &r.user_code.to_string(),
        local_to_instant(r.local_time, chrono_tz::Europe::Brussels),
        direction,
    )
    .to_string()
}

async fn terminal_health(api: &Api, agent: &AgentProc, terminal: &str) -> Value {
    api.get_json(agent, "/healthz").await.1["terminals"][terminal].clone()
}

/// Records cleared on the device never outnumber clockings the agent stored: read the device
/// first, the agent's (monotonic) counter second.
async fn assert_cleared_only_after_stored(api: &Api, agent: &AgentProc, sim: &Simulator) {
    let cleared = sim.total_count() - sim.new_count();
    let stored = api.metric(agent, "badgegate_clockings_stored_total").await as usize;
    assert!(
        cleared <= stored,
        "{cleared} records cleared on the device but only {stored} stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anviz_link_cut_mid_backfill_then_every_record_delivered_once() {
    const CYCLES: usize = 3;
    const RECORDS: u64 = 4000;
    let mosquitto = Mosquitto::start();
    let sim = Simulator::new(SimulatorConfig {
        device_id: 7,
        ..SimulatorConfig::default()
    });
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| anviz_record(2000 + i % 500, i as i64))
        .collect();
    for r in &records {
        sim.add_record(*r, false);
    }
    let sim_addr = sim.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let relay = Relay::start_raw(sim_addr)
        .await
        .expect("starting the relay");
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/north").await;
    let col = Collector::start(&mut sub);
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start_with(
        dir.path(),
        &mosquitto.url(),
        "",
        &anviz_connect("north", relay.addr(), 7),
    );
    let api = Api::new();

    for cycle in 0..CYCLES {
        // A fresh link is downloading: let it deliver a part, then cut it.
        relay
            .wait_connections_above(cycle as u64, LONG)
            .await
            .unwrap();
        let base = col.total();
        col.wait_total(base + RECORDS / 10, LONG).await;
        relay.cut();
        assert_cleared_only_after_stored(&api, &agent, &sim).await;
        assert!(
            sim.new_count() > 0,
            "cut {cycle} landed before the backfill finished"
        );
        eventually("the agent saw the link drop", LONG, || async {
            terminal_health(&api, &agent, "north").await["connected"] == false
        })
        .await;
        assert_cleared_only_after_stored(&api, &agent, &sim).await;
        relay.pass();
    }
    eventually("every new-flag cleared", LONG, || async {
        assert_cleared_only_after_stored(&api, &agent, &sim).await;
        sim.new_count() == 0
    })
    .await;
    let want: HashSet<String> = records.iter().map(|r| anviz_id("north", r)).collect();
    assert_eq!(want.len(), RECORDS as usize);
    col.wait_ids(&want, LONG).await;
    api.wait_drained(&agent, LONG).await;
    // A sentinel on the same terminal: any re-published record would arrive before it.
    let s = api
        .post_all(
            &agent,
            &[clocking(
                "north",
                "sentinel",
                "2026-06-01T23:00:00+02:00",
                "in",
            )],
        )
        .await;
    col.wait_ids(&s.iter().cloned().collect(), LONG).await;
    let counts = col.counts();
    let (delivered, duplicates, lost) = summary("anviz_link_cut", CYCLES, &want, &counts, &s);
    assert_eq!(lost, 0);
    assert_eq!(
        delivered, RECORDS as usize,
        "nothing but the device's records"
    );
    assert_eq!(duplicates, 0, "re-downloads are deduplicated by id");
    assert!(
        relay.connections() > CYCLES as u64,
        "the agent reconnected after each cut"
    );
    assert_eq!(sim.total_count(), RECORDS as usize);
}

// ---------------------------------------------------------------------------------------------
// e. A cloud that answers with 500s, with garbage, slowly.

async fn protime_pending(api: &Api, agent: &AgentProc) -> u64 {
    let (_, v) = api.get_json(agent, "/v1/queue/stats").await;
    v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "protime")
        .map(|s| s["pending"].as_u64().unwrap())
        .unwrap()
}

async fn protime_error(api: &Api, agent: &AgentProc) -> Option<String> {
    api.get_json(agent, "/healthz").await.1["protime"]["last_error"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protime_failing_with_500_garbage_and_slow_answers_keeps_every_clocking() {
    const N: usize = 20;
    let mosquitto = Mosquitto::start();
    let fake = FakeProtime::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = fake.control();
    let wire = ctl.wire().clone();
    ctl.add_person(Person {
        id: 1,
        badge_number: "4711".into(),
        employee_number: "E1".into(),
        first_name: "Test".into(),
        last_name: "Person".into(),
    });
    for (id, code) in [(10, "gate-1"), (20, "gate-2")] {
        ctl.add_terminal(Terminal {
            id,
            external_code: code.into(),
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = protime_sink(dir.path(), &fake);
    let mut sub = Subscriber::start(mosquitto.addr(), CLOCKINGS).await;
    let col = Collector::start(&mut sub);
    wire.fail_next_on(endpoint::POST_CLOCKINGS, 100_000, Fault::InternalError);
    let agent = AgentProc::start_with(dir.path(), &mosquitto.url(), "", &sink);
    let api = Api::new();

    let items: Vec<Value> = (0..N)
        .map(|i| {
            clocking(
                if i % 2 == 0 { "gate-1" } else { "gate-2" },
                "4711",
                &format!("2026-07-03T09:{i:02}:00+02:00"),
                "in",
            )
        })
        .collect();
    let acked: HashSet<String> = api.post_all(&agent, &items).await.into_iter().collect();

    // 1. HTTP 500: reported, kept; the MQTT sink is not held up by the other sink.
    eventually("Protime's 500 in health", LONG, || async {
        protime_error(&api, &agent).await.is_some()
    })
    .await;
    col.wait_ids(&acked, LONG).await;
    assert_eq!(protime_pending(&api, &agent).await, N as u64);
    assert!(ctl.clockings().is_empty());

    // 2. HTTP 200 with a body that is not JSON: not taken for a success.
    wire.clear_faults();
    wire.fail_next_on(endpoint::POST_CLOCKINGS, 100_000, Fault::GarbageBody);
    let before = wire.count(endpoint::POST_CLOCKINGS);
    assert!(
        wire.wait_for(endpoint::POST_CLOCKINGS, before + 2, LONG)
            .await,
        "the agent retried against the garbage"
    );
    assert!(protime_error(&api, &agent).await.is_some());
    assert_eq!(protime_pending(&api, &agent).await, N as u64);
    assert!(ctl.clockings().is_empty(), "garbage answers stored nothing");

    // 3. Slow answers (under the client's timeout): progress, nothing duplicated.
    wire.clear_faults();
    wire.set_delay(Duration::from_millis(700));
    eventually("a slow delivery went through", LONG, || async {
        protime_pending(&api, &agent).await < N as u64
    })
    .await;
    assert!(protime_pending(&api, &agent).await > 0, "still slow");

    // 4. Healthy again: everything delivered exactly once, the error cleared.
    wire.set_delay(Duration::ZERO);
    eventually("Protime drained", LONG, || async {
        protime_pending(&api, &agent).await == 0
    })
    .await;
    eventually("Protime error cleared in health", LONG, || async {
        protime_error(&api, &agent).await.is_none()
    })
    .await;
    let stored = ctl.clockings();
    let unique: HashSet<(i64, String, i64)> = stored
        .iter()
        .map(|c| {
            (
                c.person_id,
                c.date.to_string(),
                i64::from(c.time_of_day_in_minutes),
            )
        })
        .collect();
    let dupes = (stored.len() - unique.len()) as u64;
    println!(
        "faults: protime_500_garbage_slow cycles=3 acked={} delivered={} duplicates={dupes} lost={}",
        acked.len(),
        unique.len(),
        N.saturating_sub(unique.len())
    );
    assert_eq!(unique.len(), N, "every clocking reached Protime");
    assert_eq!(dupes, 0, "none twice");
    api.wait_drained(&agent, LONG).await;
}

// ---------------------------------------------------------------------------------------------
// f. The disk under the store really full (a small tmpfs), then space freed.

/// A tmpfs mounted on `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remounting the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_ingest_and_terminal_records_until_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tmpfs = match Tmpfs::mount(&data, "2m") {
        Ok(t) => t,
        Err(reason) => {
            println!("faults: disk_full skipped: cannot mount a tmpfs ({reason})");
            return;
        }
    };
    let mosquitto = Mosquitto::start();
    let relay = Relay::start(mosquitto.addr())
        .await
        .expect("starting the relay");
    let sim = Simulator::new(SimulatorConfig {
        device_id: 5,
        ..SimulatorConfig::default()
    });
    let sim_addr = sim.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), CLOCKINGS).await;
    let col = Collector::start(&mut sub);
    let mut agent = AgentProc::start_with(
        dir.path(),
        &relay.url(),
        "",
        &anviz_connect("north", sim_addr, 5),
    );
    let api = Api::new();
    sim.wait_for_links(1).await;

    // Fill the disk while the uplink is cut.
    relay.cut();
    let mut acked = HashSet::new();
    let mut full = None;
    for i in 0..400 {
        let (s, b) = api
            .post(&agent, &Value::Array(many(200, &format!("fill{i}"))))
            .await;
        match s {
            202 => {
                for a in b["accepted"].as_array().unwrap() {
                    acked.insert(a["id"].as_str().unwrap().to_owned());
                }
            }
            507 => {
                full = Some(b);
                break;
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    let body = full.expect("the 2 MB disk never filled up");
    assert_eq!(body["error"]["code"], "store_full", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("os error 28") || msg.to_lowercase().contains("space"),
        "the filesystem, not the configured cap, is full: {msg}"
    );
    assert_eq!(api.stored(&agent).await, acked.len() as u64);
    // A small write may still fit (the failed transaction's pages are freed again): take the
    // rest of the disk with a filler file, so that nothing fits.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
    }
    // The store file still has free pages inside, and every reopen after a failed commit hands
    // the failed transaction's pages back: single clockings fit until that slack is used up,
    // i.e. until several in a row are refused.
    let mut refused_in_a_row = 0;
    for i in 0..5000 {
        let (s, b) = api
            .post(
                &agent,
                &clocking(
                    "gate-1",
                    &format!("single{i}"),
                    "2026-03-01T08:00:00Z",
                    "in",
                ),
            )
            .await;
        match s {
            202 => {
                refused_in_a_row = 0;
                acked.insert(b["accepted"][0]["id"].as_str().unwrap().to_owned());
            }
            507 => refused_in_a_row += 1,
            other => panic!("unexpected {other}: {b}"),
        }
        if refused_in_a_row == 5 {
            break;
        }
    }
    let refused_single = refused_in_a_row == 5;
    assert!(
        refused_single,
        "even a single clocking is refused once the disk is full"
    );

    // A terminal's records are not acknowledged while nothing can be stored.
    let refused = api.metric(&agent, "badgegate_store_full_total").await;
    let records: Vec<Record> = (0..300).map(|i| anviz_record(3000 + i, i as i64)).collect();
    for r in &records {
        sim.add_record(*r, false);
    }
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let h = terminal_health(&api, &agent, "north").await;
        if h["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("store"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the terminal did not report the store refusing its records: {h}, device {:?}, log {}",
            sim.stats(),
            agent
                .log()
                .lines()
                .filter(|l| l.contains("anviz") || l.contains("store"))
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api.metric(&agent, "badgegate_store_full_total").await > refused);
    // Only what the agent stored is cleared on the device; the rest stays there.
    let cleared = sim.total_count() - sim.new_count();
    let h = terminal_health(&api, &agent, "north").await;
    let stored_from_device = h["backfilled_records"].as_u64().unwrap() as usize;
    assert!(cleared <= stored_from_device, "{cleared} cleared, {h}");
    assert!(
        sim.new_count() > 0,
        "records the store refused stay on the device: {h}"
    );
    assert!(
        h["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("full"),
        "{h}"
    );

    // Space comes back: ingest and the terminal resume without a restart, then the uplink.
    std::fs::remove_file(&filler).unwrap();
    tmpfs.resize("64m");
    let deadline = tokio::time::Instant::now() + LONG;
    let after = loop {
        let (s, b) = api
            .post(
                &agent,
                &clocking("gate-1", "after", "2026-03-01T08:00:00Z", "in"),
            )
            .await;
        if s == 202 {
            break b["accepted"][0]["id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest not accepted again within {LONG:?}: {s} {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    acked.insert(after);
    eventually(
        "the terminal's records stored and cleared",
        LONG,
        || async { sim.new_count() == 0 },
    )
    .await;
    let want_device: HashSet<String> = records.iter().map(|r| anviz_id("north", r)).collect();
    relay.pass();
    let mut want = acked.clone();
    want.extend(want_device.iter().cloned());
    col.wait_ids(&want, LONG).await;
    let s = sentinel(&api, &agent, &col, "sentinel").await;
    let (_, _, lost) = summary("disk_full", 1, &want, &col.counts(), &[s]);
    assert_eq!(lost, 0);
    agent.kill9();
    drop(tmpfs);
}

// ---------------------------------------------------------------------------------------------
// The soak: SOAK_MINUTES (default 1) of HTTP ingest and Anviz records (real-time pushes and
// backfill) while the broker is killed, the uplink cut and the agent killed -9 in turn. Run by
// scripts/soak; the pauses between faults only pace the run, every check waits for events.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; run by scripts/soak"]
async fn soak() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1.0);
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let mut mosquitto = Mosquitto::start();
    let relay = Relay::start(mosquitto.addr())
        .await
        .expect("starting the relay");
    let sim = Simulator::new(SimulatorConfig {
        device_id: 9,
        ..SimulatorConfig::default()
    });
    let sim_addr = sim.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut sub = Subscriber::start(mosquitto.addr(), CLOCKINGS).await;
    let col = Collector::start(&mut sub);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start_with(
        dir.path(),
        &relay.url(),
        "",
        &anviz_connect("north", sim_addr, 9),
    );
    let api = Api::new();
    let ingest = Ingest::start(agent.url("/v1/clockings"), 2, 20, "soak");

    // The terminal: a record every 20 ms, every other one pushed in real time.
    let (stop_device, mut device_stopped) = watch::channel(false);
    let device = tokio::spawn({
        let sim = sim.clone();
        async move {
            let mut records = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for i in 0u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = device_stopped.changed() => break,
                }
                let r = anviz_record(100_000 + i, i as i64);
                sim.add_record(r, i % 2 == 0);
                records.push(r);
            }
            records
        }
    });

    let started = tokio::time::Instant::now();
    let mut peak_kb = 0u64;
    let mut faults = [0usize; 3];
    let mut i = 0usize;
    while started.elapsed() < run_for {
        // Let traffic flow between faults.
        tokio::time::sleep(Duration::from_secs(3)).await;
        match i % 3 {
            0 => {
                kill_and_restart_broker(&relay, &col, &mut mosquitto, &mut sub).await;
            }
            1 => {
                relay.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                relay.pass();
            }
            _ => {
                if let Some(kb) = agent.pid().and_then(peak_rss_kb) {
                    peak_kb = peak_kb.max(kb);
                }
                restart_agent(&mut agent);
            }
        }
        faults[i % 3] += 1;
        i += 1;
    }
    let (http_generated, mut acked) = ingest.finish().await;
    stop_device.send_replace(true);
    let records = device.await.unwrap();
    let device_cleared = tokio::time::timeout(Duration::from_secs(120), async {
        while sim.new_count() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok();
    // A device record is acknowledged once its new-flag was cleared.
    let device_ids: HashSet<String> = records.iter().map(|r| anviz_id("north", r)).collect();
    if device_cleared {
        acked.extend(device_ids.iter().cloned());
    }
    let missing = col.missing_after(&acked, Duration::from_secs(300)).await;
    let s = if missing == 0 {
        vec![sentinel(&api, &agent, &col, "sentinel").await]
    } else {
        Vec::new()
    };
    if let Some(kb) = agent.pid().and_then(peak_rss_kb) {
        peak_kb = peak_kb.max(kb);
    }
    let counts = col.counts();
    let (delivered, duplicates, lost) = summary("soak", i, &acked, &counts, &s);
    println!(
        "soak: minutes={minutes} faults={i} (broker_kills={} uplink_cuts={} agent_kills={}) generated={} acknowledged={} delivered={delivered} duplicated={duplicates} lost={lost} device_cleared={device_cleared} peak_rss_kb={peak_kb}",
        faults[0],
        faults[1],
        faults[2],
        http_generated + records.len() as u64,
        acked.len(),
    );
    if lost > 0 {
        // Triage: from the terminal or HTTP, and did the broker / the agent see a PUBACK for it?
        let (server, client) = (relay.server_acked(), relay.client_acked());
        for id in acked.iter().filter(|id| !counts.contains_key(*id)).take(20) {
            println!(
                "soak: lost {id} from_device={} broker_acked={} agent_got_puback={}",
                device_ids.contains(id),
                server.contains(id),
                client.contains(id)
            );
        }
    }
    assert!(device_cleared, "the terminal still has uncleared records");
    assert_eq!(lost, 0, "acknowledged clockings were not delivered");
}
