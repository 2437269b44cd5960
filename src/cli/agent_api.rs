//! The command line's client for the running agent's local API (`status`, `zones`, and `queue`
//! while the agent holds the store's lock): reqwest on a small current-thread runtime, with the
//! bearer token of `http.token_file` when one is configured.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::clouds::http::describe;
use crate::config::{Config, Secret};

/// A whole request, connect to last byte: a `queue export` page of 1000 clockings included.
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct AgentApi {
    addr: SocketAddr,
    token: Option<Secret>,
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl AgentApi {
    /// The API of the agent that runs with `config`.
    pub fn of(config: &Config) -> Result<AgentApi, String> {
        let mut addr = config.http.listen;
        // A wildcard listen address is reached on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        crate::clouds::install_crypto_provider();
        let client = Client::builder()
            .user_agent(crate::clouds::USER_AGENT)
            .timeout(TIMEOUT)
            // The agent is on this host: never through a proxy from the environment.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", describe(e)))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        Ok(AgentApi {
            addr,
            token: config.http.token.clone(),
            client,
            runtime,
        })
    }

    /// GET a JSON document; `path` carries the query, already encoded.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        self.request(Method::GET, path)
    }

    /// GET a document of a known shape; `what` names it in the error.
    pub fn get_as<T: DeserializeOwned>(&self, path: &str, what: &str) -> Result<T, String> {
        serde_json::from_value(self.get(path)?)
            .map_err(|e| format!("the agent's answer is not {what}: {e}"))
    }

    /// POST an empty JSON object; `path` carries the query, already encoded.
    pub fn post(&self, path: &str) -> Result<Value, String> {
        self.request(Method::POST, path)
    }

    fn request(&self, method: Method, path: &str) -> Result<Value, String> {
        let addr = self.addr;
        let post = method == Method::POST;
        let mut req = self.client.request(method, format!("http://{addr}{path}"));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if post {
            req = req.json(&serde_json::json!({}));
        }
        let (status, body) = self
            .runtime
            .block_on(async {
                let resp = req.send().await?;
                let status = resp.status();
                Ok::<_, reqwest::Error>((status, resp.bytes().await?))
            })
            .map_err(|e| {
                format!(
                    "the agent's API at {addr} did not answer ({}); is the agent running?",
                    describe(e)
                )
            })?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("the agent at {addr} sent something that is not JSON: {e}"))?;
        // /healthz answers 503 with a full document when the store is not writable.
        let healthz_503 = path == "/healthz" && status == StatusCode::SERVICE_UNAVAILABLE;
        if status != StatusCode::OK && !healthz_503 {
            let msg = value["error"]["message"].as_str().unwrap_or("");
            return Err(format!(
                "the agent at {addr} answered {} {msg}",
                status.as_u16()
            ));
        }
        Ok(value)
    }
}
