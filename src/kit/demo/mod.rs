//! `badgegate demo`: the whole product on loopback with nothing installed.
//!
//! An embedded MQTT broker (rumqttd, persistent sessions), the agent (real store on disk in a temporary directory, real HTTP
//! ingest, real MQTT sink), two simulated Anviz terminals speaking the real TC-B protocol over
//! TCP (one in each connection mode) and an HTTP kiosk, a subscriber counting what arrives, and
//! an uplink that is cut for a while and then restored. Ends with a one-screen summary and one
//! machine-greppable `demo result:` line (scripts/demo-repeat reads it); exits non-zero if any
//! stored clocking was not delivered or the retained occupancy disagrees with the agent's API.

pub mod broker;
pub mod clouds;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use rand::Rng;
use reqwest::Method;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::app::Agent;
use crate::config::Config;
use crate::kit::fakes::protime::FakeProtime;
use crate::kit::relay::Relay;
use crate::kit::simulator::{Simulator, SimulatorConfig};
use crate::store::SinkId;
use crate::terminals::anviz::codec::Record;
use broker::Broker;
use clouds::DemoClouds;

const SITE: &str = "demo";
/// Clockings per second per simulated TC-B terminal.
const RATE: u64 = 10;
/// Clockings per second from the HTTP kiosk.
const KIOSK_RATE: u64 = 2;

fn demo_config(
    data_dir: &std::path::Path,
    mqtt: SocketAddr,
    north: SocketAddr,
    south_listen: SocketAddr,
    protime: &FakeProtime,
    sources: &str,
) -> anyhow::Result<Config> {
    std::fs::write(
        data_dir.join("protime-secret"),
        crate::kit::fakes::protime::DEFAULT_CLIENT_SECRET,
    )
    .context("writing the demo's Protime secret")?;
    write_people(data_dir)?;
    let text = format!(
        r#"
[agent]
site = "{SITE}"
data_dir = "{}"
timezone = "Europe/Brussels"

[http]
listen = "127.0.0.1:0"

[mqtt]
url = "mqtt://{mqtt}"
client_id = "badgegate-demo"
reconnect_min_ms = 200
reconnect_max_ms = 1000

# The local access engine: hard anti-passback into production, with the badge map of
# people.csv (badge 1399 is in nobody's hands: UnknownBadge).
[access]
antipassback = "hard"
people_file = "people.csv"
occupancy_interval_ms = 250

[[zones]]
name = "production"
exit_status = "OutZone"

# A TC-B terminal the agent connects to.
[[terminals]]
id = "gate-north"
kind = "anviz"
address = "{north}"
device_id = 1
zone_from = "outside"
zone_to = "production"
keepalive_secs = 2
backfill_interval_secs = 2

# A TC-B terminal that connects to the agent (needed for real-time push through NAT/firewalls).
[[terminals]]
id = "gate-south"
kind = "anviz"
listen = "{south_listen}"
device_id = 2
zone_from = "outside"
zone_to = "production"
keepalive_secs = 2
backfill_interval_secs = 2

# A terminal that pushes over HTTP.
[[terminals]]
id = "kiosk"
kind = "http"

# A turnstile into production that asks and pushes over HTTP.
[[terminals]]
id = "turnstile"
kind = "http"
zone_from = "outside"
zone_to = "production"

# Every clocking also goes to (a faithful fake of) Protime.
[sinks.protime]
base_url = "{}"
token_url = "{}"
# The fake listens on loopback, without TLS.
allow_insecure_http = true
client_id = "{}"
client_secret_file = "protime-secret"
timezone = "Europe/Brussels"
# ... and Protime's own access clockings come back, mirrored (never posted back).
mirror = true
mirror_interval_secs = 1
# Retry soon after the outage, like the MQTT link's reconnect_max_ms above.
retry_max_secs = 2
{sources}"#,
        data_dir.display(),
        protime.base_url(),
        protime.token_url(),
        crate::kit::fakes::protime::DEFAULT_CLIENT_ID,
    );
    Config::parse(&text, data_dir).map_err(|e| anyhow::anyhow!("demo config: {e}"))
}

/// The demo's badge map: the workers of the TC-B terminals and the kiosk's visitors. Badge 1399
/// is left out on purpose (its clockings are UnknownBadge, and Protime rejects them too).
fn write_people(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut csv = String::from("badge,person,groups\n");
    for badge in 1000..1399 {
        csv.push_str(&format!("{badge},W-{badge},production\n"));
    }
    for badge in 5000..5050 {
        csv.push_str(&format!("{badge},V-{badge},visitors\n"));
    }
    std::fs::write(dir.join("people.csv"), csv).context("writing the demo's people.csv")
}

/// What the subscriber saw.
#[derive(Default)]
struct Arrivals {
    ids: Mutex<HashSet<String>>,
    redelivered: AtomicU64,
    bad_payloads: AtomicU64,
    /// First deliveries by status.
    statuses: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The last occupancy of production seen on MQTT (retained or live).
    occupancy: watch::Sender<Option<u64>>,
    /// Connections whose CONNACK resumed the subscriber's session.
    sessions_resumed: AtomicU64,
    /// Connections whose CONNACK had no session (the first, or the broker forgot it): the
    /// subscriber subscribed again, and anything published in between would show as undelivered.
    sessions_new: AtomicU64,
}

/// The largest MQTT packet the demo's broker and subscriber accept (the agent's own limit).
const MAX_PACKET: usize = 8 * 1024 * 1024;

/// How long the end of the demo waits for the retained occupancy to match the agent's API.
const OCCUPANCY_WAIT: Duration = Duration::from_secs(10);

/// The demo's client for the agent's local HTTP API: plain HTTP on loopback, never via a proxy.
fn http_client() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default rustls provider; the agent's one serves (ring).
    crate::clouds::http::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .context("building the demo's HTTP client")
}

/// One call to the agent's API: (status code, body).
async fn call(
    http: &reqwest::Client,
    api: SocketAddr,
    method: Method,
    path: &str,
    json_body: Option<Vec<u8>>,
) -> reqwest::Result<(u16, String)> {
    let mut req = http.request(method, format!("http://{api}{path}"));
    if let Some(body) = json_body {
        req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
    }
    let resp = req.send().await?;
    let code = resp.status().as_u16();
    Ok((code, resp.text().await?))
}

pub async fn run(duration: Duration) -> anyhow::Result<()> {
    let duration = duration.max(Duration::from_secs(6));
    let dir = tempfile::tempdir().context("creating a temporary data directory")?;
    let http = http_client()?;
    let broker = Broker::start()
        .await
        .context("starting the embedded MQTT broker")?;
    let uplink = Relay::start(broker.local_addr())
        .await
        .context("starting the uplink relay")?;
    let north = Simulator::new(SimulatorConfig {
        device_id: 1,
        ..SimulatorConfig::default()
    });
    let north_addr = north
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("starting the simulated terminal gate-north")?;
    let south_listen = free_loopback_addr().context("finding a port for gate-south")?;
    let protime = FakeProtime::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("starting the fake Protime")?;
    seed_protime(&protime);
    let clouds = DemoClouds::start(&protime).await?;
    let config = demo_config(
        dir.path(),
        uplink.addr(),
        north_addr,
        south_listen,
        &protime,
        &clouds.config(dir.path())?,
    )?;
    let agent = Agent::start(config).await.context("starting the agent")?;
    let api = agent.http_addr();
    let south = Simulator::new(SimulatorConfig {
        device_id: 2,
        ..SimulatorConfig::default()
    });
    south.connect_to(south_listen);

    let arrivals = Arc::new(Arrivals::default());
    let subscriber = subscribe(broker.local_addr(), arrivals.clone()).await?;

    println!("badgegate demo — everything on loopback, nothing installed");
    println!(
        "  broker {}   agent API http://{}   store {}",
        broker.local_addr(),
        api,
        agent.store().path().display()
    );
    println!(
        "  TC-B terminals gate-north (agent connects to {north_addr}) and gate-south (connects to the agent at {south_listen}),"
    );
    println!(
        "  {RATE} clockings/s each, real-time push; HTTP kiosk at {KIOSK_RATE}/s, re-sending now and then"
    );
    println!(
        "  clouds: CrossChex devices upload records, an Aktion C4 door reports passages, Protime records access clockings"
    );
    println!(
        "  the uplink to the broker and the clouds is cut from {}s to {}s\n",
        duration.as_secs() / 3,
        2 * duration.as_secs() / 3
    );

    let generated = Arc::new(AtomicU64::new(0));
    access_scene(&http, api, &generated).await?;
    let reposted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut terminals = vec![
        tokio::spawn(simulate_tcb(
            north.clone(),
            0,
            generated.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(simulate_tcb(
            south.clone(),
            1,
            generated.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(simulate_kiosk(
            http.clone(),
            api,
            generated.clone(),
            reposted.clone(),
            refused.clone(),
            stop_rx.clone(),
        )),
    ];
    terminals.extend(clouds.generate(&protime, stop_rx.clone()));

    let start = Instant::now();
    let outage_at = duration / 3;
    let restore_at = 2 * duration / 3;
    let mut max_backlog = 0u64;
    let mut restored_at = None;
    let mut drained_in = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now() - Duration::from_secs(1);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        if elapsed >= outage_at && elapsed < restore_at && uplink.is_up() {
            uplink.set_up(false);
            protime.control().wire().set_outage(true);
            clouds.set_outage(true);
            println!("  -- uplink cut: clockings keep coming and are buffered on disk");
        }
        if elapsed >= restore_at && !uplink.is_up() {
            // What an operator would see with `badgegate status` at the worst of the outage.
            if let Ok((_, body)) = call(&http, api, Method::GET, "/healthz", None).await {
                if let Ok(h) = serde_json::from_str::<crate::health::Health>(&body) {
                    println!("\n  -- `badgegate status` now:");
                    for line in crate::status::render(&h, &[]).lines() {
                        println!("  {line}");
                    }
                    println!();
                }
            }
            uplink.set_up(true);
            protime.control().wire().set_outage(false);
            clouds.set_outage(false);
            stop_tx.send_replace(true);
            restored_at = Some(Instant::now());
            println!("  -- uplink restored, terminals stopped: draining the backlog");
        }
        let (backlog, protime_backlog) = pending(&agent).await;
        max_backlog = max_backlog.max(backlog);
        let stored = agent.metrics().stored.load(Ordering::Relaxed);
        let delivered = arrivals.ids.lock().map(|s| s.len() as u64).unwrap_or(0);
        let on_devices = north.new_count() + south.new_count();
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let inside: usize = agent
                .access()
                .zone_counts(Utc::now())
                .iter()
                .map(|(_, n)| n)
                .sum();
            println!(
                "  t={:>3}s  generated {:>5}  on terminals {:>4}  stored {:>5}  delivered {:>5}  backlog {:>5}  inside {:>3}  uplink {}",
                elapsed.as_secs(),
                generated.load(Ordering::Relaxed),
                on_devices,
                stored,
                delivered,
                backlog,
                inside,
                if uplink.is_up() { "up" } else { "DOWN" }
            );
        }
        if let Some(at) = restored_at {
            if backlog == 0
                && protime_backlog == 0
                && delivered >= stored
                && on_devices == 0
                && clouds.caught_up(&agent)
            {
                drained_in = Some(at.elapsed());
                break;
            }
            if elapsed > duration + Duration::from_secs(30) {
                break;
            }
        }
    }
    for t in terminals {
        let _ = t.await;
    }
    // The retained occupancy lags the agent by up to one publish interval (and a backlog drain):
    // wait for it to reach the API's count before comparing them.
    let (inside_at_end, retained) = settle_occupancy(&agent, &arrivals).await;

    let stored = agent.metrics().stored.load(Ordering::Relaxed);
    let ingest_duplicates = agent.metrics().duplicates.load(Ordering::Relaxed);
    let delivered = arrivals.ids.lock().map(|s| s.len() as u64).unwrap_or(0);
    let redelivered = arrivals.redelivered.load(Ordering::Relaxed);
    let bad = arrivals.bad_payloads.load(Ordering::Relaxed);
    let device_backlog = north.new_count() + south.new_count();
    let pulled = DemoClouds::pulled(&agent);
    let mirrored = pulled[2];
    let from_clouds = clouds.generated.clone();
    let in_protime = protime.control().clockings().len();
    let dead_letters = {
        let store = agent.store().clone();
        tokio::task::spawn_blocking(move || store.stats())
            .await
            .ok()
            .and_then(|r| r.ok())
            .map_or(0, |s| s.sinks.iter().map(|k| k.dead_letters).sum::<u64>())
    };
    agent.shutdown().await;
    subscriber.abort();
    north.stop().await;
    south.stop().await;
    protime.shutdown().await;
    clouds.shutdown().await;
    // The broker is not stopped: rumqttd has no shutdown; its threads end with the process.
    drop(uplink);

    let generated = generated.load(Ordering::Relaxed);
    println!();
    println!("  ┌─ summary ───────────────────────────────────────────────┐");
    println!("  │ generated by the terminals and kiosk  {generated:>16} │");
    println!(
        "  │ duplicates removed at ingest          {:>16} │",
        ingest_duplicates
    );
    println!("  │ stored durably                        {:>16} │", stored);
    println!(
        "  │ delivered to the MQTT subscriber      {:>16} │",
        delivered
    );
    println!(
        "  │ delivered twice (at-least-once)       {:>16} │",
        redelivered
    );
    println!(
        "  │ subscriber sessions resumed / new     {:>16} │",
        format!(
            "{} / {}",
            arrivals.sessions_resumed.load(Ordering::Relaxed),
            arrivals.sessions_new.load(Ordering::Relaxed)
        )
    );
    println!(
        "  │ delivered to Protime (POST /clockings)  {:>14} │",
        in_protime
    );
    println!(
        "  │ rejected by Protime → dead letters    {:>16} │",
        dead_letters
    );
    print_sources(&from_clouds, pulled);
    println!(
        "  │ max backlog during the outage         {:>16} │",
        max_backlog
    );
    println!(
        "  │ drain time after the uplink returned  {:>16} │",
        drained_in.map_or_else(
            || "did not drain".to_owned(),
            |d| format!("{:.2} s", d.as_secs_f64())
        )
    );
    println!(
        "  │ refused by the agent                  {:>16} │",
        refused.load(Ordering::Relaxed)
    );
    println!(
        "  │ unacknowledged on the terminals       {:>16} │",
        device_backlog
    );
    println!("  ├─ access engine (statuses as delivered on MQTT) ─────────┤");
    let statuses = arrivals
        .statuses
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    for (status, n) in &statuses {
        println!("  │ {status:<37} {n:>16} │");
    }
    let retained_text = retained.map_or_else(|| "-".to_owned(), |n| n.to_string());
    println!("  │ in production now (agent API)         {inside_at_end:>16} │");
    println!("  │ in production (retained MQTT topic)   {retained_text:>16} │");
    println!("  └─────────────────────────────────────────────────────────┘");

    let undelivered = stored.saturating_sub(delivered);
    let failure = if bad > 0 {
        Some(format!("{bad} payloads did not match the contract"))
    } else if in_protime as u64 + dead_letters != stored - mirrored {
        // Mirrored clockings came from Protime: they are not sent back.
        Some(format!(
            "Protime holds {in_protime} clockings and {dead_letters} were dead-lettered, but {} were stored for it",
            stored - mirrored
        ))
    } else if !from_clouds.pulled_by(pulled) {
        Some(format!(
            "not everything the clouds generated was pulled: {pulled:?}"
        ))
    } else if let Some(wanted) = ["AntiPassbackError", "UnknownBadge"]
        .into_iter()
        .find(|w| !statuses.contains_key(*w))
    {
        Some(format!("the access engine produced no {wanted}"))
    } else if delivered != stored || drained_in.is_none() {
        Some(format!("{undelivered} stored clockings were not delivered"))
    } else if retained != Some(inside_at_end) {
        Some(format!(
            "the retained occupancy ({retained_text}) disagrees with the agent's API ({inside_at_end}) after waiting {OCCUPANCY_WAIT:?}"
        ))
    } else {
        None
    };
    // One line for scripts (scripts/demo-repeat): key=value, no spaces in values.
    println!(
        "demo result: {} generated={generated} stored={stored} delivered={delivered} undelivered={undelivered} occupancy_api={inside_at_end} occupancy_retained={retained_text} drain_s={}",
        if failure.is_none() { "ok" } else { "FAILED" },
        drained_in.map_or_else(|| "-".to_owned(), |d| format!("{:.2}", d.as_secs_f64())),
    );
    if let Some(reason) = failure {
        bail!(reason);
    }
    println!("  every stored clocking was delivered; none lost.");
    Ok(())
}

/// Production's occupancy from the agent (what its API answers) and the last one seen on the
/// retained MQTT topic, once they agree or after [`OCCUPANCY_WAIT`]. Woken by every occupancy
/// that arrives; the API's count is read again each time (and on a short tick, since presence
/// can also change by itself).
async fn settle_occupancy(agent: &Agent, arrivals: &Arrivals) -> (u64, Option<u64>) {
    let api_count = || {
        agent
            .access()
            .zone_counts(Utc::now())
            .first()
            .map_or(0, |(_, n)| *n as u64)
    };
    let mut seen = arrivals.occupancy.subscribe();
    let deadline = tokio::time::Instant::now() + OCCUPANCY_WAIT;
    loop {
        let api = api_count();
        let retained = *seen.borrow_and_update();
        if retained == Some(api) {
            return (api, retained);
        }
        tokio::select! {
            changed = seen.changed() => if changed.is_err() { return (api, retained) },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = tokio::time::sleep_until(deadline) => return (api_count(), *seen.borrow()),
        }
    }
}

/// The summary's sources section: per cloud, what it generated and what the agent stored.
fn print_sources(g: &clouds::Generated, [crosschex, aktion, protime]: [u64; 3]) {
    for (label, generated, pulled) in [
        ("pulled from CrossChex Cloud", &g.crosschex, crosschex),
        ("pulled from Aktion (C4 passages)", &g.aktion, aktion),
        ("mirrored from Protime (access)", &g.protime, protime),
    ] {
        let counts = format!("{pulled} of {}", generated.load(Ordering::Relaxed));
        println!("  │ {label:<38}{counts:>16} │");
    }
}

/// The access engine at the turnstile, with no cloud: an access check, a passage, the same badge
/// again (anti-passback), and a badge nobody holds.
async fn access_scene(
    http: &reqwest::Client,
    api: SocketAddr,
    generated: &AtomicU64,
) -> anyhow::Result<()> {
    let post = |path: &'static str, body: serde_json::Value| async move {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let (code, text) = call(http, api, Method::POST, path, Some(bytes))
            .await
            .with_context(|| format!("POST {path}"))?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if !(200..300).contains(&code) {
            bail!("POST {path} answered {code}: {text}");
        }
        Ok::<_, anyhow::Error>(v)
    };
    let now = Utc::now();
    let clock = |badge: &str, secs: i64| {
        serde_json::json!({
            "terminal": "turnstile",
            "badge": badge,
            "occurred_at": (now + chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "direction": "in",
        })
    };
    let status = |v: &serde_json::Value| {
        v["accepted"][0]["status"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    let check = post(
        "/v1/access/check",
        serde_json::json!({"terminal": "turnstile", "badge": "1001", "direction": "in"}),
    )
    .await?;
    let first = post("/v1/clockings", clock("1001", 0)).await?;
    let again = post("/v1/clockings", clock("1001", 1)).await?;
    let unknown = post("/v1/clockings", clock("1399", 2)).await?;
    generated.fetch_add(3, Ordering::Relaxed);
    println!(
        "  access at the turnstile (no cloud needed): may 1001 pass? {} ({}); 1001 passes: {}; 1001 again: {}; badge 1399: {}\n",
        check["status"].as_str().unwrap_or("?"),
        check["reason"].as_str().unwrap_or(""),
        status(&first),
        status(&again),
        status(&unknown),
    );
    Ok(())
}

/// Clockings not yet confirmed by (MQTT, Protime).
async fn pending(agent: &Agent) -> (u64, u64) {
    let store = agent.store().clone();
    let stats = tokio::task::spawn_blocking(move || store.stats())
        .await
        .ok()
        .and_then(|r| r.ok());
    let of = |sink: SinkId| {
        stats
            .as_ref()
            .and_then(|s| {
                s.sinks
                    .iter()
                    .find(|k| k.sink == sink.as_str())
                    .map(|k| k.pending)
            })
            .unwrap_or(0)
    };
    (of(SinkId::Mqtt), of(SinkId::Protime))
}

/// The people and terminals the demo's Protime tenant knows. Badge 1399 is left out on purpose:
/// its clockings are rejected and show up as dead letters.
fn seed_protime(protime: &FakeProtime) {
    use crate::kit::fakes::protime::{Person, Terminal};
    let ctl = protime.control();
    for badge in (1000..1399).chain(5000..5050) {
        ctl.add_person(Person {
            id: badge,
            badge_number: badge.to_string(),
            employee_number: format!("E{badge}"),
            first_name: "Demo".into(),
            last_name: format!("Worker {badge}"),
        });
    }
    for (id, code) in [
        (1, "gate-north"),
        (2, "gate-south"),
        (3, "kiosk"),
        (4, "turnstile"),
    ] {
        ctl.add_terminal(Terminal {
            id,
            external_code: code.into(),
        });
    }
}

/// A TC-B terminal: a badge presented every 1/RATE s, stored on the device and pushed in real
/// time. The agent commits each record and then clears its new-flag on the device.
async fn simulate_tcb(
    sim: Simulator,
    seed: u64,
    generated: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        n += 1;
        let local = Utc::now()
            .with_timezone(&chrono_tz::Europe::Brussels)
            .naive_local();
        let record = Record {
            user_code: 1000 + (seed * 7919 + n * 7) % 400,
            local_time: local,
            backup_code: 8,
            record_type: (n % 2) as u8,
            work_code: 0,
        };
        sim.add_record(record, true);
        generated.fetch_add(1, Ordering::Relaxed);
    }
}

/// A terminal pushing clockings to the ingest API; now and then it re-sends one (as terminals do
/// when they miss an answer), which the store deduplicates.
async fn simulate_kiosk(
    http: reqwest::Client,
    api: SocketAddr,
    generated: Arc<AtomicU64>,
    reposted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / KIOSK_RATE));
    let mut last: Option<Vec<u8>> = None;
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (body, fresh) = match &last {
            Some(prev) if rand::rng().random_ratio(1, 5) => (prev.clone(), false),
            _ => {
                n += 1;
                let body = serde_json::json!({
                    "terminal": "kiosk",
                    "badge": (5000 + n % 50).to_string(),
                    "occurred_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "direction": if n.is_multiple_of(2) { "in" } else { "out" },
                });
                (serde_json::to_vec(&body).unwrap_or_default(), true)
            }
        };
        match call(
            &http,
            api,
            Method::POST,
            "/v1/clockings",
            Some(body.clone()),
        )
        .await
        {
            Ok((202, _)) => {
                if fresh {
                    generated.fetch_add(1, Ordering::Relaxed);
                    last = Some(body);
                } else {
                    reposted.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) | Err(_) => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?.local_addr()
}

/// A plant-network subscriber: counts distinct ids and re-deliveries, checks payload fields.
///
/// It never loses a message silently: its session is persistent (clean session off, a fixed
/// client id), so while it is away or slow the broker keeps its place in the log and sends again
/// what it had not acknowledged. Whenever a CONNACK says the broker has no session for it (the
/// first connection, or a broker that forgot), it subscribes again; anything published in such
/// a gap would be missing from the id set and fail the demo's delivered = stored check.
async fn subscribe(
    broker: SocketAddr,
    arrivals: Arc<Arrivals>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut opts = MqttOptions::new(
        "badgegate-demo-subscriber",
        broker.ip().to_string(),
        broker.port(),
    );
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(false);
    // The occupancy document lists everyone inside (about 100 bytes a person): far beyond
    // rumqttc's 10 KiB default at a busy site. The agent allows the same.
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let clockings = format!("badgegate/{SITE}/clockings/#");
    let occupancy_topic = format!("badgegate/{SITE}/zones/production/occupancy");
    let filters = [clockings, occupancy_topic.clone()];
    let mut sub = Subscriber {
        client,
        filters,
        occupancy_topic,
        arrivals,
    };
    // Wait until the subscriptions are in place before any clocking flows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut subacks = 0;
    while subacks < sub.filters.len() {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacks += 1,
            Ok(Ok(event)) => sub.handle(event)?,
            Ok(Err(e)) => bail!("subscriber could not connect to the embedded broker: {e}"),
            Err(_) => bail!("subscriber got no SUBACK within 10 s"),
        }
    }
    Ok(tokio::spawn(async move {
        let mut last_error: Option<String> = None;
        loop {
            match eventloop.poll().await {
                Ok(event) => {
                    if let Err(e) = sub.handle(event) {
                        tracing::error!("demo subscriber: {e:#}");
                    }
                }
                // Said once per kind, not swallowed: a subscriber that keeps failing on the same
                // packet is what hid the occupancy once (it outgrew rumqttc's 10 KiB default).
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!("demo subscriber: connection lost ({e}); reconnecting, its session keeps its place");
                        last_error = Some(e);
                    }
                    // The event loop reconnects on the next poll; pace the attempts.
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
    }))
}

struct Subscriber {
    client: AsyncClient,
    filters: [String; 2],
    occupancy_topic: String,
    arrivals: Arc<Arrivals>,
}

impl Subscriber {
    fn handle(&mut self, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) if ack.session_present => {
                self.arrivals
                    .sessions_resumed
                    .fetch_add(1, Ordering::Relaxed);
            }
            Event::Incoming(Packet::ConnAck(_)) => {
                self.arrivals.sessions_new.fetch_add(1, Ordering::Relaxed);
                for filter in &self.filters {
                    self.client
                        .try_subscribe(filter, QoS::AtLeastOnce)
                        .with_context(|| format!("subscribing to {filter}"))?;
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == self.occupancy_topic => {
                let count = serde_json::from_slice::<serde_json::Value>(&p.payload)
                    .ok()
                    .and_then(|v| v["count"].as_u64());
                match count {
                    Some(n) => {
                        self.arrivals.occupancy.send_replace(Some(n));
                    }
                    None => {
                        self.arrivals.bad_payloads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Event::Incoming(Packet::Publish(p)) => self.clocking(&p.payload),
            _ => {}
        }
        Ok(())
    }

    fn clocking(&self, payload: &[u8]) {
        let arrivals = &self.arrivals;
        let parsed = serde_json::from_slice::<serde_json::Value>(payload).ok();
        let status = parsed
            .as_ref()
            .and_then(|v| v["status"].as_str().map(str::to_owned));
        let id = parsed
            .filter(|v| {
                [
                    "id",
                    "site",
                    "terminal",
                    "badge",
                    "occurred_at",
                    "date",
                    "time_of_day_minutes",
                    "direction",
                    "status",
                    "source",
                    "received_at",
                ]
                .iter()
                .all(|k| v.get(k).is_some())
            })
            .and_then(|v| v["id"].as_str().map(str::to_owned));
        match id {
            Some(id) => {
                let fresh = arrivals
                    .ids
                    .lock()
                    .map(|mut s| s.insert(id))
                    .unwrap_or(false);
                if !fresh {
                    arrivals.redelivered.fetch_add(1, Ordering::Relaxed);
                } else if let (Some(status), Ok(mut s)) = (status, arrivals.statuses.lock()) {
                    *s.entry(status).or_default() += 1;
                }
            }
            None => {
                arrivals.bad_payloads.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
