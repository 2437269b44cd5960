//! `badgegate zones [ZONE]`: persons per zone, or one zone's muster list. Reads the store when
//! the agent is stopped, asks its local API while it runs.

use std::path::Path;
use std::process::ExitCode;

use super::agent_api::AgentApi;
use super::out::outln;
use super::{fail, load, sinks, EXIT_IO, EXIT_USAGE};
use crate::store::{self, StoreError};

pub fn zones(path: &Path, zone: Option<&str>, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(z) = zone.filter(|z| !config.zones.iter().any(|d| d.name == *z)) {
        return fail(
            EXIT_USAGE,
            format!("zone {z:?} is not declared in [[zones]]"),
        );
    }
    let doc = match store::open_offline(&config.agent.data_dir, &sinks(&config)) {
        Ok(s) => crate::access::engine::offline_view(&config, &s, zone),
        // The agent holds the store: ask it over its local API instead.
        Err(StoreError::Locked { .. }) => {
            let api = match zone {
                None => "/v1/zones".to_owned(),
                Some(z) => format!("/v1/zones/{z}/people"),
            };
            AgentApi::of(&config)
                .and_then(|a| a.get(&api))
                .map_err(|e| format!("the store is locked by a running agent, and {e}"))
        }
        Err(e) => Err(e.to_string()),
    };
    match doc {
        Ok(doc) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                outln!("{}", crate::access::view::render(&doc));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_IO, e),
    }
}
