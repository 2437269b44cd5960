//! Anviz TC-B terminals (FaceDeep and others) over TCP.

pub mod codec;
