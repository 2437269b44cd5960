//! The test kit: everything that imitates the world around the gateway, for the tests, the
//! benchmarks, the fuzzers and `badgegate demo`. None of it is product: it is compiled only with
//! the `kit` cargo feature (on by default, so `cargo run -- demo` and `cargo test` work), and the
//! gateway builds (`scripts/cross-smoke`, `scripts/package-debs`) leave it out.

pub mod demo;
pub mod fakes;
/// Fuzz entry points, shared by `fuzz/` and `tests/fuzz_corpus.rs`; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod relay;
pub mod simulator;

/// A string that every build with the fake servers contains (they log it when they stop).
/// `scripts/check-no-kit` proves the gateway binaries do not.
pub const FAKES_MARKER: &str = "badgegate-kit: fake vendor cloud server";
