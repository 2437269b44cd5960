//! Sinks take clockings from the store's outbox, deliver them, and confirm each one back to the
//! store only once the destination acknowledged it.

pub mod mqtt;
pub mod protime;
