//! The local access engine: decides the Protime status of a clocking when its source did not.
//!
//! For now every clocking without a device-reported status is `AccessOk`; anti-passback, zones,
//! shifts and person maps build on this entry point.

pub mod directory;

use crate::model::{AccessStatus, NewClocking};

pub fn decide(_clocking: &NewClocking) -> AccessStatus {
    AccessStatus::AccessOk
}
