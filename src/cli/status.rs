//! `badgegate status`: the running agent's health document, rendered in 80 columns (or as JSON),
//! with each sink's delivery rate measured over one second.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::agent_api::AgentApi;
use super::out::outln;
use super::{fail, load, EXIT_IO};
use crate::health::Health;

const HEALTH_DOCUMENT: &str = "a health document";

pub fn status(path: &Path, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let api = match AgentApi::of(&config) {
        Ok(a) => a,
        Err(e) => return fail(EXIT_IO, e),
    };
    let first: Health = match api.get_as("/healthz", HEALTH_DOCUMENT) {
        Ok(h) => h,
        Err(e) => return fail(EXIT_IO, e),
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&first).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    // Delivery rates: the confirmed count over one second.
    std::thread::sleep(Duration::from_secs(1));
    let rates: Vec<(String, f64)> = match api.get_as::<Health>("/healthz", HEALTH_DOCUMENT) {
        Ok(second) => second
            .delivered
            .iter()
            .map(|(sink, &n)| {
                let was = first.delivered.get(sink).copied().unwrap_or(0);
                (sink.clone(), n.saturating_sub(was) as f64)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    outln!("{}", crate::status::render(&first, &rates));
    ExitCode::SUCCESS
}
