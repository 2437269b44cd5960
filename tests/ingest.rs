//! The ingest API's answers to bad input: the right status, a clear error, nothing stored.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

async fn setup() -> (Mosquitto, tempfile::TempDir, AgentProc, Api) {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(dir.path(), &mosquitto.url());
    (mosquitto, dir, agent, Api::new())
}

async fn raw(api: &Api, agent: &AgentProc, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let r = api
        .client
        .post(agent.url("/v1/clockings"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_nothing_is_stored() {
    let (_m, _d, agent, api) = setup().await;
    let good = clocking("gate-1", "1", "2026-03-01T08:00:00+01:00", "in");

    let (s, b) = raw(
        &api,
        &agent,
        "application/json",
        b"{\"terminal\": ".to_vec(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );

    let (s, b) = raw(
        &api,
        &agent,
        "text/plain",
        serde_json::to_vec(&good).unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    let (s, b) = raw(
        &api,
        &agent,
        "application/json",
        vec![b' '; 2 * 1024 * 1024],
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );

    // One invalid element rejects the whole batch, naming its index and field.
    let cases = [
        (
            json!({"terminal": "nope", "badge": "1", "occurred_at": "2026-03-01T08:00:00Z"}),
            "terminal",
            "unknown_terminal",
        ),
        (
            json!({"terminal": "gate-1", "badge": "1", "occurred_at": "2026-03-01 08:00"}),
            "occurred_at",
            "invalid_timestamp",
        ),
        (
            json!({"terminal": "gate-1", "badge": "1", "occurred_at": "2026-03-01T08:00:00"}),
            "occurred_at",
            "invalid_timestamp",
        ),
        (
            json!({"terminal": "gate-1", "badge": "", "occurred_at": "2026-03-01T08:00:00Z"}),
            "badge",
            "invalid_badge",
        ),
        (
            json!({"terminal": "gate-1", "badge": "x".repeat(65), "occurred_at": "2026-03-01T08:00:00Z"}),
            "badge",
            "invalid_badge",
        ),
        (
            json!({"terminal": "gate-1", "occurred_at": "2026-03-01T08:00:00Z"}),
            "badge",
            "missing_field",
        ),
        (
            json!({"terminal": "gate-1", "badge": 5, "occurred_at": "2026-03-01T08:00:00Z"}),
            "badge",
            "invalid_type",
        ),
        (
            json!({"terminal": "gate-1", "badge": "1", "occurred_at": "2026-03-01T08:00:00Z", "direction": "up"}),
            "direction",
            "invalid_direction",
        ),
        (
            json!({"terminal": "gate-1", "badge": "1", "occurred_at": "2026-03-01T08:00:00Z", "status": "Maybe"}),
            "status",
            "invalid_status",
        ),
    ];
    for (bad, field, code) in cases {
        let batch = json!([good, good, bad]);
        let (s, b) = api.post(&agent, &batch).await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert_eq!(b["error"]["code"], code, "{b}");
        assert_eq!(b["error"]["field"], field, "{b}");
        assert_eq!(b["error"]["index"], 2, "{b}");
        assert!(!b["error"]["message"].as_str().unwrap().is_empty());
    }
    let (s, b) = api.post(&agent, &json!({"terminal": "gate-1", "badge": "1", "occurred_at": "2026-03-01T08:00:00Z", "gate": 1})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("unknown_field"))
    );
    let (s, b) = api
        .post(&agent, &Value::Array(vec![good.clone(); 1001]))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("batch_too_large"))
    );
    let (s, _) = api.post(&agent, &json!([])).await;
    assert_eq!(s, 400);
    let (s, _) = api.post(&agent, &json!("clocking")).await;
    assert_eq!(s, 400);

    assert_eq!(
        api.stored(&agent).await,
        0,
        "nothing from a rejected request is stored"
    );
    assert_eq!(
        api.metric(&agent, "badgegate_clockings_stored_total").await,
        0.0
    );
    assert!(api.metric(&agent, "badgegate_ingest_rejected_total").await >= 14.0);

    // The agent is still fine afterwards.
    let (s, _) = api.post(&agent, &good).await;
    assert_eq!(s, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_store_answers_507_and_recovers() {
    let mosquitto = Mosquitto::start();
    let uplink = badgegate::kit::relay::Relay::start(mosquitto.addr())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start_with(
        dir.path(),
        &format!("mqtt://{}", uplink.addr()),
        "store_max_mb = 1",
        "",
    );
    let api = Api::new();

    uplink.set_up(false);
    let mut accepted = 0u64;
    let mut full = None;
    for i in 0..200 {
        let (s, b) = api
            .post(
                &agent,
                &serde_json::Value::Array(many(100, &format!("fill{i}"))),
            )
            .await;
        match s {
            202 => accepted += 100,
            507 => {
                full = Some(b);
                break;
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    let body = full.expect("the store never filled up");
    assert_eq!(body["error"]["code"], "store_full");
    assert_eq!(
        api.stored(&agent).await,
        accepted,
        "everything acknowledged is kept"
    );

    // Space returns when the backlog drains; ingest works again.
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    uplink.set_up(true);
    api.wait_drained(&agent, Duration::from_secs(60)).await;
    let mut delivered = std::collections::HashSet::new();
    while delivered.len() < accepted as usize {
        let (_, v, _) = sub
            .next(Duration::from_secs(30))
            .await
            .expect("missing deliveries");
        delivered.insert(v["id"].as_str().unwrap().to_owned());
    }
    let (s, _) = api
        .post(
            &agent,
            &clocking("gate-1", "after", "2026-03-01T08:00:00Z", "in"),
        )
        .await;
    assert_eq!(s, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_v1_api_when_configured() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-token"), "tok-123\n").unwrap();
    // The token goes into [http]: rewrite the test config's listen line.
    let mut agent = AgentProc::start(dir.path(), &mosquitto.url());
    agent.kill9();
    let cfg = std::fs::read_to_string(&agent.config_path).unwrap();
    let cfg = cfg.replacen("[http]\n", "[http]\ntoken_file = \"api-token\"\n", 1);
    std::fs::write(&agent.config_path, cfg).unwrap();
    agent.spawn();
    let api = Api::new();
    let c = clocking("gate-1", "1", "2026-03-01T08:00:00+01:00", "in");

    let (s, b) = api.post(&agent, &c).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let r = api
        .client
        .post(agent.url("/v1/clockings"))
        .bearer_auth("wrong")
        .json(&c)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = api
        .client
        .post(agent.url("/v1/clockings"))
        .bearer_auth("tok-123")
        .json(&c)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let (s, _) = api.get_json(&agent, "/healthz").await;
    assert_eq!(s, 200, "health stays open for monitoring");

    // The CLI reads the token from the same config.
    let cfg = agent.config_path.to_str().unwrap().to_owned();
    let o = tokio::task::spawn_blocking(move || {
        badgegate()
            .args(["queue", "stats", "--config", &cfg, "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// This host's address on its first non-loopback interface, if it has one.
fn lan_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // A UDP connect sends nothing: it only picks the route and so the local address.
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_other_hosts_are_rate_limited_and_loopback_is_not() {
    let Some(ip) = lan_ip() else {
        eprintln!("skipped: this machine has no non-loopback address to connect from");
        return;
    };
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-token"), "tok-123\n").unwrap();
    let mut agent = AgentProc::start(dir.path(), &mosquitto.url());
    agent.kill9();
    let port = agent.http.port();
    let cfg = std::fs::read_to_string(&agent.config_path)
        .unwrap()
        .replace(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!(
                "listen = \"0.0.0.0:{port}\"\ntoken_file = \"api-token\"\nrate_limit_per_sec = 5"
            ),
        );
    assert!(cfg.contains("rate_limit_per_sec"));
    std::fs::write(&agent.config_path, cfg).unwrap();
    agent.spawn();

    badgegate::clouds::install_crypto_provider();
    let remote = reqwest::Client::builder()
        .local_address(ip)
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..30 {
        let r = remote
            .get(format!("http://{ip}:{port}/v1/zones"))
            .bearer_auth("tok-123")
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 429 {
            retry_after = r.headers().get("retry-after").cloned();
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(r.status().as_u16());
        }
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // A burst of 10, plus what refilled at 5/s while the 30 requests ran.
    assert!((10..20).contains(&ok), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(retry_after.is_some(), "429 carries Retry-After");

    // Local processes are not limited.
    let local = Api::new();
    for _ in 0..50 {
        let r = local
            .client
            .get(agent.url("/v1/zones"))
            .bearer_auth("tok-123")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    assert!(
        local
            .metric(&agent, "badgegate_http_rate_limited_total")
            .await
            >= 1.0
    );
}
