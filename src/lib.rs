//! badgegate: collects clockings from badge terminals and clouds, stores each one durably, and
//! forwards it to every configured sink, deleting it only once every sink confirmed it.
//!
//! Data flow: `terminals/` and `sources/` → [`store`] → `sinks/`, with the access engine beside it.
#![forbid(unsafe_code)]

pub mod access;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod clouds;
pub mod config;
mod config_keys;
pub mod health;
pub mod http;
pub mod ingest;
/// The test kit (fake clouds, TC-B simulator, demo scene, relay, fuzz entry points): not
/// product. Only in builds with the `kit` feature (the default); the gateway builds leave it out.
#[cfg(feature = "kit")]
pub mod kit;
pub mod metrics;
pub mod model;
pub mod mqtt_link;
pub mod queue_filter;
pub mod sinks;
pub mod sources;
pub mod status;
pub mod store;
pub mod terminals;
