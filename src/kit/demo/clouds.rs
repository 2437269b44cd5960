//! The demo's clouds beside the terminals: a fake CrossChex Cloud account with two devices
//! uploading attendance records, a fake Aktion with persons and a C4 controller reporting
//! passages, and access clockings appearing in the fake Protime for the mirror. The agent pulls
//! all three; they are cut off with the uplink and pulled again after it returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Timelike, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::Agent;
use crate::kit::fakes::aktion::{self as aktion, FakeAktion};
use crate::kit::fakes::crosschex::{self as crosschex, FakeCrossChex};
use crate::kit::fakes::protime::{self as protime, FakeProtime};
use crate::model::Source;

const TZ: chrono_tz::Tz = chrono_tz::Europe::Brussels;
/// The C4 controller of the lobby door, and the CrossChex device at the canteen.
const C4: &str = "C4-LOBBY";
const CANTEEN: &str = "CC-0001";
const WORKSHOP: &str = "CC-0002";

/// What each cloud generated: CrossChex records, Aktion passages, Protime access clockings.
#[derive(Default)]
pub struct Generated {
    pub crosschex: AtomicU64,
    pub aktion: AtomicU64,
    pub protime: AtomicU64,
}

impl Generated {
    /// Whether `pulled` (as [`DemoClouds::pulled`] counts) covers everything generated.
    pub fn pulled_by(&self, [c, a, p]: [u64; 3]) -> bool {
        c >= self.crosschex.load(Ordering::Relaxed)
            && a >= self.aktion.load(Ordering::Relaxed)
            && p >= self.protime.load(Ordering::Relaxed)
    }
}

pub struct DemoClouds {
    crosschex: FakeCrossChex,
    aktion: FakeAktion,
    pub generated: Arc<Generated>,
}

impl DemoClouds {
    /// Starts the fakes and teaches the fake Protime the cloud terminals (so their clockings are
    /// accepted there too).
    pub async fn start(protime_fake: &FakeProtime) -> anyhow::Result<DemoClouds> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let crosschex = FakeCrossChex::start(any)
            .await
            .context("starting the fake CrossChex Cloud")?;
        // The real account allows a request per 15 s; the demo has seconds.
        crosschex
            .control()
            .set_min_interval(Duration::from_millis(200));
        let aktion = FakeAktion::start(any)
            .await
            .context("starting the fake Aktion")?;
        let actl = aktion.control();
        actl.add_c4(C4, 41, "Lobby door");
        for k in 0..50 {
            actl.add_person(aktion::Person {
                person_id: format!("AK{k}"),
                name: "Demo".into(),
                surname: format!("Visitor {k}"),
                department: "Visitors".into(),
                identifier_card1: (1300 + k).to_string(),
                identifier_card2: None,
                identifier_entry_code: None,
                identifiers: Vec::new(),
                lock: false,
                time_last_change: Utc::now(),
            });
        }
        let pctl = protime_fake.control();
        for (id, code) in [
            (11, "canteen"),
            (12, "crosschex-CC-0002"),
            (13, "lobby"),
            // Known to Protime only: its access clockings arrive as terminal `protime-14`.
            (14, "turnstile-east"),
        ] {
            pctl.add_terminal(protime::Terminal {
                id,
                external_code: code.into(),
            });
        }
        Ok(DemoClouds {
            crosschex,
            aktion,
            generated: Arc::default(),
        })
    }

    /// The agent's config for the sources (appended to the demo config); writes their secrets.
    pub fn config(&self, data_dir: &std::path::Path) -> anyhow::Result<String> {
        std::fs::write(
            data_dir.join("crosschex-secret"),
            crosschex::DEFAULT_API_SECRET,
        )
        .context("writing the demo's CrossChex secret")?;
        std::fs::write(data_dir.join("aktion-key"), aktion::DEFAULT_API_KEY)
            .context("writing the demo's Aktion key")?;
        Ok(format!(
            r#"
# The CrossChex Cloud device at the canteen; the workshop's device is claimed by no terminal
# and arrives as crosschex-{WORKSHOP}.
[[terminals]]
id = "canteen"
crosschex_serial = "{CANTEEN}"

# The lobby door is an Aktion C4 controller.
[[terminals]]
id = "lobby"
aktion_c4 = "{C4}"

[sources.crosschex]
base_url = "{}"
# The fake clouds listen on loopback, without TLS.
allow_insecure_http = true
api_key = "{}"
api_secret_file = "crosschex-secret"
timezone = "Europe/Brussels"
poll_interval_secs = 1
request_interval_ms = 300

[sources.aktion]
base_url = "{}"
allow_insecure_http = true
user_login = "{}"
api_key_file = "aktion-key"
poll_interval_secs = 1
c4_controllers = ["{C4}"]
"#,
            self.crosschex.base_url(),
            crosschex::DEFAULT_API_KEY,
            self.aktion.base_url(),
            aktion::DEFAULT_USER_LOGIN,
        ))
    }

    /// Devices upload to CrossChex, the lobby door reports to Aktion and Protime's own
    /// terminals record access clockings, until `stop`.
    pub fn generate(
        &self,
        protime_fake: &FakeProtime,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let cctl = self.crosschex.control();
        let actl = self.aktion.control();
        let pctl = protime_fake.control();
        let g = self.generated.clone();
        let crosschex = every(Duration::from_millis(500), stop.clone(), move |n| {
            let now = Utc::now().with_timezone(&TZ).naive_local();
            cctl.add_record(crosschex::Record {
                checktype: 56,
                checktime: now.with_nanosecond(0).unwrap_or(now),
                device_serial: if n % 2 == 0 { CANTEEN } else { WORKSHOP }.into(),
                device_name: "FaceDeep3".into(),
                first_name: "Demo".into(),
                last_name: format!("Worker {n}"),
                workno: (1000 + n % 300).to_string(),
            });
            g.crosschex.fetch_add(1, Ordering::Relaxed);
        });
        let g = self.generated.clone();
        let aktion = every(Duration::from_millis(700), stop.clone(), move |n| {
            let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
                .unwrap_or_else(Utc::now);
            let k = n % 50;
            actl.add_hw_event(aktion::HwEvent {
                hw_structure_id: 41,
                date_created: now,
                date: now,
                event_code: 1,
                direction: if n % 2 == 0 { 1 } else { 2 },
                owner_id: Some(format!("AK{k}")),
                identifier: (1300 + k).to_string(),
                zone: "production".into(),
                descriptions: vec!["Passage".into()],
            });
            g.aktion.fetch_add(1, Ordering::Relaxed);
        });
        let g = self.generated.clone();
        let protime = every(Duration::from_secs(1), stop, move |n| {
            let local = Utc::now().with_timezone(&TZ);
            pctl.add_access_clocking(protime::AccessClockingSpec {
                // Each person once a minute at most: access clockings have minute precision.
                person_id: 1000 + (n % 399) as i64,
                date: local.date_naive(),
                time_of_day_in_minutes: (local.hour() * 60 + local.minute()) as u16,
                terminal_id: [1, 2, 14][(n % 3) as usize],
                status: if n % 10 == 9 {
                    protime::AccessStatus::AntiPassbackError
                } else {
                    protime::AccessStatus::AccessOk
                },
            });
            g.protime.fetch_add(1, Ordering::Relaxed);
        });
        vec![crosschex, aktion, protime]
    }

    /// The uplink to the clouds is cut (true) or restored.
    pub fn set_outage(&self, on: bool) {
        self.crosschex.control().wire().set_outage(on);
        self.aktion.control().wire().set_outage(on);
    }

    /// Clockings the agent stored from each cloud (CrossChex, Aktion, Protime mirror).
    pub fn pulled(agent: &Agent) -> [u64; 3] {
        let m = agent.metrics();
        [Source::Crosschex, Source::Aktion, Source::Protime]
            .map(|s| m.source(s).clockings.load(Ordering::Relaxed))
    }

    /// Everything the clouds generated has been pulled.
    pub fn caught_up(&self, agent: &Agent) -> bool {
        self.generated.pulled_by(Self::pulled(agent))
    }

    pub async fn shutdown(self) {
        self.crosschex.shutdown().await;
        self.aktion.shutdown().await;
    }
}

/// Runs `f(n)` for n = 0, 1, … every `period` until `stop`.
fn every(
    period: Duration,
    mut stop: watch::Receiver<bool>,
    mut f: impl FnMut(u64) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        for n in 0.. {
            tokio::select! {
                _ = tick.tick() => f(n),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}
