//! `queue list | export | replay-dead-letters`: safe while the agent runs. A stopped agent's
//! store is opened directly; a running agent holds the store's lock, so the same requests go
//! to its local API instead, a page at a time (an export of a large backlog never sits whole in
//! the gateway's memory).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::store::{self, Change, QueueFilter, SinkId, Store, StoreError, Writer};

pub enum Access {
    /// The agent is stopped: the store itself.
    Local(Arc<Store>),
    /// The agent runs: its API (and its bearer token, when it has one).
    Remote(Agent),
}

/// Where the running agent's API is and how to authenticate to it.
#[derive(Clone)]
pub struct Agent {
    pub addr: SocketAddr,
    pub token: Option<crate::config::Secret>,
}

impl Agent {
    pub fn of(config: &Config) -> Agent {
        Agent {
            addr: api_addr(config),
            token: config.http.token.clone(),
        }
    }
}

/// The selection as query parameters (the API's form).
pub fn selection_query(
    sink: Option<&str>,
    terminal: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
) -> HashMap<String, String> {
    [
        ("sink", sink),
        ("terminal", terminal),
        ("since", since),
        ("until", until),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned())))
    .collect()
}

/// The agent's local API address (a wildcard listen address is reached on loopback).
pub fn api_addr(config: &Config) -> SocketAddr {
    let mut addr = config.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

pub fn sinks(config: &Config) -> Vec<SinkId> {
    config
        .sink_names()
        .into_iter()
        .filter_map(SinkId::from_name)
        .collect()
}

impl Access {
    pub fn open(config: &Config) -> Result<Access, String> {
        match store::open_offline(&config.agent.data_dir, &sinks(config)) {
            Ok(s) => Ok(Access::Local(Arc::new(s))),
            Err(StoreError::Locked { .. }) => Ok(Access::Remote(Agent::of(config))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One page of matching clockings (as JSON) and the seq to continue after.
    pub fn page(
        &self,
        query: &HashMap<String, String>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<u64>), String> {
        match self {
            Access::Local(store) => {
                let filter: QueueFilter = crate::http::queue_filter(query)?;
                let page = store
                    .list(&filter, after, limit)
                    .map_err(|e| e.to_string())?;
                let next = (page.len() == limit)
                    .then(|| page.last().map(|q| q.seq))
                    .flatten();
                Ok((page.iter().map(|q| q.to_json()).collect(), next))
            }
            Access::Remote(agent) => {
                let mut q = query.clone();
                q.insert("limit".into(), limit.to_string());
                if let Some(a) = after {
                    q.insert("after".into(), a.to_string());
                }
                let v = get(agent, &format!("/v1/queue/clockings?{}", encode(&q)))?;
                let items = v["clockings"].as_array().cloned().unwrap_or_default();
                Ok((items, v["next_after"].as_u64()))
            }
        }
    }

    pub fn replay(&self, sink: SinkId) -> Result<u64, String> {
        match self {
            Access::Local(store) => {
                let (writer, handle) = Writer::start(store.clone(), 30, None);
                let result = runtime()?.block_on(handle.change(Change::Replay { sink }));
                drop(handle);
                writer.join();
                result.map_err(|e| e.to_string())
            }
            Access::Remote(agent) => {
                let v = request(
                    agent,
                    "POST",
                    &format!("/v1/queue/replay-dead-letters?sink={}", sink.as_str()),
                )?;
                v["replayed"]
                    .as_u64()
                    .ok_or_else(|| format!("unexpected answer from the agent: {v}"))
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// GET a JSON document from the running agent's local API.
pub fn get(agent: &Agent, path: &str) -> Result<Value, String> {
    request(agent, "GET", path)
}

fn request(agent: &Agent, method: &str, path: &str) -> Result<Value, String> {
    let addr = agent.addr;
    let body = if method == "POST" {
        Some(&b"{}"[..])
    } else {
        None
    };
    let (status, text) = runtime()?
        .block_on(crate::localhttp::request_with_token(
            addr,
            method,
            path,
            body,
            agent.token.as_ref().map(|t| t.expose()),
            Duration::from_secs(30),
        ))
        .map_err(|e| {
            format!("the agent's API at {addr} did not answer ({e}); is the agent running?")
        })?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| format!("the agent at {addr} sent something that is not JSON: {e}"))?;
    // /healthz answers 503 with a full document when the store is not writable.
    if status != 200 && !(path == "/healthz" && status == 503) {
        let msg = value["error"]["message"].as_str().unwrap_or("");
        return Err(format!("the agent at {addr} answered {status} {msg}"));
    }
    Ok(value)
}

/// Percent-encode query parameters (RFC 3339 offsets carry '+').
fn encode(q: &HashMap<String, String>) -> String {
    let esc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let mut parts: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect();
    parts.sort();
    parts.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encoding_keeps_offsets() {
        let q = selection_query(
            None,
            Some("gate 1"),
            Some("2026-11-22T06:00:00+01:00"),
            None,
        );
        assert_eq!(
            encode(&q),
            "since=2026-11-22T06:00:00%2B01:00&terminal=gate%201"
        );
    }
}
