//! The demo's embedded MQTT broker: rumqttd, a maintained broker crate, on a loopback port.
//!
//! Configured so that the demo's subscriber can never lose a message silently:
//! - persistent sessions (a client connecting with clean session off gets its subscriptions and
//!   its place in the log back, and unacknowledged deliveries are sent again);
//! - rumqttd keeps every filter's messages in an in-memory commit log and each subscriber reads
//!   it at its own pace, so a slow subscriber lags instead of being dropped. The log only forgets
//!   when it exceeds `max_segment_size × max_segment_count`; that is set far above a demo's whole
//!   traffic (about 25 clockings/s of under 1 KB each: 90 MB an hour, against 1 GiB).
//!
//! rumqttd's `Broker::start` binds the configured address on threads of its own and blocks, so
//! readiness is probed: a local link subscribes to a one-off topic, a TCP client publishes to it
//! through the port, and only when the local link receives it is the port known to be this
//! broker's (not whatever else grabbed the port after it was found free). If the bind fails,
//! `start` returns and another port is tried.
//!
//! rumqttd has no way to stop it: its threads run until the process exits, which it does at the
//! end of the demo.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rumqttd::{Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};

/// Ports tried before giving up (a bind fails only if something took the port in between).
const ATTEMPTS: usize = 5;
const READY_WITHIN: Duration = Duration::from_secs(10);

pub struct Broker {
    addr: SocketAddr,
}

impl Broker {
    /// Starts rumqttd on a free loopback port and returns once it serves MQTT there.
    pub async fn start() -> anyhow::Result<Broker> {
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            let addr = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .and_then(|l| l.local_addr())
                .context("finding a free loopback port")?;
            match start_on(addr, attempt).await {
                Ok(()) => return Ok(Broker { addr }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .with_context(|| format!("rumqttd did not start in {ATTEMPTS} attempts"))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn config(listen: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "demo".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: super::MAX_PACKET,
            // Packets read from one connection per batch: the agent's whole window (mqtt.inflight,
            // 256 by default) in one go.
            max_inflight_count: 512,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 512,
            max_segment_size: 64 << 20,
            max_segment_count: 16,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("demo".to_owned(), server)])),
        ..Config::default()
    }
}

async fn start_on(addr: SocketAddr, attempt: usize) -> anyhow::Result<()> {
    let mut broker = rumqttd::Broker::new(config(addr));
    let probe_topic = format!(
        "badgegate-demo/probe/{}-{attempt}-{}",
        std::process::id(),
        rand::random::<u64>()
    );
    let (mut link_tx, mut link_rx) = broker
        .link("badgegate-demo-probe")
        .context("opening rumqttd's local link")?;
    link_tx
        .subscribe(probe_topic.clone())
        .context("subscribing rumqttd's local link")?;
    let server = std::thread::Builder::new()
        .name("demo-broker".into())
        // `start` returns only when its servers have ended: at once if the bind failed.
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::warn!("the demo's rumqttd stopped: {e}");
            }
        })
        .context("starting rumqttd's thread")?;

    // The local link's side: blocking receives, on a thread of its own.
    let (seen_tx, mut seen_rx) = tokio::sync::oneshot::channel::<()>();
    let wanted = probe_topic.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + READY_WITHIN;
        let _keep = link_tx;
        while let Ok(n) = link_rx.recv_deadline(deadline) {
            if let Some(Notification::Forward(f)) = n {
                if f.publish.topic == wanted.as_bytes() {
                    let _ = seen_tx.send(());
                    return;
                }
            }
        }
    });

    // The TCP side: publish to the probe topic through the port until the local link has it.
    let mut opts = MqttOptions::new(
        format!("badgegate-demo-probe-{attempt}"),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if server.is_finished() {
            bail!("rumqttd could not serve {addr} (the port was taken)");
        }
        tokio::select! {
            seen = &mut seen_rx => match seen {
                Ok(()) => break,
                Err(_) => bail!("rumqttd's local link ended before the probe arrived on {addr}"),
            },
            _ = tokio::time::sleep_until(deadline) => bail!("rumqttd did not answer on {addr} within {READY_WITHIN:?}"),
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .try_publish(&probe_topic, QoS::AtLeastOnce, false, "ready")
                        .context("publishing the readiness probe")?;
                }
                Ok(_) => {}
                // Not listening yet: poll the port again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}
