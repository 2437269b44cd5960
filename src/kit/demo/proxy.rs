//! A TCP relay that can break the link it carries: the demo's (and the tests') "uplink".
//!
//! - `Up`: bytes flow both ways.
//! - `Down`: open connections are closed and new ones are accepted and closed at once, which is
//!   what a client sees when a plant network link or a firewall drops it.
//! - `StallReplies`: client → server bytes flow, server → client bytes are held back: the broker
//!   receives publishes but its PUBACKs never arrive, so publishes stay in flight.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    Up,
    Down,
    StallReplies,
}

pub struct Uplink {
    addr: SocketAddr,
    mode: watch::Sender<LinkMode>,
    task: JoinHandle<()>,
}

impl Uplink {
    /// Relay connections made to a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Uplink> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(LinkMode::Up);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut state = mode_rx.clone();
                if *state.borrow_and_update() == LinkMode::Down {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    relay(client, server, state).await;
                });
            }
        });
        Ok(Uplink { addr, mode, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// Cut (false) or restore (true) the link.
    pub fn set_up(&self, up: bool) {
        self.set_mode(if up { LinkMode::Up } else { LinkMode::Down });
    }

    pub fn is_up(&self) -> bool {
        *self.mode.borrow() == LinkMode::Up
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.mode.send_replace(LinkMode::Down);
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, state: watch::Receiver<LinkMode>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let mut up_state = state.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                r = client_rx.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                _ = up_state.wait_for(|m| *m == LinkMode::Down) => return,
            };
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let mut down_state = state;
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // While replies are stalled, do not even read them: they pile up at the server.
            if down_state
                .wait_for(|m| *m != LinkMode::StallReplies)
                .await
                .map(|m| *m == LinkMode::Down)
                .unwrap_or(true)
            {
                return;
            }
            // A read cut short by a mode change loses nothing (TcpStream reads are cancel-safe).
            let n = tokio::select! {
                r = server_rx.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                _ = down_state.wait_for(|m| *m != LinkMode::Up) => continue,
            };
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending closes both halves (dropped here).
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
