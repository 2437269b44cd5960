//! The local access engine: the Protime status of every clocking at once, with no cloud.
//!
//! - [`rules`]: zones, each terminal's `zone_from → zone_to`, the time rules.
//! - [`decide`]: the pure decision function (the README's decision table).
//! - [`presence`]: who is where; latest transition wins, so gateways converge.
//! - [`directory`]: people and shifts from the person sources; [`people_file`] reads the local one.
//! - [`engine`]: presence in memory beside the store, the writer hook that decides each clocking
//!   in arrival order within the commit that stores it, access checks, mirror comparison.
//! - [`mqtt`]: the access connection: occupancy, access checks over MQTT, site-wide presence.
//! - [`view`]: occupancy and muster lists for the API, MQTT and the CLI.

pub mod decide;
pub mod directory;
pub mod engine;
pub mod mqtt;
pub mod people_file;
pub mod presence;
pub mod rules;
pub mod view;

pub use decide::{decide, Attempt, Decision};
pub use directory::{Directory, PeopleOrigin, Person, Shift};
pub use engine::AccessEngine;
