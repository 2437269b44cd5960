//! Anviz TC-B terminals (FaceDeep and others) over TCP: a pure frame codec and the live link.

pub mod codec;
pub mod link;
