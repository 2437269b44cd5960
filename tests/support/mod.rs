//! Real parts for the integration tests: a Mosquitto process per test, the real agent binary,
//! a real MQTT subscriber. Every wait is for an event (a port accepting, a message arriving, a
//! process exiting) and is bounded by a deadline; nothing sleeps to synchronise.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

pub const SITE: &str = "plant-1";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Poll until `addr` accepts TCP connections (the event we wait for), bounded by `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} did not open within {timeout:?}"
        );
        std::thread::yield_now();
    }
}

fn mosquitto_binary() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)");
}

/// A real Mosquitto broker on a free loopback port.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More listeners (TLS, passwords), appended to the config; `per_listener_settings` is on.
    extra: String,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// A plain anonymous listener on `port` (for the tests' subscribers) plus `extra` config.
    pub fn start_with(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mosquitto {
            port: free_port(),
            child: None,
            dir,
            extra: extra.to_owned(),
        };
        m.spawn();
        m
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 0\nlistener {} 127.0.0.1\nallow_anonymous true\n{}\n",
                self.port, self.extra
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mosquitto");
        self.child = Some(child);
        wait_for_port(self.addr(), Duration::from_secs(10));
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash or power loss of the broker host would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real agent binary with a config written for this test.
pub struct AgentProc {
    pub http: SocketAddr,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    child: Option<Child>,
    /// `RUST_LOG` of the agent process.
    log_filter: &'static str,
    /// `--log-format` of the agent process.
    log_format: &'static str,
}

/// A test config; `agent_extra` goes into `[agent]`, `extra` at the end.
pub fn agent_config(
    data_dir: &Path,
    http_port: u16,
    mqtt_url: &str,
    agent_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[agent]
site = "{SITE}"
data_dir = "{}"
timezone = "Europe/Brussels"
{agent_extra}

[http]
listen = "127.0.0.1:{http_port}"

[mqtt]
url = "{mqtt_url}"
client_id = "badgegate-test"
reconnect_min_ms = 50
reconnect_max_ms = 300
inflight = 64

[[terminals]]
id = "gate-1"
kind = "http"

[[terminals]]
id = "gate-2"
kind = "http"
timezone = "America/New_York"
{extra}
"#,
        data_dir.display()
    )
}

/// A `[sinks.protime]` section for `fake`, its client secret written into `dir`.
pub fn protime_sink(dir: &Path, fake: &badgegate::kit::fakes::protime::FakeProtime) -> String {
    use badgegate::kit::fakes::protime::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET};
    std::fs::write(
        dir.join("protime-secret"),
        format!("{DEFAULT_CLIENT_SECRET}\n"),
    )
    .unwrap();
    format!(
        "\n[sinks.protime]\nbase_url = \"{}\"\ntoken_url = \"{}\"\nallow_insecure_http = true\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret_file = \"protime-secret\"\ntimezone = \"Europe/Brussels\"\n",
        fake.base_url(),
        fake.token_url()
    )
}

pub fn badgegate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_badgegate"))
}

impl AgentProc {
    /// Write a config in `dir` and start `badgegate run`, waiting until `/healthz` answers.
    pub fn start(dir: &Path, mqtt_url: &str) -> AgentProc {
        AgentProc::start_with(dir, mqtt_url, "", "")
    }

    pub fn start_with(dir: &Path, mqtt_url: &str, agent_extra: &str, extra: &str) -> AgentProc {
        AgentProc::start_named(dir, mqtt_url, "badgegate-test", agent_extra, extra)
    }

    /// Like [`start_with`](Self::start_with), with its own MQTT client id (several agents on one
    /// broker must not share one).
    pub fn start_named(
        dir: &Path,
        mqtt_url: &str,
        client_id: &str,
        agent_extra: &str,
        extra: &str,
    ) -> AgentProc {
        let mut a = AgentProc::configured(dir, mqtt_url, client_id, agent_extra, extra);
        a.spawn();
        a
    }

    /// Like [`start_with`](Self::start_with), logging JSON lines (`--log-format json`).
    pub fn start_json_logs(dir: &Path, mqtt_url: &str, extra: &str) -> AgentProc {
        let mut a = AgentProc::configured(dir, mqtt_url, "badgegate-test", "", extra);
        a.log_format = "json";
        a.spawn();
        a
    }

    /// The config written, the agent not started yet.
    fn configured(
        dir: &Path,
        mqtt_url: &str,
        client_id: &str,
        agent_extra: &str,
        extra: &str,
    ) -> AgentProc {
        let data_dir = dir.join("data");
        let config_path = dir.join("badgegate.toml");
        let port = free_port();
        std::fs::write(
            &config_path,
            agent_config(&data_dir, port, mqtt_url, agent_extra, extra).replace(
                "client_id = \"badgegate-test\"",
                &format!("client_id = \"{client_id}\""),
            ),
        )
        .unwrap();
        AgentProc {
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            config_path,
            data_dir,
            child: None,
            log_filter: "badgegate=debug",
            log_format: "human",
        }
    }

    /// Like [`start`](Self::start), with `http_extra` lines in the `[http]` section.
    pub fn start_with_http(dir: &Path, mqtt_url: &str, http_extra: &str) -> AgentProc {
        let mut a = AgentProc::configured(dir, mqtt_url, "badgegate-test", "", "");
        let text = std::fs::read_to_string(&a.config_path).unwrap();
        std::fs::write(
            &a.config_path,
            text.replace("[http]\n", &format!("[http]\n{http_extra}\n")),
        )
        .unwrap();
        a.spawn();
        a
    }

    /// The agent as a gateway runs it, for the benchmarks: the default MQTT in-flight window
    /// (the tests' config shrinks it to 64) and `info` logging instead of the tests' `debug`.
    pub fn start_as_deployed(dir: &Path, mqtt_url: &str) -> AgentProc {
        let data_dir = dir.join("data");
        let config_path = dir.join("badgegate.toml");
        let port = free_port();
        let text = agent_config(&data_dir, port, mqtt_url, "", "").replace("inflight = 64\n", "");
        assert!(!text.contains("inflight"), "the default window must apply");
        std::fs::write(&config_path, text).unwrap();
        let mut a = AgentProc {
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            config_path,
            data_dir,
            child: None,
            log_filter: "info",
            log_format: "human",
        };
        a.spawn();
        a
    }

    /// Start again with the same config and store.
    pub fn spawn(&mut self) {
        let child = badgegate()
            .args(["--log-format", self.log_format, "run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", self.log_filter)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.config_path.with_extension("log"))
                    .unwrap(),
            ))
            .spawn()
            .expect("spawning badgegate");
        self.child = Some(child);
        wait_for_port(self.http, Duration::from_secs(20));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("agent not running");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config_path.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real MQTT subscriber that re-subscribes after every reconnect and hands each message over.
pub struct Subscriber {
    pub rx: mpsc::UnboundedReceiver<(String, Value, bool)>,
    task: tokio::task::JoinHandle<()>,
    ready: mpsc::UnboundedReceiver<()>,
}

impl Subscriber {
    /// Connect to `broker`, subscribe to `filter` and return once the SUBACK arrived.
    pub async fn start(broker: SocketAddr, filter: &str) -> Subscriber {
        let mut opts = MqttOptions::new(
            format!("test-sub-{}", free_port()),
            broker.ip().to_string(),
            broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        // A persistent session: if a loaded machine makes the subscriber miss a keep-alive and
        // reconnect, the broker still holds what it acknowledged to the agent for it.
        opts.set_clean_session(false);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready) = mpsc::unbounded_channel();
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
                        let v = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&p.payload).into())
                        });
                        let _ = tx.send((p.topic.clone(), v, p.retain));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let mut s = Subscriber { rx, task, ready };
        s.wait_ready().await;
        s
    }

    /// Forget SUBACKs seen so far (a reconnect's), so that [`Self::wait_ready`] waits for the
    /// next one: call it while the broker is down, before restarting it.
    pub fn forget_ready(&mut self) {
        while self.ready.try_recv().is_ok() {}
    }

    /// Wait for the next SUBACK (after a broker restart, the re-subscription).
    pub async fn wait_ready(&mut self) {
        tokio::time::timeout(Duration::from_secs(20), self.ready.recv())
            .await
            .expect("no SUBACK within 20 s");
    }

    pub async fn next(&mut self, timeout: Duration) -> Option<(String, Value, bool)> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Collect clocking ids until every id in `want` arrived; returns (all payloads in arrival
    /// order). Panics with the missing count after `timeout`.
    pub async fn collect_ids(&mut self, want: &HashSet<String>, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = HashSet::new();
        let mut all = Vec::new();
        while !want.is_subset(&seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((_, v, _))) => {
                    if let Some(id) = v.get("id").and_then(Value::as_str) {
                        seen.insert(id.to_owned());
                        all.push(v);
                    }
                }
                _ => panic!(
                    "{} of {} clockings not delivered within {timeout:?}",
                    want.difference(&seen).count(),
                    want.len()
                ),
            }
        }
        all
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn clocking(terminal: &str, badge: &str, at: &str, direction: &str) -> Value {
    serde_json::json!({"terminal": terminal, "badge": badge, "occurred_at": at, "direction": direction})
}

/// `n` distinct clockings on gate-1 and gate-2, alternating.
pub fn many(n: usize, tag: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let terminal = if i % 2 == 0 { "gate-1" } else { "gate-2" };
            let at = format!(
                "2026-03-02T{:02}:{:02}:{:02}+01:00",
                6 + i / 3600 % 12,
                i / 60 % 60,
                i % 60
            );
            clocking(
                terminal,
                &format!("{tag}-{i}"),
                &at,
                if i % 3 == 0 { "in" } else { "out" },
            )
        })
        .collect()
}

pub struct Api {
    pub client: reqwest::Client,
}

impl Api {
    pub fn new() -> Api {
        badgegate::clouds::install_crypto_provider();
        Api {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    /// POST a JSON value; returns status and JSON body.
    pub async fn post(&self, agent: &AgentProc, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(agent.url("/v1/clockings"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST in batches of 100 and return the accepted ids (asserting 202 for each batch).
    pub async fn post_all(&self, agent: &AgentProc, items: &[Value]) -> Vec<String> {
        let mut ids = Vec::new();
        for chunk in items.chunks(100) {
            let (status, body) = self.post(agent, &Value::Array(chunk.to_vec())).await;
            assert_eq!(status, 202, "{body}");
            for a in body["accepted"].as_array().unwrap() {
                ids.push(a["id"].as_str().unwrap().to_owned());
            }
        }
        ids
    }

    pub async fn get_json(&self, agent: &AgentProc, path: &str) -> (u16, Value) {
        let r = self.client.get(agent.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn pending(&self, agent: &AgentProc) -> u64 {
        let (_, v) = self.get_json(agent, "/v1/queue/stats").await;
        v["sinks"][0]["pending"].as_u64().unwrap()
    }

    pub async fn stored(&self, agent: &AgentProc) -> u64 {
        let (_, v) = self.get_json(agent, "/v1/queue/stats").await;
        v["clockings_stored"].as_u64().unwrap()
    }

    /// Poll the agent's queue until nothing is pending (the event: the sink confirmed all).
    pub async fn wait_drained(&self, agent: &AgentProc, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.pending(agent).await == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue not drained within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POST a JSON value to any path; returns status and JSON body.
    pub async fn post_to(&self, agent: &AgentProc, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(agent.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Poll `/healthz` until `cond` holds of it.
    pub async fn wait_health(
        &self,
        agent: &AgentProc,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (_, v) = self.get_json(agent, "/healthz").await;
            if cond(&v) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not within {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll `/healthz` until the access engine's MQTT connection is subscribed.
    pub async fn wait_access_connected(&self, agent: &AgentProc, timeout: Duration) {
        self.wait_health(agent, "access MQTT connection up", timeout, |v| {
            v["mqtt"]["access_connected"] == true
        })
        .await
    }

    /// Poll `/healthz` until the MQTT uplink reports connected.
    pub async fn wait_connected(&self, agent: &AgentProc, timeout: Duration) {
        self.wait_health(agent, "MQTT connected", timeout, |v| {
            v["mqtt"]["connected"] == true
        })
        .await
    }

    pub async fn metric(&self, agent: &AgentProc, name: &str) -> f64 {
        let text = self
            .client
            .get(agent.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

/// Poll `cond` until it holds (the event), bounded by `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An `[[terminals]]` entry for an Anviz terminal the agent connects to.
pub fn anviz_connect(id: &str, addr: SocketAddr, device_id: u32) -> String {
    format!(
        "\n[[terminals]]\nid = \"{id}\"\nkind = \"anviz\"\naddress = \"{addr}\"\ndevice_id = {device_id}\nrequest_timeout_ms = 2000\nkeepalive_secs = 1\nbackfill_interval_secs = 2\n"
    )
}

/// The parts every cloud-source test needs: a real Mosquitto, a subscriber on every clocking
/// topic (subscribed before the agent starts, so nothing is missed), and the agent with `extra`
/// config. `secrets` (file name, content) are written beside the config first.
pub struct CloudRig {
    pub mosquitto: Mosquitto,
    pub dir: tempfile::TempDir,
    pub agent: AgentProc,
    pub api: Api,
    pub sub: Subscriber,
}

impl CloudRig {
    pub async fn start(secrets: &[(&str, &str)], extra: &str) -> CloudRig {
        let mosquitto = Mosquitto::start();
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in secrets {
            std::fs::write(dir.path().join(name), format!("{content}\n")).unwrap();
        }
        let sub =
            Subscriber::start(mosquitto.addr(), &format!("badgegate/{SITE}/clockings/#")).await;
        let agent = AgentProc::start_with(dir.path(), &mosquitto.url(), "", extra);
        CloudRig {
            mosquitto,
            dir,
            agent,
            api: Api::new(),
            sub,
        }
    }

    /// `sources.<name>` of the agent's `/healthz`.
    pub async fn source_health(&self, name: &str) -> Value {
        self.api.get_json(&self.agent, "/healthz").await.1["sources"][name].clone()
    }

    /// Waits until the source's health satisfies `cond`.
    pub async fn wait_source(&self, name: &str, what: &str, cond: impl Fn(&Value) -> bool) {
        eventually(what, Duration::from_secs(90), || async {
            cond(&self.source_health(name).await)
        })
        .await;
    }

    /// Waits until the source reports a failed poll whose error contains `needle`.
    pub async fn wait_source_error(&self, name: &str, needle: &str) {
        self.wait_source(name, &format!("{name} reports {needle:?}"), |h| {
            h["up"] == false && h["last_error"].as_str().is_some_and(|e| e.contains(needle))
        })
        .await;
    }

    /// The agent's log (RUST_LOG=badgegate=debug) contains none of `secrets`.
    pub fn assert_log_hides(&self, secrets: impl IntoIterator<Item = String>) {
        let log = self.agent.log();
        assert!(log.contains("badgegate started"), "the log was captured");
        let mut checked = 0;
        for s in secrets {
            assert!(!s.is_empty());
            assert!(!log.contains(&s), "a secret or token was logged");
            checked += 1;
        }
        assert!(
            checked >= 2,
            "the secret and at least one token were checked"
        );
    }

    pub async fn metric(&self, name: &str) -> f64 {
        self.api.metric(&self.agent, name).await
    }
}
