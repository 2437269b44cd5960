//! Device links: terminals speaking their own protocols to the agent.

pub mod anviz;
