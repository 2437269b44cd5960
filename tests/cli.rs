//! The command line: exit codes, check-config, queue stats with the agent stopped and running.

mod support;

use std::process::Output;

use support::*;

fn run(args: &[&str]) -> Output {
    badgegate().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn version_help_and_usage_errors() {
    let v = run(&["--version"]);
    assert_eq!(v.status.code(), Some(0));
    assert!(stdout(&v).starts_with(&format!("badgegate {}", env!("CARGO_PKG_VERSION"))));
    let h = run(&["--help"]);
    assert_eq!(h.status.code(), Some(0));
    for cmd in ["run", "demo", "check-config", "queue"] {
        assert!(stdout(&h).contains(cmd), "help lists {cmd}");
    }
    assert_eq!(run(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(run(&["run", "--bogus"]).status.code(), Some(64));
}

#[test]
fn check_config_reports_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        agent_config(
            &dir.path().join("data"),
            8780,
            "mqtt://127.0.0.1:1883",
            "",
            "",
        ),
    )
    .unwrap();
    let o = run(&["check-config", "--config", good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("OK"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[agent]\nsite = \"plant 1\"\ntimezone = \"Europe/Bruxelles\"\n[mqtt]\nurl = \"htp://broker\"\n[[terminals]]\nid = \"g\"\nkind = \"anviz\"\n",
    )
    .unwrap();
    let o = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&r#"mqtt.url: unsupported scheme "htp" (expected mqtt or mqtts)"#),
        "{out}"
    );
    for key in ["agent.site:", "agent.timezone:", "terminals[0].address:"] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "{key} missing in {out}"
        );
    }
    assert_eq!(lines.len(), 4, "one line per problem: {out}");

    let o = run(&["check-config", "--config", "/nonexistent/badgegate.toml"]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stdout(&o).starts_with("config: cannot read /nonexistent/badgegate.toml"));
}

#[test]
fn run_with_an_invalid_config_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[agent]\n").unwrap();
    let o = run(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("agent.site: missing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_stats_while_running_and_stopped_and_a_second_agent_is_refused() {
    let mosquitto = Mosquitto::start();
    let uplink = badgegate::kit::relay::Relay::start(mosquitto.addr())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start(dir.path(), &format!("mqtt://{}", uplink.addr()));
    let api = Api::new();
    uplink.set_up(false);
    api.post_all(&agent, &many(25, "q")).await;
    let cfg = agent.config_path.to_str().unwrap().to_owned();

    // Running: the store is locked, the CLI asks the agent's API.
    let o = run(&["queue", "stats", "--config", &cfg, "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sinks"][0]["sink"], "mqtt");
    assert_eq!(v["sinks"][0]["pending"], 25);
    assert!(v["sinks"][0]["oldest_pending_age_secs"].as_f64().unwrap() >= 0.0);
    assert!(v["store_bytes"].as_u64().unwrap() > 0);

    // A second agent on the same store cannot start: I/O error, exit 74, clear message.
    let second_dir = tempfile::tempdir().unwrap();
    let second_cfg = second_dir.path().join("b.toml");
    std::fs::write(
        &second_cfg,
        agent_config(&agent.data_dir, free_port(), "mqtt://127.0.0.1:1", "", ""),
    )
    .unwrap();
    let o = run(&["run", "--config", second_cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(74));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use by another process"));

    // Stopped: read from the store directly, human format.
    assert_eq!(agent.terminate().code(), Some(0));
    let o = run(&["queue", "stats", "--config", &cfg]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.contains("badgegate.redb"), "{out}");
    let mqtt_line = out.lines().find(|l| l.starts_with("mqtt")).expect(&out);
    assert_eq!(mqtt_line.split_whitespace().nth(1), Some("25"), "{out}");
}

#[test]
fn queue_stats_without_a_store_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        agent_config(
            &dir.path().join("none"),
            8780,
            "mqtt://127.0.0.1:1883",
            "",
            "",
        ),
    )
    .unwrap();
    let o = run(&["queue", "stats", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(74));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no store at"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_every_section_of_a_running_agent_in_80_columns() {
    let mosquitto = Mosquitto::start();
    let sim = badgegate::kit::simulator::Simulator::new(Default::default());
    let sim_addr = sim.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start_with(
        dir.path(),
        &mosquitto.url(),
        "",
        &anviz_connect("gate-north", sim_addr, 1),
    );
    let api = Api::new();
    api.wait_connected(&agent, std::time::Duration::from_secs(30))
        .await;
    sim.wait_for_links(1).await;
    let cfg = agent.config_path.to_str().unwrap().to_owned();

    let o = tokio::task::spawn_blocking(move || run(&["status", "--config", &cfg]))
        .await
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    for section in [
        "store",
        "uplink",
        "sinks",
        "terminals",
        "gate-north",
        "dead",
    ] {
        assert!(out.contains(section), "{section} missing:\n{out}");
    }
    assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");

    let cfg = agent.config_path.to_str().unwrap().to_owned();
    let o = tokio::task::spawn_blocking(move || run(&["status", "--config", &cfg, "--json"]))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mqtt"]["connected"], true);
    assert!(v["terminals"]["gate-north"].is_object());

    // No agent: a clear error and exit 74.
    drop(agent);
    let cfg = dir.path().join("badgegate.toml");
    let o = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(74));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the agent running?"));
}

#[test]
fn a_damaged_store_is_moved_aside_with_exit_74_and_the_next_start_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let garbage: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(data.join("badgegate.redb"), &garbage).unwrap();
    let port = free_port();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        agent_config(&data, port, "mqtt://127.0.0.1:1", "", ""),
    )
    .unwrap();

    let o = run(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(74));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is damaged") && err.contains("moved to"),
        "{err}"
    );
    let kept: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("badgegate.redb.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file is kept");
    assert_eq!(
        std::fs::read(kept[0].path()).unwrap(),
        garbage,
        "and not modified"
    );

    // The next start (systemd restarts on 74) runs on a fresh store.
    let mut agent = badgegate()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        std::time::Duration::from_secs(20),
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_and_export_while_running_and_stopped() {
    let mosquitto = Mosquitto::start();
    let uplink = badgegate::kit::relay::Relay::start(mosquitto.addr())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = AgentProc::start(dir.path(), &format!("mqtt://{}", uplink.addr()));
    uplink.set_up(false);
    // many(): even items on gate-1, odd on gate-2, one second apart from 06:00:00+01:00.
    let ids = Api::new().post_all(&agent, &many(30, "ql")).await;
    let cfg = agent.config_path.to_str().unwrap().to_owned();

    let check = |running: bool| {
        let cfg = cfg.clone();
        let ids = ids.clone();
        move || {
            let o = run(&[
                "queue",
                "list",
                "--config",
                &cfg,
                "--terminal",
                "gate-2",
                "--json",
            ]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            let lines: Vec<serde_json::Value> = stdout(&o)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 15, "running={running}");
            assert!(lines
                .iter()
                .all(|v| v["terminal"] == "gate-2" && v["pending_sinks"][0] == "mqtt"));

            let o = run(&[
                "queue",
                "list",
                "--config",
                &cfg,
                "--since",
                "2026-03-02T06:00:20+01:00",
                "--json",
            ]);
            assert_eq!(
                stdout(&o).lines().count(),
                10,
                "since is inclusive, offsets kept"
            );

            let out = std::path::Path::new(&cfg).with_extension(format!("export-{running}.jsonl"));
            let o = run(&[
                "queue",
                "export",
                "--config",
                &cfg,
                "--output",
                out.to_str().unwrap(),
            ]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            let exported: Vec<String> = std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            assert_eq!(exported, ids, "every stored clocking, in arrival order");

            let o = run(&["queue", "list", "--config", &cfg, "--since", "yesterday"]);
            assert_eq!(o.status.code(), Some(64));
            let o = run(&[
                "queue",
                "replay-dead-letters",
                "--config",
                &cfg,
                "--sink",
                "mqtt",
            ]);
            assert_eq!(o.status.code(), Some(0));
            assert!(stdout(&o).starts_with("0 dead letter(s)"));
        }
    };
    tokio::task::spawn_blocking(check(true)).await.unwrap();
    assert_eq!(agent.terminate().code(), Some(0));
    tokio::task::spawn_blocking(check(false)).await.unwrap();
}

/// Run `args`, read the first line of its stdout, close the pipe (as `| head -1` does) and
/// return the line, the exit code and stderr.
fn first_line_then_close(args: &[String]) -> (String, Option<i32>, String) {
    use std::io::BufRead;
    let mut child = badgegate()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The reader, and with it the pipe's read end, is gone now.
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    (line, o.status.code(), stderr)
}

/// A reader that closes the pipe early ends the command quietly with 0 (no "failed printing to
/// stdout" panic, no exit 134): `status` 20 times, `queue list` and `queue export` with far more
/// than a pipe buffer to write (so the closed pipe is certain to be hit), agent running and
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_pipe_ends_a_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // No broker: everything stays in the queue, and the agent answers all the same.
    let mut agent = AgentProc::start(dir.path(), &format!("mqtt://127.0.0.1:{}", free_port()));
    Api::new().post_all(&agent, &many(1500, "pipe")).await;
    let cfg = agent.config_path.to_str().unwrap().to_owned();
    let quiet = |args: Vec<String>| {
        let (line, code, stderr) = first_line_then_close(&args);
        assert!(!line.is_empty(), "{args:?} printed nothing: {stderr}");
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("failed"), "{args:?}: {stderr}");
    };
    let args = |a: &[&str]| -> Vec<String> {
        a.iter()
            .map(|s| s.to_string())
            .chain(["--config".to_owned(), cfg.clone()])
            .collect()
    };
    let big = [
        args(&["queue", "list", "--json", "--limit", "5000"]),
        args(&["queue", "list", "--limit", "5000"]),
        args(&["queue", "export"]),
    ];
    let running: Vec<_> = big
        .iter()
        .cloned()
        .chain((0..20).map(|_| args(&["status"])))
        .collect();
    // Side by side: `status` spends a second measuring rates.
    tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            for a in running {
                s.spawn(move || quiet(a));
            }
        })
    })
    .await
    .unwrap();

    assert!(agent.terminate().success());
    tokio::task::spawn_blocking(move || {
        for a in big {
            quiet(a);
        }
    })
    .await
    .unwrap();
}

/// An agent with MQTT (a broker that is not there) and Protime (in an outage) holding five
/// clockings for both sinks, stopped; and a second config on the same store without
/// `[sinks.protime]`.
struct Backlog {
    _fake: badgegate::kit::fakes::protime::FakeProtime,
    _dir: tempfile::TempDir,
    agent: AgentProc,
    with_protime: String,
    without_protime: String,
}

async fn backlog_for_mqtt_and_protime() -> Backlog {
    let fake = badgegate::kit::fakes::protime::FakeProtime::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    fake.control().wire().set_outage(true);
    let dir = tempfile::tempdir().unwrap();
    let sink = protime_sink(dir.path(), &fake);
    let nobody = format!("mqtt://127.0.0.1:{}", free_port());
    let mut agent = AgentProc::start_with(dir.path(), &nobody, "", &sink);
    Api::new().post_all(&agent, &many(5, "orphan")).await;
    assert_eq!(agent.terminate().code(), Some(0));
    let without = dir.path().join("without-protime.toml");
    std::fs::write(
        &without,
        agent_config(&agent.data_dir, agent.http.port(), &nobody, "", ""),
    )
    .unwrap();
    Backlog {
        _fake: fake,
        with_protime: agent.config_path.to_str().unwrap().to_owned(),
        without_protime: without.to_str().unwrap().to_owned(),
        _dir: dir,
        agent,
    }
}

/// `queue stats --json` of a stopped agent: (sink, pending) of the configured and of the
/// orphaned sinks.
/// (sink, pending) pairs.
type Pending = Vec<(String, u64)>;

fn pending_by_sink(config: &str) -> (Pending, Pending) {
    let o = run(&["queue", "stats", "--config", config, "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pairs = |key: &str| {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["sink"].as_str().unwrap().to_owned(),
                            s["pending"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    (pairs("sinks"), pairs("orphaned"))
}

fn both(mqtt: u64, protime: u64) -> Pending {
    vec![("mqtt".into(), mqtt), ("protime".into(), protime)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_stats_with_a_config_missing_a_sink_keeps_its_backlog() {
    let b = backlog_for_mqtt_and_protime().await;
    assert_eq!(pending_by_sink(&b.with_protime), (both(5, 5), vec![]));

    let o = run(&["queue", "stats", "--config", &b.without_protime]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("protime")
                && l.contains("orphaned: 5 pending, not in this config")),
        "{out}"
    );
    assert_eq!(
        pending_by_sink(&b.without_protime),
        (vec![("mqtt".into(), 5)], vec![("protime".into(), 5)])
    );
    for cmd in [&["list"][..], &["export"][..]] {
        let o = run(&[&["queue"][..], cmd, &["--config", &b.without_protime]].concat());
        assert_eq!(o.status.code(), Some(0), "{cmd:?}");
    }
    let o = run(&["zones", "--config", &b.without_protime]);
    assert_eq!(o.status.code(), Some(0));

    assert_eq!(
        pending_by_sink(&b.with_protime),
        (both(5, 5), vec![]),
        "the original config still sees Protime's backlog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_a_sink_keeps_its_backlog_as_orphaned() {
    let mut b = backlog_for_mqtt_and_protime().await;
    let original = std::fs::read_to_string(&b.with_protime).unwrap();
    std::fs::copy(&b.without_protime, &b.with_protime).unwrap();
    b.agent.spawn();

    let api = Api::new();
    let (_, stats) = api.get_json(&b.agent, "/v1/queue/stats").await;
    assert_eq!(stats["orphaned"][0]["sink"], "protime", "{stats}");
    assert_eq!(stats["orphaned"][0]["pending"], 5, "{stats}");
    let (_, health) = api.get_json(&b.agent, "/healthz").await;
    assert_eq!(health["orphaned"]["protime"], 5, "{health}");
    let cfg = b.with_protime.clone();
    let o = tokio::task::spawn_blocking(move || run(&["status", "--config", &cfg]))
        .await
        .unwrap();
    assert!(
        stdout(&o).contains("protime    orphaned: 5 pending, not in this config"),
        "{}",
        stdout(&o)
    );
    // Logged once, at start, with the count (the store is opened before the API listens).
    let log = std::fs::read_to_string(b.agent.config_path.with_extension("log")).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sink is not configured"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("protime") && warnings[0].contains("pending=5"),
        "{}",
        warnings[0]
    );

    assert_eq!(b.agent.terminate().code(), Some(0));
    std::fs::write(&b.with_protime, original).unwrap();
    assert_eq!(
        pending_by_sink(&b.with_protime),
        (both(5, 5), vec![]),
        "configured again, Protime has its whole backlog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_sink_needs_confirmation_and_then_drops() {
    let mut b = backlog_for_mqtt_and_protime().await;
    let without = b.without_protime.clone();
    let drop_sink = |config: &str, yes: bool| {
        let mut args = vec!["queue", "drop-sink", "protime", "--config", config];
        if yes {
            args.push("--yes");
        }
        badgegate()
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };

    // A configured sink is the agent's to deliver.
    let o = drop_sink(&b.with_protime, true);
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is configured"));

    // No terminal to type the name on, no --yes: refused, nothing dropped.
    let o = drop_sink(&without, false);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--yes"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(pending_by_sink(&without).1, vec![("protime".into(), 5)]);

    // While the agent runs it holds the store: a clear error, exit 74.
    std::fs::copy(&without, &b.with_protime).unwrap();
    b.agent.spawn();
    let o = drop_sink(&without, true);
    assert_eq!(o.status.code(), Some(74));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stop the agent first"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(b.agent.terminate().code(), Some(0));

    let o = drop_sink(&without, true);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains("dropped 5 entries"), "{}", stdout(&o));
    assert_eq!(
        pending_by_sink(&without),
        (vec![("mqtt".into(), 5)], vec![]),
        "MQTT keeps its queue"
    );
    let o = drop_sink(&without, true);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("nothing to drop"), "{}", stdout(&o));
}
