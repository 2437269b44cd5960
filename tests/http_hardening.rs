//! The local API under slow and idle clients (slowloris): idle sockets cannot starve health
//! checks and ingest, and half-sent requests are closed by the agent.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Half a request head: the request line and one header, never the blank line that ends it.
const HALF_SENT: &[u8] = b"POST /v1/clockings HTTP/1.1\r\nHost: badgegate\r\n";

/// The soft limit on open files of this process (`/proc/self/limits`), if readable.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Descriptors the process `pid` holds open.
fn open_files_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Reads until the agent closes the connection; what it sent, or None when `within` ran out.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.ok().map(|()| got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_sockets_do_not_starve_health_and_ingest() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    // The defaults: 256 connections, a 10 s header timeout (longer than this test needs).
    let agent = AgentProc::start(dir.path(), &mosquitto.url());
    let api = Api::new();

    // 2,000 sockets, unless this process may not open that many (it keeps 200 spare).
    let wanted = 2000;
    let sockets = match open_files_limit() {
        Some(limit) if limit < wanted + 200 => {
            eprintln!(
                "RLIMIT_NOFILE is {limit}: opening {} idle sockets",
                limit - 200
            );
            limit.saturating_sub(200)
        }
        _ => wanted,
    };
    let mut idle = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let mut s = TcpStream::connect(agent.http).await.unwrap();
        // The agent may already have closed an older one to make room: that is the point.
        let _ = s.write_all(HALF_SENT).await;
        idle.push(s);
    }

    let t = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(5), api.get_json(&agent, "/healthz"))
        .await
        .expect("/healthz answered within 5 s");
    assert_eq!(health.0, 200, "{}", health.1);
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(5),
        api.post(
            &agent,
            &clocking("gate-1", "4711", "2026-03-01T08:00:00+01:00", "in"),
        ),
    )
    .await
    .expect("ingest answered within 5 s");
    assert_eq!(status, 202, "{body}");
    let answered = t.elapsed();

    // The cap holds: the agent keeps far fewer descriptors than the sockets pointed at it.
    let pid = agent.pid().unwrap();
    let held = open_files_of(pid);
    eprintln!(
        "with {sockets} idle sockets open: /healthz and an ingest POST answered in {answered:?}; the agent holds {held} descriptors"
    );
    assert!(
        held < 256 + 100,
        "the agent holds {held} descriptors with {sockets} sockets open"
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProc::start_with_http(
        dir.path(),
        &mosquitto.url(),
        "header_timeout_secs = 1\nbody_timeout_secs = 1",
    );

    // The head never ends: the connection is closed after the header timeout.
    let mut stream = TcpStream::connect(agent.http).await.unwrap();
    stream.write_all(HALF_SENT).await.unwrap();
    let t = Instant::now();
    read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the agent closed the half-sent request");
    let after = t.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&after),
        "closed after {after:?}, the header timeout is 1 s"
    );

    // A connection that never sends a byte is closed just the same.
    let mut silent = TcpStream::connect(agent.http).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(10))
        .await
        .expect("the agent closed the silent connection");

    // A complete head and a body that stops half-way: 408 after the body timeout, then closed.
    let mut stream = TcpStream::connect(agent.http).await.unwrap();
    stream
        .write_all(
            b"POST /v1/clockings HTTP/1.1\r\nHost: badgegate\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"terminal\":",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the agent closed the half-sent body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    // And the agent still serves.
    let (status, _) = Api::new().get_json(&agent, "/healthz").await;
    assert_eq!(status, 200);
}
