//! `badgegate demo`: the test kit's demonstration, or how to get it in a gateway build.

use std::process::ExitCode;

use super::LogFormat;

#[cfg(feature = "kit")]
pub fn demo(duration: u64, format: LogFormat) -> ExitCode {
    // rumqttd logs every connection the demo's relay cuts; the demo reports what matters itself.
    super::init_tracing("warn,rumqttd=off", format);
    super::with_runtime(|| async move {
        match crate::kit::demo::run(std::time::Duration::from_secs(duration)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::from(super::EXIT_FAILURE)
            }
        }
    })
}

/// The gateway build carries no demo kit (no fake clouds, no simulator, no embedded broker).
#[cfg(not(feature = "kit"))]
pub fn demo(_duration: u64, _format: LogFormat) -> ExitCode {
    eprintln!(
        "this badgegate is a gateway build without the demo kit.\n\
         To run the demo, build from the source tree with the default features:\n  \
         cargo run -- demo\n\
         (the gateway packages are built with --no-default-features and contain no fakes)"
    );
    ExitCode::from(super::EXIT_USAGE)
}
