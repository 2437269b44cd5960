//! TOML → validated [`Config`]. Parsing is two-step: each section is read into plain "raw" structs
//! (so a type error in one section does not hide problems in another), then validated into the
//! richer types the agent uses. Every problem names its key, e.g.
//! `mqtt.url: unsupported scheme "htp" (expected mqtt or mqtts)`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chrono_tz::Tz;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::model::{AccessStatus, Direction};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/badgegate/badgegate.toml";
/// The contract's limit on one ingest request.
pub const MAX_BATCH: usize = 1000;
/// Largest secret file accepted (tokens, passwords, keys are far smaller).
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// One thing wrong with a configuration, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// All problems found in a configuration.
#[derive(Debug, Clone)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A secret read from a `*_file`; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    pub http: HttpConfig,
    pub mqtt: Option<MqttConfig>,
    pub terminals: Vec<TerminalConfig>,
    pub access: AccessConfig,
    pub zones: Vec<ZoneConfig>,
    pub sinks: SinksConfig,
    pub sources: SourcesConfig,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub site: String,
    pub data_dir: PathBuf,
    pub timezone: Tz,
    /// Refuse ingest (HTTP 507, terminals not acked) once the store holds this many bytes.
    pub store_max_bytes: Option<u64>,
    /// How long a delivered clocking's id is remembered for deduplication.
    pub dedupe_days: u32,
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer …` on `/v1/*` (mandatory when not bound to loopback).
    pub token: Option<Secret>,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    /// Requests per second allowed from each client on another host (0: no limit). Loopback
    /// clients are local processes and are not limited.
    pub rate_limit_per_sec: u32,
    /// A connection must deliver a request's headers this soon after it went quiet (slowloris).
    pub header_timeout: std::time::Duration,
    /// A request body must arrive completely this soon after its headers.
    pub body_timeout: std::time::Duration,
    /// Connections served at once; at the cap the oldest connection without a request in
    /// progress is closed to make room (see `http::serve`).
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub client_id: String,
    pub topic_prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub keep_alive_secs: u16,
    /// Publishes awaiting their PUBACK at once.
    pub inflight: u16,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminalKind {
    Anviz,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnvizMode {
    /// The agent connects to the terminal.
    Connect(SocketAddr),
    /// The terminal connects to the agent.
    Listen(SocketAddr),
}

#[derive(Debug, Clone)]
pub struct TerminalConfig {
    pub id: String,
    pub kind: TerminalKind,
    pub anviz: Option<AnvizMode>,
    pub device_id: u32,
    pub timezone: Tz,
    pub zone_from: Option<String>,
    pub zone_to: Option<String>,
    /// A terminal mounted on one side of a gate fixes the direction of its clockings.
    pub direction: Option<Direction>,
    pub link: LinkTiming,
    /// The CrossChex Cloud device (`device.serial_number`) whose records are this terminal's.
    pub crosschex_serial: Option<String>,
    /// The Aktion C4 controller (`C4Identification`) whose passages are this terminal's.
    pub aktion_c4: Option<String>,
    /// Anviz: the connection password (command 0x04) sent before any other command.
    pub password: Option<Secret>,
    /// Which Protime person reference this terminal's badges are (overrides the source's and
    /// the sink's).
    pub protime_person_ref: Option<ProtimePersonRef>,
}

/// Timing of a device link (anviz terminals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    /// A request every this often keeps idle links alive (some firmware drops them after ~30 min)
    /// and reads the device's count of new records.
    pub keepalive: std::time::Duration,
    /// Backfill at least this often even when no record was pushed.
    pub backfill_interval: std::time::Duration,
    /// How long to wait for any answer before the link is considered broken.
    pub request_timeout: std::time::Duration,
    /// Set the terminal clock when it is off by more than this.
    pub max_clock_drift_secs: u32,
    pub clock_sync_interval: std::time::Duration,
}

impl Default for LinkTiming {
    fn default() -> LinkTiming {
        LinkTiming {
            keepalive: std::time::Duration::from_secs(30),
            backfill_interval: std::time::Duration::from_secs(60),
            request_timeout: std::time::Duration::from_secs(5),
            max_clock_drift_secs: 30,
            clock_sync_interval: std::time::Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AntiPassback {
    #[default]
    Off,
    Soft,
    Hard,
}

#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub antipassback: AntiPassback,
    pub people_file: Option<PathBuf>,
    /// A person cannot enter a zone again within this long of their last passage into or out of
    /// it (timed anti-passback). Zero: off.
    pub reentry_lockout: chrono::Duration,
    /// Every day at this local time (`agent.timezone`) anti-passback is forgiven: presence held
    /// from before it no longer refuses a passage (it still shows on the muster list).
    pub forgive_at: Option<chrono::NaiveTime>,
    /// Presence older than this counts as unknown (for anti-passback and occupancy).
    pub presence_ttl: Option<chrono::Duration>,
    /// Share presence transitions with the other gateways of the site through the broker.
    pub site_sync: bool,
    /// Occupancy is published at most this often per zone.
    pub occupancy_interval: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct ZoneConfig {
    pub name: String,
    /// Entering the zone needs a scheduled shift of the person (within the tolerance).
    pub require_shift: bool,
    pub shift_tolerance: chrono::Duration,
    /// The status of a successful passage out of the zone (`OutZone` for monitored zones).
    pub exit_status: Option<AccessStatus>,
    /// When not empty, only persons in one of these groups may enter.
    pub allowed_groups: Vec<String>,
    /// Overrides `access.antipassback` for the terminals leading into this zone.
    pub antipassback: Option<AntiPassback>,
}

#[derive(Debug, Clone, Default)]
pub struct SinksConfig {
    pub protime: Option<ProtimeConfig>,
}

#[derive(Debug, Clone)]
pub struct ProtimeConfig {
    pub base_url: String,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub timezone: Tz,
    pub mirror: bool,
    /// Mirror: how often the access-clockings delta is read.
    pub mirror_interval_secs: u64,
    /// Mirror: the initial load (and a full re-sync) reads access clockings of this many days.
    pub mirror_days: u32,
    /// Mirror: how often people (the badge map) are reloaded.
    pub people_interval_secs: u64,
    /// The longest pause between delivery attempts while Protime fails (backoff from 1 s).
    pub retry_max_secs: u64,
    /// Which person reference a clocking's badge is sent as, unless its terminal or source says
    /// otherwise.
    pub person_ref: ProtimePersonRef,
}

/// The Protime person external reference a clocking's badge value is sent (and looked up) as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtimePersonRef {
    /// `@badge-number`: the badge a reader saw.
    #[default]
    BadgeNumber,
    /// `@employee-number`: what a TC-B user id or a CrossChex `workno` often is.
    EmployeeNumber,
}

impl ProtimePersonRef {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtimePersonRef::BadgeNumber => "badge-number",
            ProtimePersonRef::EmployeeNumber => "employee-number",
        }
    }

    /// Protime's predefined external reference name.
    pub fn reference(self) -> &'static str {
        match self {
            ProtimePersonRef::BadgeNumber => "@badge-number",
            ProtimePersonRef::EmployeeNumber => "@employee-number",
        }
    }

    /// `badge-number` or `employee-number`, with or without Protime's `@`.
    pub fn parse(s: &str) -> Option<ProtimePersonRef> {
        match s.trim().trim_start_matches('@') {
            "badge-number" => Some(ProtimePersonRef::BadgeNumber),
            "employee-number" => Some(ProtimePersonRef::EmployeeNumber),
            _ => None,
        }
    }
}

/// What the `+00:00` of a CrossChex `checktime` means (see docs/config.md for the evidence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckTime {
    /// The label is the device's wall clock in `sources.crosschex.timezone`; `+00:00` is wrong.
    #[default]
    Local,
    /// The label is UTC, as written.
    Utc,
}

#[derive(Debug, Clone, Default)]
pub struct SourcesConfig {
    pub crosschex: Option<CrossChexConfig>,
    pub aktion: Option<AktionConfig>,
}

#[derive(Debug, Clone)]
pub struct CrossChexConfig {
    pub base_url: String,
    pub api_key: String,
    pub api_secret: Secret,
    pub timezone: Tz,
    pub poll_interval_secs: u64,
    /// Minimum spacing of requests to the account (CrossChex allows about one per 15 s).
    pub request_interval_ms: u64,
    /// Each poll re-reads this far behind the watermark for records devices uploaded late.
    pub overlap_mins: u32,
    /// The first poll (no watermark yet) reads this far back.
    pub lookback_hours: u32,
    /// How `checktime` (and the `begin_time`/`end_time` of a read) is read.
    pub checktime: CheckTime,
    /// Which Protime person reference a `workno` is (overrides the sink's).
    pub protime_person_ref: Option<ProtimePersonRef>,
}

#[derive(Debug, Clone)]
pub struct AktionConfig {
    pub base_url: String,
    pub user_login: String,
    pub api_key: Secret,
    pub poll_interval_secs: u64,
    /// The C4 controllers (`C4Identification`) whose events are read.
    pub c4_controllers: Vec<String>,
    /// How often persons (the badge map) and their scheduled shifts are refreshed.
    pub people_interval_secs: u64,
    /// Shifts are held from yesterday to this many days ahead.
    pub shift_days: u32,
    /// The tenant's zone: Aktion's date parameters and zone-less dates are its local time.
    pub timezone: Tz,
    /// The first `LastSync` of a controller (no watermark yet) is this far back.
    pub lookback_hours: u32,
    /// `EventCode` → status; codes are tenant-defined (default: 0 = `AccessOk`).
    pub event_codes: BTreeMap<i64, AccessStatus>,
    /// Which Protime person reference a TC-B user id is (overrides the sink's).
    pub protime_person_ref: Option<ProtimePersonRef>,
}

/// Checks of the contents of files the configuration names, for formats another module owns
/// (config itself only checks that such a file exists). They run during validation, so their
/// problems are reported with all the others, under the file's key. `app::load_config` supplies
/// them; without them the contents are not looked at.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileChecks {
    /// `access.people_file`: every problem of the file's text (one per bad line), or none.
    pub people_file: Option<fn(&str) -> Vec<String>>,
}

impl Config {
    /// Read and validate a configuration file, without [`FileChecks`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_checked(path, FileChecks::default())
    }

    /// Read and validate a configuration file, checking the named files' contents with `checks`.
    pub fn load_checked(path: &Path, checks: FileChecks) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![Problem {
                key: "config".into(),
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::parse_checked(&text, path.parent().unwrap_or(Path::new(".")), checks)
    }

    /// Validate configuration text, without [`FileChecks`]. Relative `*_file` paths are
    /// resolved against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Config::parse_checked(text, base_dir, FileChecks::default())
    }

    /// Validate configuration text, checking the named files' contents with `checks`.
    pub fn parse_checked(
        text: &str,
        base_dir: &Path,
        checks: FileChecks,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(vec![Problem {
                key: "config".into(),
                message: format!("not valid TOML: {}", e.message().trim()),
            }])
        })?;
        let mut v = Validator {
            problems: Vec::new(),
            base_dir: base_dir.to_path_buf(),
            checks,
        };
        let known = [
            "agent",
            "http",
            "mqtt",
            "terminals",
            "access",
            "zones",
            "sinks",
            "sources",
        ];
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                v.problem(key, "unknown section");
            }
        }
        let raw_agent: RawAgent = v.section(&table, "agent").unwrap_or_default();
        let raw_http: RawHttp = v.section(&table, "http").unwrap_or_default();
        let raw_mqtt: Option<RawMqtt> = v.section(&table, "mqtt");
        let raw_access: RawAccess = v.section(&table, "access").unwrap_or_default();
        let raw_terminals: Vec<RawTerminal> = v.array(&table, "terminals");
        let raw_zones: Vec<RawZone> = v.array(&table, "zones");
        let sinks = table.get("sinks").and_then(|s| s.as_table());
        let sources = table.get("sources").and_then(|s| s.as_table());
        if let Some(s) = sinks {
            for k in s.keys().filter(|k| k.as_str() != "protime") {
                v.problem(&format!("sinks.{k}"), "unknown sink (known: protime)");
            }
        }
        if let Some(s) = sources {
            for k in s
                .keys()
                .filter(|k| !["crosschex", "aktion"].contains(&k.as_str()))
            {
                v.problem(
                    &format!("sources.{k}"),
                    "unknown source (known: crosschex, aktion)",
                );
            }
        }
        let raw_protime: Option<RawProtime> = sinks.and_then(|s| v.section(s, "sinks.protime"));
        let raw_crosschex: Option<RawCrossChex> =
            sources.and_then(|s| v.section(s, "sources.crosschex"));
        let raw_aktion: Option<RawAktion> = sources.and_then(|s| v.section(s, "sources.aktion"));

        let agent = v.agent(raw_agent);
        let http = v.http(raw_http);
        let mqtt = raw_mqtt.and_then(|m| v.mqtt(m, &agent.site));
        let zones = v.zones(raw_zones);
        let terminals = v.terminals(raw_terminals, agent.timezone, &zones);
        let access = v.access(raw_access);
        if access.site_sync && mqtt.is_none() && !v.has_problem_under("mqtt") {
            v.problem(
                "access.site_sync",
                "needs [mqtt]: gateways share presence through the site's broker",
            );
        }
        let protime = raw_protime.and_then(|p| v.protime(p, agent.timezone));
        let crosschex = raw_crosschex.and_then(|c| v.crosschex(c, agent.timezone));
        let aktion = raw_aktion.and_then(|a| v.aktion(a, agent.timezone));
        if let Some(a) = &aktion {
            for (i, t) in terminals.iter().enumerate() {
                if let Some(c4) = t
                    .aktion_c4
                    .as_ref()
                    .filter(|c| !a.c4_controllers.contains(c))
                {
                    v.problem(
                        &format!("terminals[{i}].aktion_c4"),
                        format!("{c4:?} is not read: add it to sources.aktion.c4_controllers"),
                    );
                }
            }
        }
        if mqtt.is_none() && protime.is_none() && !v.has_problem_under("mqtt") {
            v.problem(
                "mqtt",
                "no sink configured: add [mqtt] (or [sinks.protime]) so clockings leave the gateway",
            );
        }
        if !v.problems.is_empty() {
            return Err(ConfigError(v.problems));
        }
        Ok(Config {
            agent,
            http,
            mqtt,
            terminals,
            access,
            zones,
            sinks: SinksConfig { protime },
            sources: SourcesConfig { crosschex, aktion },
        })
    }

    pub fn terminal(&self, id: &str) -> Option<&TerminalConfig> {
        self.terminals.iter().find(|t| t.id == id)
    }

    /// The names of the sinks every clocking must be delivered to.
    pub fn sink_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.mqtt.is_some() {
            names.push("mqtt");
        }
        if self.sinks.protime.is_some() {
            names.push("protime");
        }
        names
    }
}

/// Every config key the agent reads, as `section.key` (`terminals[].key` for array tables),
/// taken from the structs the file is read into. docs/config.md must list exactly these.
pub fn known_keys() -> Vec<String> {
    use crate::config_keys::fields_of;
    let sections: [(&str, Vec<&str>); 9] = [
        ("agent", fields_of::<RawAgent>()),
        ("http", fields_of::<RawHttp>()),
        ("mqtt", fields_of::<RawMqtt>()),
        ("terminals[]", fields_of::<RawTerminal>()),
        ("access", fields_of::<RawAccess>()),
        ("zones[]", fields_of::<RawZone>()),
        ("sinks.protime", fields_of::<RawProtime>()),
        ("sources.crosschex", fields_of::<RawCrossChex>()),
        ("sources.aktion", fields_of::<RawAktion>()),
    ];
    sections
        .into_iter()
        .flat_map(|(section, fields)| fields.into_iter().map(move |f| format!("{section}.{f}")))
        .collect()
}

// ---- raw forms: exactly the TOML keys, all optional so that validation can name what is missing.

#[derive(Deserialize, Default)]
struct RawAgent {
    site: Option<String>,
    data_dir: Option<PathBuf>,
    timezone: Option<String>,
    store_max_mb: Option<u64>,
    dedupe_days: Option<u32>,
    log_level: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawHttp {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    max_batch: Option<usize>,
    rate_limit_per_sec: Option<u32>,
    header_timeout_secs: Option<u64>,
    body_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
}

#[derive(Deserialize)]
struct RawMqtt {
    url: Option<String>,
    client_id: Option<String>,
    topic_prefix: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    keep_alive_secs: Option<u16>,
    inflight: Option<u16>,
    reconnect_min_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RawTerminal {
    id: Option<String>,
    kind: Option<String>,
    address: Option<String>,
    listen: Option<String>,
    device_id: Option<u32>,
    timezone: Option<String>,
    zone_from: Option<String>,
    zone_to: Option<String>,
    direction: Option<String>,
    crosschex_serial: Option<String>,
    aktion_c4: Option<String>,
    password_file: Option<PathBuf>,
    keepalive_secs: Option<u64>,
    backfill_interval_secs: Option<u64>,
    request_timeout_ms: Option<u64>,
    max_clock_drift_secs: Option<u32>,
    clock_sync_interval_secs: Option<u64>,
    protime_person_ref: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawAccess {
    antipassback: Option<String>,
    people_file: Option<PathBuf>,
    reentry_lockout_secs: Option<u32>,
    forgive_at: Option<String>,
    presence_ttl_hours: Option<u32>,
    site_sync: Option<bool>,
    occupancy_interval_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RawZone {
    name: Option<String>,
    require_shift: Option<bool>,
    shift_tolerance_mins: Option<u32>,
    exit_status: Option<String>,
    allowed_groups: Option<Vec<String>>,
    antipassback: Option<String>,
}

#[derive(Deserialize)]
struct RawProtime {
    base_url: Option<String>,
    token_url: Option<String>,
    allow_insecure_http: Option<bool>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    timezone: Option<String>,
    mirror: Option<bool>,
    mirror_interval_secs: Option<u64>,
    mirror_days: Option<u32>,
    people_interval_secs: Option<u64>,
    retry_max_secs: Option<u64>,
    person_ref: Option<String>,
}

#[derive(Deserialize)]
struct RawCrossChex {
    base_url: Option<String>,
    allow_insecure_http: Option<bool>,
    api_key: Option<String>,
    api_secret_file: Option<PathBuf>,
    timezone: Option<String>,
    poll_interval_secs: Option<u64>,
    request_interval_ms: Option<u64>,
    overlap_mins: Option<u32>,
    lookback_hours: Option<u32>,
    checktime: Option<String>,
    protime_person_ref: Option<String>,
}

#[derive(Deserialize)]
struct RawAktion {
    base_url: Option<String>,
    allow_insecure_http: Option<bool>,
    user_login: Option<String>,
    api_key_file: Option<PathBuf>,
    poll_interval_secs: Option<u64>,
    c4_controllers: Option<Vec<String>>,
    people_interval_secs: Option<u64>,
    shift_days: Option<u32>,
    timezone: Option<String>,
    lookback_hours: Option<u32>,
    event_codes: Option<BTreeMap<String, String>>,
    protime_person_ref: Option<String>,
}

struct Validator {
    problems: Vec<Problem>,
    base_dir: PathBuf,
    checks: FileChecks,
}

impl Validator {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn has_problem_under(&self, prefix: &str) -> bool {
        self.problems.iter().any(|p| p.key.starts_with(prefix))
    }

    /// Deserialize one table, reporting unknown keys and type errors under `path`.
    fn value<T: DeserializeOwned>(&mut self, value: &toml::Value, path: &str) -> Option<T> {
        let mut unknown = Vec::new();
        let result = serde_ignored::deserialize(value.clone(), |p| unknown.push(p.to_string()));
        for k in unknown {
            self.problem(&format!("{path}.{k}"), "unknown key");
        }
        match result {
            Ok(t) => Some(t),
            Err(e) => {
                // toml names the offending key after the message: "...\nin `x`".
                let msg = e.to_string();
                let (text, key) = match msg.rsplit_once("\nin `") {
                    Some((text, rest)) => (
                        text.trim(),
                        format!("{path}.{}", rest.trim_end().trim_end_matches('`')),
                    ),
                    None => (msg.trim(), path.to_owned()),
                };
                let msg = text;
                self.problem(&key, msg.to_owned());
                None
            }
        }
    }

    fn section<T: DeserializeOwned>(&mut self, table: &toml::Table, path: &str) -> Option<T> {
        let name = path.rsplit('.').next().unwrap_or(path);
        let value = table.get(name)?;
        if !value.is_table() {
            self.problem(path, "must be a table");
            return None;
        }
        self.value(value, path)
    }

    fn array<T: DeserializeOwned>(&mut self, table: &toml::Table, name: &str) -> Vec<T> {
        let Some(value) = table.get(name) else {
            return Vec::new();
        };
        let Some(items) = value.as_array() else {
            self.problem(name, format!("must be an array of tables ([[{name}]])"));
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.value(item, &format!("{name}[{i}]")))
            .collect()
    }

    fn timezone(&mut self, key: &str, value: Option<String>, default: Tz) -> Tz {
        match value {
            None => default,
            Some(name) => name.parse::<Tz>().unwrap_or_else(|_| {
                self.problem(
                    key,
                    format!("unknown time zone {name:?} (expected an IANA name such as \"Europe/Brussels\")"),
                );
                default
            }),
        }
    }

    fn person_ref(&mut self, key: &str, value: Option<String>) -> Option<ProtimePersonRef> {
        let value = value?;
        let parsed = ProtimePersonRef::parse(&value);
        if parsed.is_none() {
            self.problem(
                key,
                format!("{value:?} is not a person reference (expected \"badge-number\" or \"employee-number\")"),
            );
        }
        parsed
    }

    fn required(&mut self, key: &str, value: Option<String>) -> String {
        match value {
            Some(s) if !s.trim().is_empty() => s,
            Some(_) => {
                self.problem(key, "must not be empty");
                String::new()
            }
            None => {
                self.problem(key, "missing (required)");
                String::new()
            }
        }
    }

    fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!(
                        "{value:?} is not an address (expected IP:PORT, e.g. \"127.0.0.1:8780\")"
                    ),
                );
                None
            }
        }
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    /// Read a secret from its file; surrounding white space (a trailing newline) is not part of it.
    fn secret(&mut self, key: &str, path: Option<PathBuf>) -> Option<Secret> {
        let Some(path) = path else {
            self.problem(key, "missing (required: a file holding the secret)");
            return None;
        };
        let path = self.resolve(path);
        // A secret is a small regular file (a systemd credential): a device or pipe (/dev/zero)
        // would block or exhaust memory, a huge file is a mistake.
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_file() => {
                self.problem(key, format!("{} is not a regular file", path.display()));
                return None;
            }
            Ok(m) if m.len() > MAX_SECRET_BYTES => {
                self.problem(
                    key,
                    format!(
                        "{} is {} bytes; a secret file holds at most {MAX_SECRET_BYTES}",
                        path.display(),
                        m.len()
                    ),
                );
                return None;
            }
            _ => {}
        }
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => {
                self.problem(key, format!("{} is empty", path.display()));
                None
            }
            Ok(s) => Some(Secret(s.trim().to_owned())),
            Err(e) => {
                self.problem(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn existing_file(&mut self, key: &str, path: Option<PathBuf>) -> Option<PathBuf> {
        let path = self.resolve(path?);
        if !path.is_file() {
            self.problem(key, format!("{} does not exist", path.display()));
        }
        Some(path)
    }

    /// A cloud URL: `https://`, or `http://` only where `<section>.allow_insecure_http` says so
    /// (a fake cloud on loopback): over plain HTTP the secrets and badge data travel in clear.
    fn http_url(
        &mut self,
        section: &str,
        field: &str,
        value: Option<String>,
        allow_insecure: bool,
    ) -> String {
        let key = format!("{section}.{field}");
        let url = self.required(&key, value);
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            _ if url.is_empty() => {}
            Some("https") => {}
            Some("http") if allow_insecure => {}
            Some("http") => self.problem(
                &key,
                format!(
                    "http:// sends the credentials and clockings in clear; use https:// or set {section}.allow_insecure_http = true"
                ),
            ),
            _ => self.problem(&key, format!("{url:?} is not an https:// URL")),
        }
        url
    }

    fn agent(&mut self, raw: RawAgent) -> AgentConfig {
        let site = self.required("agent.site", raw.site);
        if !site.is_empty() && !is_topic_safe(&site) {
            self.problem(
                "agent.site",
                format!("{site:?} may only hold letters, digits, '-', '_' and '.' (it is part of MQTT topics)"),
            );
        }
        let timezone = self.timezone("agent.timezone", raw.timezone, Tz::UTC);
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            self.problem(
                "agent.log_level",
                format!("{log_level:?} is not one of error, warn, info, debug, trace"),
            );
        }
        if raw.store_max_mb == Some(0) {
            self.problem("agent.store_max_mb", "must be at least 1");
        }
        AgentConfig {
            site,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/badgegate")),
            timezone,
            store_max_bytes: raw.store_max_mb.map(|mb| mb * 1024 * 1024),
            dedupe_days: raw.dedupe_days.unwrap_or(30),
            log_level,
        }
    }

    fn http(&mut self, raw: RawHttp) -> HttpConfig {
        let listen = raw.listen.unwrap_or_else(|| "127.0.0.1:8780".into());
        let listen = self
            .addr("http.listen", &listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8780)));
        let max_batch = raw.max_batch.unwrap_or(MAX_BATCH);
        if max_batch == 0 || max_batch > MAX_BATCH {
            self.problem(
                "http.max_batch",
                format!("{max_batch} is out of range (1..={MAX_BATCH})"),
            );
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(1024 * 1024);
        if max_body_bytes < 1024 {
            self.problem("http.max_body_bytes", "must be at least 1024");
        }
        let token = match raw.token_file {
            Some(p) => self.secret("http.token_file", Some(p)),
            None if !listen.ip().is_loopback() => {
                self.problem(
                    "http.token_file",
                    format!("required when http.listen ({listen}) is not a loopback address: anyone on the network could post clockings"),
                );
                None
            }
            None => None,
        };
        HttpConfig {
            listen,
            token,
            max_body_bytes,
            max_batch,
            rate_limit_per_sec: raw.rate_limit_per_sec.unwrap_or(100),
            header_timeout: std::time::Duration::from_secs(self.bounded(
                "http.header_timeout_secs",
                raw.header_timeout_secs,
                10,
                1..=3600,
            )),
            body_timeout: std::time::Duration::from_secs(self.bounded(
                "http.body_timeout_secs",
                raw.body_timeout_secs,
                30,
                1..=3600,
            )),
            max_connections: self.bounded(
                "http.max_connections",
                raw.max_connections,
                256,
                1..=65_536,
            ),
        }
    }

    fn mqtt(&mut self, raw: RawMqtt, site: &str) -> Option<MqttConfig> {
        let url = self.required("mqtt.url", raw.url);
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url.as_str()));
        let tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => {
                if !url.is_empty() {
                    self.problem(
                        "mqtt.url",
                        format!("unsupported scheme {scheme:?} (expected mqtt or mqtts)"),
                    );
                }
                false
            }
        };
        let hostport = rest.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) => (h.trim_matches(['[', ']']).to_owned(), p),
                Err(_) => {
                    self.problem("mqtt.url", format!("bad port {p:?}"));
                    (h.to_owned(), 0)
                }
            },
            None => (hostport.to_owned(), if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() && !url.is_empty() {
            self.problem("mqtt.url", "missing host");
        }
        let topic_prefix = raw.topic_prefix.unwrap_or_else(|| "badgegate".into());
        if topic_prefix.is_empty() || topic_prefix.contains(['+', '#']) {
            self.problem(
                "mqtt.topic_prefix",
                "must be non-empty and must not contain '+' or '#'",
            );
        }
        let password = match raw.password_file {
            Some(p) => self.secret("mqtt.password_file", Some(p)),
            None => None,
        };
        if password.is_some() && raw.username.is_none() {
            self.problem(
                "mqtt.username",
                "missing: password_file is set without a username",
            );
        }
        let inflight = raw.inflight.unwrap_or(256);
        if inflight == 0 || inflight > 10_000 {
            self.problem(
                "mqtt.inflight",
                format!("{inflight} is out of range (1..=10000)"),
            );
        }
        let keep_alive_secs = raw.keep_alive_secs.unwrap_or(30);
        if keep_alive_secs < 5 {
            self.problem("mqtt.keep_alive_secs", "must be at least 5");
        }
        let reconnect_min_ms = raw.reconnect_min_ms.unwrap_or(500);
        let reconnect_max_ms = raw.reconnect_max_ms.unwrap_or(30_000);
        if reconnect_min_ms == 0 || reconnect_min_ms > reconnect_max_ms {
            self.problem(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and not above mqtt.reconnect_max_ms",
            );
        }
        let ca_file = self.existing_file("mqtt.ca_file", raw.ca_file);
        let client_cert_file = self.existing_file("mqtt.client_cert_file", raw.client_cert_file);
        let client_key_file = self.existing_file("mqtt.client_key_file", raw.client_key_file);
        if client_cert_file.is_some() != client_key_file.is_some() {
            self.problem(
                "mqtt.client_key_file",
                "client_cert_file and client_key_file go together",
            );
        }
        Some(MqttConfig {
            url,
            host,
            port,
            tls,
            client_id: raw.client_id.unwrap_or_else(|| format!("badgegate-{site}")),
            topic_prefix,
            username: raw.username,
            password,
            ca_file,
            client_cert_file,
            client_key_file,
            keep_alive_secs,
            inflight,
            reconnect_min_ms,
            reconnect_max_ms,
        })
    }

    fn zones(&mut self, raw: Vec<RawZone>) -> Vec<ZoneConfig> {
        let mut seen = HashSet::new();
        let mut zones = Vec::new();
        for (i, z) in raw.into_iter().enumerate() {
            let key = format!("zones[{i}].name");
            let name = self.required(&key, z.name);
            if name == "outside" {
                self.problem(&key, "\"outside\" is implicit and cannot be declared");
            } else if !name.is_empty() && !is_topic_safe(&name) {
                self.problem(&key, "may only hold letters, digits, '-', '_' and '.'");
            } else if !name.is_empty() && !seen.insert(name.clone()) {
                self.problem(&key, format!("zone {name:?} declared twice"));
            }
            let k = |f: &str| format!("zones[{i}].{f}");
            let exit_status = match z.exit_status.as_deref() {
                None => None,
                Some(s) => match s.parse::<AccessStatus>() {
                    Ok(st @ (AccessStatus::OutZone | AccessStatus::AccessOk)) => Some(st),
                    _ => {
                        self.problem(
                            &k("exit_status"),
                            format!("{s:?} is not an exit status (expected OutZone or AccessOk)"),
                        );
                        None
                    }
                },
            };
            let antipassback = z
                .antipassback
                .as_deref()
                .map(|a| self.antipassback(&k("antipassback"), a));
            let tolerance = z.shift_tolerance_mins.unwrap_or(0);
            if tolerance > 24 * 60 {
                self.problem(&k("shift_tolerance_mins"), "must be at most 1440 (a day)");
            }
            let allowed_groups = z.allowed_groups.unwrap_or_default();
            if allowed_groups.iter().any(|g| g.trim().is_empty()) {
                self.problem(&k("allowed_groups"), "a group name must not be empty");
            }
            zones.push(ZoneConfig {
                name,
                require_shift: z.require_shift.unwrap_or(false),
                shift_tolerance: chrono::Duration::minutes(i64::from(tolerance)),
                exit_status,
                allowed_groups,
                antipassback,
            });
        }
        zones
    }

    fn antipassback(&mut self, key: &str, value: &str) -> AntiPassback {
        match value {
            "off" => AntiPassback::Off,
            "soft" => AntiPassback::Soft,
            "hard" => AntiPassback::Hard,
            other => {
                self.problem(key, format!("{other:?} is not one of off, soft, hard"));
                AntiPassback::Off
            }
        }
    }

    fn terminals(
        &mut self,
        raw: Vec<RawTerminal>,
        default_tz: Tz,
        zones: &[ZoneConfig],
    ) -> Vec<TerminalConfig> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, t) in raw.into_iter().enumerate() {
            let k = |f: &str| format!("terminals[{i}].{f}");
            let id = self.required(&k("id"), t.id);
            if !id.is_empty() && !is_topic_safe(&id) {
                self.problem(
                    &k("id"),
                    format!("{id:?} may only hold letters, digits, '-', '_' and '.' (it is part of MQTT topics)"),
                );
            } else if !id.is_empty() && !seen.insert(id.clone()) {
                self.problem(&k("id"), format!("terminal {id:?} declared twice"));
            }
            let kind = match t.kind.as_deref() {
                Some("anviz") => TerminalKind::Anviz,
                Some("http") | None => TerminalKind::Http,
                Some(other) => {
                    self.problem(
                        &k("kind"),
                        format!("unknown kind {other:?} (expected anviz or http)"),
                    );
                    TerminalKind::Http
                }
            };
            let anviz = match (kind, t.address, t.listen) {
                (TerminalKind::Anviz, Some(_), Some(_)) => {
                    self.problem(&k("listen"), "set either address or listen, not both");
                    None
                }
                (TerminalKind::Anviz, Some(a), None) => {
                    self.addr(&k("address"), &a).map(AnvizMode::Connect)
                }
                (TerminalKind::Anviz, None, Some(l)) => {
                    self.addr(&k("listen"), &l).map(AnvizMode::Listen)
                }
                (TerminalKind::Anviz, None, None) => {
                    self.problem(
                        &k("address"),
                        "missing: an anviz terminal needs address (agent connects) or listen (terminal connects)",
                    );
                    None
                }
                (TerminalKind::Http, a, l) => {
                    if a.is_some() || l.is_some() {
                        self.problem(
                            &k("kind"),
                            "address/listen are for kind = \"anviz\"; an http terminal pushes to the ingest API",
                        );
                    }
                    None
                }
            };
            let timezone = self.timezone(&k("timezone"), t.timezone, default_tz);
            for (field, zone) in [("zone_from", &t.zone_from), ("zone_to", &t.zone_to)] {
                if let Some(z) = zone {
                    if z != "outside" && !zones.iter().any(|d| &d.name == z) {
                        self.problem(
                            &k(field),
                            format!("zone {z:?} is not declared in [[zones]]"),
                        );
                    }
                }
            }
            if t.zone_from.is_some() != t.zone_to.is_some() {
                self.problem(&k("zone_to"), "zone_from and zone_to go together");
            } else if t.zone_from.is_some() && t.zone_from == t.zone_to {
                self.problem(
                    &k("zone_to"),
                    "must differ from zone_from (a terminal moves people between two zones)",
                );
            }
            let direction = match t.direction.as_deref() {
                None => None,
                Some(d) => match d.parse::<Direction>() {
                    Ok(d) => Some(d),
                    Err(()) => {
                        self.problem(
                            &k("direction"),
                            format!("{d:?} is not one of in, out, unknown"),
                        );
                        None
                    }
                },
            };
            let crosschex_serial = self.cloud_id(&k("crosschex_serial"), t.crosschex_serial);
            let aktion_c4 = self.cloud_id(&k("aktion_c4"), t.aktion_c4);
            let password = t
                .password_file
                .and_then(|p| self.secret(&k("password_file"), Some(p)));
            if let Some(p) = &password {
                if kind != TerminalKind::Anviz {
                    self.problem(&k("password_file"), "is for kind = \"anviz\"");
                } else if let Err(e) =
                    crate::terminals::anviz::codec::ConnectionPassword::new(p.expose()).encode()
                {
                    self.problem(&k("password_file"), e.to_string());
                }
            }
            let protime_person_ref =
                self.person_ref(&k("protime_person_ref"), t.protime_person_ref);
            let d = LinkTiming::default();
            let secs = |v: Option<u64>, default: std::time::Duration| {
                v.map_or(default, std::time::Duration::from_secs)
            };
            let link = LinkTiming {
                keepalive: secs(t.keepalive_secs, d.keepalive),
                backfill_interval: secs(t.backfill_interval_secs, d.backfill_interval),
                request_timeout: t
                    .request_timeout_ms
                    .map_or(d.request_timeout, std::time::Duration::from_millis),
                max_clock_drift_secs: t.max_clock_drift_secs.unwrap_or(d.max_clock_drift_secs),
                clock_sync_interval: secs(t.clock_sync_interval_secs, d.clock_sync_interval),
            };
            for (field, v) in [
                ("keepalive_secs", link.keepalive),
                ("backfill_interval_secs", link.backfill_interval),
                ("request_timeout_ms", link.request_timeout),
                ("clock_sync_interval_secs", link.clock_sync_interval),
            ] {
                if v.is_zero() {
                    self.problem(&k(field), "must be greater than 0");
                }
            }
            out.push(TerminalConfig {
                id,
                kind,
                anviz,
                device_id: t.device_id.unwrap_or(0),
                timezone,
                zone_from: t.zone_from,
                zone_to: t.zone_to,
                direction,
                link,
                crosschex_serial,
                aktion_c4,
                password,
                protime_person_ref,
            });
        }
        // One device belongs to one terminal.
        let mut claimed = HashSet::new();
        for (i, t) in out.iter().enumerate() {
            for (field, device) in [
                ("crosschex_serial", &t.crosschex_serial),
                ("aktion_c4", &t.aktion_c4),
            ] {
                if let Some(d) = device {
                    if !claimed.insert((field, d.clone())) {
                        self.problem(
                            &format!("terminals[{i}].{field}"),
                            format!("{d:?} is already another terminal's"),
                        );
                    }
                }
            }
        }
        out
    }

    /// A vendor's device name a terminal claims: trimmed, not empty.
    fn cloud_id(&mut self, key: &str, value: Option<String>) -> Option<String> {
        let v = value?.trim().to_owned();
        if v.is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(v)
    }

    /// A count that must lie in `range`; `default` when absent.
    fn bounded<T: PartialOrd + Copy + fmt::Display>(
        &mut self,
        key: &str,
        value: Option<T>,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> T {
        let v = value.unwrap_or(default);
        if !range.contains(&v) {
            self.problem(
                key,
                format!("{v} is out of range ({}..={})", range.start(), range.end()),
            );
        }
        v
    }

    fn access(&mut self, raw: RawAccess) -> AccessConfig {
        let antipassback = raw.antipassback.as_deref().map_or(AntiPassback::Off, |a| {
            self.antipassback("access.antipassback", a)
        });
        let people_file = self.existing_file("access.people_file", raw.people_file);
        let check = self.checks.people_file;
        if let (Some(path), Some(check)) = (people_file.as_deref().filter(|p| p.is_file()), check) {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for e in check(&text).iter().take(10) {
                        self.problem("access.people_file", format!("{}: {e}", path.display()));
                    }
                }
                Err(e) => self.problem(
                    "access.people_file",
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
        }
        let forgive_at = raw.forgive_at.and_then(|t| {
            let parsed = chrono::NaiveTime::parse_from_str(&t, "%H:%M");
            if parsed.is_err() {
                self.problem(
                    "access.forgive_at",
                    format!("{t:?} is not a local time HH:MM (e.g. \"03:00\")"),
                );
            }
            parsed.ok()
        });
        if raw.presence_ttl_hours == Some(0) {
            self.problem(
                "access.presence_ttl_hours",
                "must be at least 1 (leave it out for presence that never expires)",
            );
        }
        let occupancy_interval_ms = raw.occupancy_interval_ms.unwrap_or(1000);
        if !(50..=3_600_000).contains(&occupancy_interval_ms) {
            self.problem(
                "access.occupancy_interval_ms",
                format!("{occupancy_interval_ms} is out of range (50..=3600000)"),
            );
        }
        AccessConfig {
            antipassback,
            people_file,
            reentry_lockout: chrono::Duration::seconds(i64::from(
                raw.reentry_lockout_secs.unwrap_or(0),
            )),
            forgive_at,
            presence_ttl: raw
                .presence_ttl_hours
                .filter(|h| *h > 0)
                .map(|h| chrono::Duration::hours(i64::from(h))),
            site_sync: raw.site_sync.unwrap_or(false),
            occupancy_interval: std::time::Duration::from_millis(occupancy_interval_ms),
        }
    }

    fn protime(&mut self, raw: RawProtime, default_tz: Tz) -> Option<ProtimeConfig> {
        let insecure = raw.allow_insecure_http.unwrap_or(false);
        let base_url = self.http_url("sinks.protime", "base_url", raw.base_url, insecure);
        let token_url = self.http_url("sinks.protime", "token_url", raw.token_url, insecure);
        let client_id = self.required("sinks.protime.client_id", raw.client_id);
        let client_secret = self.secret("sinks.protime.client_secret_file", raw.client_secret_file);
        let timezone = self.timezone("sinks.protime.timezone", raw.timezone, default_tz);
        let mirror_interval_secs = self.bounded(
            "sinks.protime.mirror_interval_secs",
            raw.mirror_interval_secs,
            60,
            1..=86_400,
        );
        let mirror_days = self.bounded("sinks.protime.mirror_days", raw.mirror_days, 7, 1..=365);
        let people_interval_secs = self.bounded(
            "sinks.protime.people_interval_secs",
            raw.people_interval_secs,
            3600,
            1..=604_800,
        );
        let retry_max_secs = self.bounded(
            "sinks.protime.retry_max_secs",
            raw.retry_max_secs,
            60,
            1..=3600,
        );
        let person_ref = self
            .person_ref("sinks.protime.person_ref", raw.person_ref)
            .unwrap_or_default();
        Some(ProtimeConfig {
            base_url,
            token_url,
            client_id,
            client_secret: client_secret?,
            timezone,
            mirror: raw.mirror.unwrap_or(false),
            mirror_interval_secs,
            mirror_days,
            people_interval_secs,
            retry_max_secs,
            person_ref,
        })
    }

    fn crosschex(&mut self, raw: RawCrossChex, default_tz: Tz) -> Option<CrossChexConfig> {
        let insecure = raw.allow_insecure_http.unwrap_or(false);
        let base_url = self.http_url("sources.crosschex", "base_url", raw.base_url, insecure);
        let api_key = self.required("sources.crosschex.api_key", raw.api_key);
        let api_secret = self.secret("sources.crosschex.api_secret_file", raw.api_secret_file);
        let timezone = self.timezone("sources.crosschex.timezone", raw.timezone, default_tz);
        let poll_interval_secs = self.bounded(
            "sources.crosschex.poll_interval_secs",
            raw.poll_interval_secs,
            60,
            1..=86_400,
        );
        let request_interval_ms = self.bounded(
            "sources.crosschex.request_interval_ms",
            raw.request_interval_ms,
            15_000,
            10..=600_000,
        );
        let overlap_mins = self.bounded(
            "sources.crosschex.overlap_mins",
            raw.overlap_mins,
            120,
            0..=1440,
        );
        let lookback_hours = self.bounded(
            "sources.crosschex.lookback_hours",
            raw.lookback_hours,
            24,
            1..=8760,
        );
        let checktime = match raw.checktime.as_deref().map(str::trim) {
            None | Some("local") => CheckTime::Local,
            Some("utc") => CheckTime::Utc,
            Some(other) => {
                self.problem(
                    "sources.crosschex.checktime",
                    format!(
                        "{other:?} is not a reading of checktime (expected \"local\" or \"utc\")"
                    ),
                );
                CheckTime::Local
            }
        };
        let protime_person_ref = self.person_ref(
            "sources.crosschex.protime_person_ref",
            raw.protime_person_ref,
        );
        Some(CrossChexConfig {
            base_url,
            api_key,
            api_secret: api_secret?,
            timezone,
            poll_interval_secs,
            request_interval_ms,
            overlap_mins,
            lookback_hours,
            checktime,
            protime_person_ref,
        })
    }

    fn aktion(&mut self, raw: RawAktion, default_tz: Tz) -> Option<AktionConfig> {
        let insecure = raw.allow_insecure_http.unwrap_or(false);
        let base_url = self.http_url("sources.aktion", "base_url", raw.base_url, insecure);
        let user_login = self.required("sources.aktion.user_login", raw.user_login);
        let api_key = self.secret("sources.aktion.api_key_file", raw.api_key_file);
        let poll_interval_secs = self.bounded(
            "sources.aktion.poll_interval_secs",
            raw.poll_interval_secs,
            60,
            1..=86_400,
        );
        let people_interval_secs = self.bounded(
            "sources.aktion.people_interval_secs",
            raw.people_interval_secs,
            3600,
            1..=604_800,
        );
        let shift_days = self.bounded("sources.aktion.shift_days", raw.shift_days, 2, 1..=31);
        let timezone = self.timezone("sources.aktion.timezone", raw.timezone, default_tz);
        let lookback_hours = self.bounded(
            "sources.aktion.lookback_hours",
            raw.lookback_hours,
            24,
            1..=8760,
        );
        let mut event_codes = BTreeMap::from([(0, AccessStatus::AccessOk)]);
        for (code, status) in raw.event_codes.unwrap_or_default() {
            let key = format!("sources.aktion.event_codes.{code}");
            match (code.trim().parse::<i64>(), status.parse::<AccessStatus>()) {
                (Ok(c), Ok(s)) => {
                    event_codes.insert(c, s);
                }
                (Err(_), _) => self.problem(&key, "the key must be an integer EventCode"),
                (_, Err(())) => self.problem(
                    &key,
                    format!("{status:?} is not a status (AccessOk, AccessRefused, ...)"),
                ),
            }
        }
        let mut c4_controllers: Vec<String> = Vec::new();
        for (i, c4) in raw
            .c4_controllers
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let key = format!("sources.aktion.c4_controllers[{i}]");
            let c4 = c4.trim().to_owned();
            if c4.is_empty() {
                self.problem(&key, "must not be empty");
            } else if c4_controllers.contains(&c4) {
                self.problem(&key, format!("{c4:?} is listed twice"));
            } else {
                c4_controllers.push(c4);
            }
        }
        let protime_person_ref =
            self.person_ref("sources.aktion.protime_person_ref", raw.protime_person_ref);
        Some(AktionConfig {
            base_url,
            user_login,
            api_key: api_key?,
            poll_interval_secs,
            c4_controllers,
            people_interval_secs,
            shift_days,
            timezone,
            lookback_hours,
            event_codes,
            protime_person_ref,
        })
    }
}

/// Names that become MQTT topic levels or store keys.
pub(crate) fn is_topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/nonexistent"))
    }

    fn keys(err: ConfigError) -> Vec<String> {
        err.0.into_iter().map(|p| p.key).collect()
    }

    const MINIMAL: &str = r#"
        [agent]
        site = "plant-1"
        data_dir = "/tmp/x"
        timezone = "Europe/Brussels"
        [mqtt]
        url = "mqtt://127.0.0.1:1883"
        [[terminals]]
        id = "gate-north"
        kind = "http"
    "#;

    #[test]
    fn minimal_config_is_valid_with_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.agent.site, "plant-1");
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8780");
        let m = c.mqtt.unwrap();
        assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 1883));
        assert_eq!(m.client_id, "badgegate-plant-1");
        assert_eq!(m.topic_prefix, "badgegate");
        assert_eq!(c.terminals[0].timezone, chrono_tz::Europe::Brussels);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = parse(
            r#"
            [agent]
            timezone = "Mars/Olympus"
            [http]
            listen = "nowhere"
            [mqtt]
            url = "htp://broker"
            bogus = 1
            [[terminals]]
            id = "a"
            kind = "anviz"
            [[terminals]]
            id = "a"
            kind = "teleport"
            device_id = "seven"
            "#,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(r#"mqtt.url: unsupported scheme "htp" (expected mqtt or mqtts)"#),
            "{msg}"
        );
        let k = keys(err);
        for want in [
            "agent.site",
            "agent.timezone",
            "http.listen",
            "mqtt.url",
            "mqtt.bogus",
            "terminals[0].address",
            "terminals[1].device_id",
        ] {
            assert!(k.contains(&want.to_string()), "missing {want} in {k:?}");
        }
    }

    #[test]
    fn duplicate_terminal_and_unknown_kind() {
        let err = parse(&format!(
            "{MINIMAL}\n[[terminals]]\nid = \"gate-north\"\nkind = \"teleport\"\n"
        ))
        .unwrap_err();
        let k = keys(err);
        assert!(k.contains(&"terminals[1].id".to_string()));
        assert!(k.contains(&"terminals[1].kind".to_string()));
    }

    #[test]
    fn zones_must_be_declared() {
        let err = parse(&format!(
            "{MINIMAL}\n[[terminals]]\nid = \"t2\"\nzone_from = \"outside\"\nzone_to = \"lab\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(err), vec!["terminals[1].zone_to".to_string()]);
    }

    #[test]
    fn secrets_come_from_files_and_are_not_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "hunter2\n").unwrap();
        let text = MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1883\"\nusername = \"u\"\npassword_file = \"pw\"",
        );
        let c = Config::parse(&text, dir.path()).unwrap();
        let m = c.mqtt.unwrap();
        assert_eq!(m.password.as_ref().unwrap().expose(), "hunter2");
        assert!(!format!("{m:?}").contains("hunter2"));

        let err = parse(&text).unwrap_err();
        assert_eq!(keys(err), vec!["mqtt.password_file".to_string()]);

        // A device (it would never end) and an oversized file are refused, naming the key.
        for (path, why) in [
            ("/dev/zero".to_owned(), "not a regular file"),
            ("big".to_owned(), "at most 65536"),
        ] {
            std::fs::write(dir.path().join("big"), vec![b'x'; 70_000]).unwrap();
            let text = text.replace(
                "password_file = \"pw\"",
                &format!("password_file = {path:?}"),
            );
            let err = Config::parse(&text, dir.path()).unwrap_err();
            assert_eq!(err.0.len(), 1, "{:?}", err.0);
            assert_eq!(err.0[0].key, "mqtt.password_file");
            assert!(err.0[0].message.contains(why), "{:?}", err.0);
        }
    }

    #[test]
    fn syntax_error_is_one_clear_problem() {
        let err = parse("[agent\nsite=").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.to_string().starts_with("config: not valid TOML"));
    }

    #[test]
    fn an_api_off_loopback_requires_a_token() {
        let open = MINIMAL.replace("[mqtt]", "[http]\nlisten = \"0.0.0.0:8780\"\n[mqtt]");
        assert_eq!(
            keys(parse(&open).unwrap_err()),
            vec!["http.token_file".to_string()]
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        let with = open.replace(
            "listen = \"0.0.0.0:8780\"",
            "listen = \"0.0.0.0:8780\"\ntoken_file = \"token\"",
        );
        let c = Config::parse(&with, dir.path()).unwrap();
        assert_eq!(c.http.token.unwrap().expose(), "s3cret");
    }

    #[test]
    fn http_hardening_defaults_and_bounds() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.http.header_timeout, std::time::Duration::from_secs(10));
        assert_eq!(c.http.body_timeout, std::time::Duration::from_secs(30));
        assert_eq!(c.http.max_connections, 256);
        let zero = MINIMAL.replace(
            "[mqtt]",
            "[http]\nheader_timeout_secs = 0\nbody_timeout_secs = 0\nmax_connections = 0\n[mqtt]",
        );
        assert_eq!(
            keys(parse(&zero).unwrap_err()),
            [
                "http.header_timeout_secs",
                "http.body_timeout_secs",
                "http.max_connections"
            ]
        );
    }

    /// The three clouds with every URL on `scheme`, plus `extra` in each cloud section.
    fn clouds_over(scheme: &str, extra: &str) -> String {
        format!(
            r#"
            [sinks.protime]
            base_url = "{scheme}://t.myprotime.eu/api/v1"
            token_url = "{scheme}://auth/tenants/t/connect/token"
            client_id = "c"
            client_secret_file = "s"
            {extra}
            [sources.crosschex]
            base_url = "{scheme}://api.eu.crosschexcloud.com/"
            api_key = "k"
            api_secret_file = "s"
            {extra}
            [sources.aktion]
            base_url = "{scheme}://cloud.aktion.cz/api/"
            user_login = "u"
            api_key_file = "s"
            {extra}
            "#
        )
    }

    #[test]
    fn cloud_urls_must_be_https_unless_insecure_http_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "s3cret\n").unwrap();
        let check = |scheme: &str, extra: &str| {
            Config::parse(
                &format!("{MINIMAL}{}", clouds_over(scheme, extra)),
                dir.path(),
            )
        };
        assert!(check("https", "").is_ok());
        let err = check("http", "").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sinks.protime.base_url: http:// sends the credentials and clockings in clear; use https:// or set sinks.protime.allow_insecure_http = true"),
            "{msg}"
        );
        assert_eq!(
            keys(err),
            [
                "sinks.protime.base_url",
                "sinks.protime.token_url",
                "sources.crosschex.base_url",
                "sources.aktion.base_url"
            ]
        );
        assert!(check("http", "allow_insecure_http = true").is_ok());
        // The flag allows plain HTTP, nothing else.
        let err = check("ftp", "allow_insecure_http = true").unwrap_err();
        assert!(
            err.to_string().contains(
                r#"sources.aktion.base_url: "ftp://cloud.aktion.cz/api/" is not an https:// URL"#
            ),
            "{err}"
        );
    }

    /// Two cloud sources, their terminals and the Protime sink (secrets in files cc, ak, pt).
    const CLOUDS: &str = r#"
            [[terminals]]
            id = "door-cc"
            crosschex_serial = "1750120622290025"
            [[terminals]]
            id = "door-ak"
            aktion_c4 = "C4-1"
            [sinks.protime]
            base_url = "https://t.myprotime.eu/connector/protimeapi/api/v1"
            token_url = "https://auth/tenants/t/connect/token"
            client_id = "c"
            client_secret_file = "pt"
            mirror = true
            [sources.crosschex]
            base_url = "https://api.eu.crosschexcloud.com/"
            api_key = "k"
            api_secret_file = "cc"
            [sources.aktion]
            base_url = "https://cloud.aktion.cz/api/"
            user_login = "u"
            api_key_file = "ak"
            c4_controllers = ["C4-1", "C4-2"]
        "#;

    #[test]
    fn cloud_sources_and_their_terminals() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["cc", "ak", "pt"] {
            std::fs::write(dir.path().join(f), "s3cret\n").unwrap();
        }
        let c = Config::parse(&format!("{MINIMAL}{CLOUDS}"), dir.path()).unwrap();
        let cc = c.sources.crosschex.unwrap();
        assert_eq!(
            (
                cc.poll_interval_secs,
                cc.request_interval_ms,
                cc.overlap_mins,
                cc.lookback_hours
            ),
            (60, 15_000, 120, 24)
        );
        assert_eq!(cc.timezone, chrono_tz::Europe::Brussels, "agent.timezone");
        let ak = c.sources.aktion.unwrap();
        assert_eq!(ak.c4_controllers, ["C4-1", "C4-2"]);
        assert_eq!((ak.people_interval_secs, ak.shift_days), (3600, 2));
        let pt = c.sinks.protime.unwrap();
        assert_eq!(
            (
                pt.mirror_interval_secs,
                pt.mirror_days,
                pt.people_interval_secs,
                pt.retry_max_secs
            ),
            (60, 7, 3600, 60)
        );
        assert_eq!(
            c.terminals[1].crosschex_serial.as_deref(),
            Some("1750120622290025")
        );
        assert_eq!(c.terminals[2].aktion_c4.as_deref(), Some("C4-1"));

        let bad = format!("{MINIMAL}{CLOUDS}")
            .replace("aktion_c4 = \"C4-1\"", "aktion_c4 = \"C4-9\"")
            .replace(
                "api_key = \"k\"",
                "api_key = \"k\"\nrequest_interval_ms = 1\nlookback_hours = 0",
            )
            .replace(
                "[\"C4-1\", \"C4-2\"]",
                "[\"C4-1\", \"C4-1\", \" \"]\nshift_days = 40",
            )
            + "[[terminals]]\nid = \"twin\"\ncrosschex_serial = \"1750120622290025\"\n";
        let k = keys(Config::parse(&bad, dir.path()).unwrap_err());
        for want in [
            "terminals[2].aktion_c4",
            "terminals[3].crosschex_serial",
            "sources.crosschex.request_interval_ms",
            "sources.crosschex.lookback_hours",
            "sources.aktion.c4_controllers[1]",
            "sources.aktion.c4_controllers[2]",
            "sources.aktion.shift_days",
        ] {
            assert!(k.contains(&want.to_string()), "missing {want} in {k:?}");
        }
    }

    #[test]
    fn person_refs_and_checktime_default_override_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["cc", "ak", "pt"] {
            std::fs::write(dir.path().join(f), "s3cret\n").unwrap();
        }
        let c = Config::parse(&format!("{MINIMAL}{CLOUDS}"), dir.path()).unwrap();
        let pt = c.sinks.protime.as_ref().unwrap();
        assert_eq!(pt.person_ref, ProtimePersonRef::BadgeNumber);
        let cc = c.sources.crosschex.as_ref().unwrap();
        assert_eq!(cc.checktime, CheckTime::Local, "the documented evidence");
        assert_eq!(cc.protime_person_ref, None);
        assert!(c.terminals.iter().all(|t| t.protime_person_ref.is_none()));

        let set = format!("{MINIMAL}{CLOUDS}")
            .replace(
                "aktion_c4 = \"C4-1\"",
                "aktion_c4 = \"C4-1\"\nprotime_person_ref = \"badge-number\"",
            )
            .replace(
                "mirror = true",
                "mirror = true\nperson_ref = \"@employee-number\"",
            )
            .replace(
                "api_key = \"k\"",
                "api_key = \"k\"\nchecktime = \"utc\"\nprotime_person_ref = \"employee-number\"",
            )
            .replace(
                "user_login = \"u\"",
                "user_login = \"u\"\nprotime_person_ref = \"employee-number\"",
            );
        let c = Config::parse(&set, dir.path()).unwrap();
        let employee = Some(ProtimePersonRef::EmployeeNumber);
        assert_eq!(
            c.sinks.protime.as_ref().unwrap().person_ref,
            ProtimePersonRef::EmployeeNumber,
            "Protime's @ may be written"
        );
        let cc = c.sources.crosschex.as_ref().unwrap();
        assert_eq!(
            (cc.checktime, cc.protime_person_ref),
            (CheckTime::Utc, employee)
        );
        assert_eq!(
            c.sources.aktion.as_ref().unwrap().protime_person_ref,
            employee
        );
        assert_eq!(
            c.terminals[2].protime_person_ref,
            Some(ProtimePersonRef::BadgeNumber)
        );

        let bad = set
            .replace("\"@employee-number\"", "\"badge\"")
            .replace("checktime = \"utc\"", "checktime = \"device\"")
            .replace(
                "protime_person_ref = \"badge-number\"",
                "protime_person_ref = \"id\"",
            );
        let mut k = keys(Config::parse(&bad, dir.path()).unwrap_err());
        k.sort();
        assert_eq!(
            k,
            [
                "sinks.protime.person_ref",
                "sources.crosschex.checktime",
                "terminals[2].protime_person_ref",
            ],
            "{k:?}"
        );
    }

    #[test]
    fn access_settings_are_validated_naming_their_keys() {
        let ok = parse(&format!(
            "{MINIMAL}\n[access]\nantipassback = \"soft\"\nreentry_lockout_secs = 30\nforgive_at = \"03:00\"\npresence_ttl_hours = 16\nsite_sync = true\n[[zones]]\nname = \"lab\"\nexit_status = \"OutZone\"\nallowed_groups = [\"chemists\"]\nrequire_shift = true\nshift_tolerance_mins = 10\nantipassback = \"hard\"\n"
        ))
        .unwrap();
        assert_eq!(ok.access.antipassback, AntiPassback::Soft);
        assert_eq!(ok.access.reentry_lockout.num_seconds(), 30);
        assert_eq!(ok.access.forgive_at.unwrap().to_string(), "03:00:00");
        assert_eq!(ok.access.presence_ttl.unwrap().num_hours(), 16);
        assert!(ok.access.site_sync);
        let lab = &ok.zones[0];
        assert_eq!(lab.exit_status, Some(AccessStatus::OutZone));
        assert_eq!(lab.antipassback, Some(AntiPassback::Hard));
        assert_eq!(lab.shift_tolerance.num_minutes(), 10);

        let err = parse(&format!(
            "{MINIMAL}\n[access]\nantipassback = \"strict\"\nforgive_at = \"3 am\"\npresence_ttl_hours = 0\noccupancy_interval_ms = 1\n[[zones]]\nname = \"lab\"\nexit_status = \"AccessRefused\"\nantipassback = \"sometimes\"\nshift_tolerance_mins = 2000\nallowed_groups = [\"\"]\n[[terminals]]\nid = \"loop\"\nzone_from = \"lab\"\nzone_to = \"lab\"\n"
        ))
        .unwrap_err();
        let mut k = keys(err);
        k.sort();
        assert_eq!(
            k,
            [
                "access.antipassback",
                "access.forgive_at",
                "access.occupancy_interval_ms",
                "access.presence_ttl_hours",
                "terminals[1].zone_to",
                "zones[0].allowed_groups",
                "zones[0].antipassback",
                "zones[0].exit_status",
                "zones[0].shift_tolerance_mins",
            ]
        );
        let no_broker = "[agent]\nsite = \"s\"\n[access]\nsite_sync = true\n[sinks.protime]\n";
        assert!(keys(parse(no_broker).unwrap_err()).contains(&"access.site_sync".to_string()));
    }

    #[test]
    fn file_checks_report_under_the_file_key_with_the_other_problems() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("people.csv"), "badge,person\n1,A\n").unwrap();
        let text = format!("{MINIMAL}\n[access]\npeople_file = \"people.csv\"\n");
        assert!(
            Config::parse(&text, dir.path()).is_ok(),
            "contents unchecked"
        );
        let checks = FileChecks {
            people_file: Some(|text| vec![format!("{} bytes", text.len())]),
        };
        let text = text.replace("plant-1", "plant 1");
        let err = Config::parse_checked(&text, dir.path(), checks).unwrap_err();
        assert_eq!(keys(err.clone()), ["agent.site", "access.people_file"]);
        assert!(err.0[1].message.ends_with("people.csv: 17 bytes"), "{err}");
    }

    #[test]
    fn no_sink_is_a_problem() {
        let err = parse("[agent]\nsite = \"s\"\n").unwrap_err();
        assert_eq!(keys(err), vec!["mqtt".to_string()]);
    }
}
