//! mqtts: TLS with a CA file, client certificates (mTLS), passwords; against a real Mosquitto
//! configured for each, with certificates generated in the test.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use support::*;

const LONG: Duration = Duration::from_secs(60);

struct Pki {
    ca_pem: String,
    other_ca_pem: String,
    server: (String, String),
    /// Signed by the right CA, but for another host name.
    misnamed_server: (String, String),
    client: (String, String),
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p
}

/// A self-signed CA: its PEM and an issuer that signs with it.
fn ca(name: &str) -> (String, rcgen::Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(name);
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(params, key))
}

fn pki() -> Pki {
    let (ca_pem, issuer) = ca("badgegate test CA");
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "badgegate-gateway");
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &issuer).unwrap();
    let misnamed = CertificateParams::new(vec!["elsewhere.example".to_owned()]).unwrap();
    let misnamed_key = KeyPair::generate().unwrap();
    let misnamed_cert = misnamed.signed_by(&misnamed_key, &issuer).unwrap();
    let (other_ca_pem, _) = ca("somebody else's CA");
    Pki {
        ca_pem,
        other_ca_pem,
        server: (server_cert.pem(), server_key.serialize_pem()),
        misnamed_server: (misnamed_cert.pem(), misnamed_key.serialize_pem()),
        client: (client_cert.pem(), client_key.serialize_pem()),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Mosquitto with a TLS listener (and optionally client certificates or passwords required).
fn broker(pki: &Pki, tls_port: u16, require_cert: bool, password: bool) -> Mosquitto {
    broker_with_cert(pki, &pki.server, tls_port, require_cert, password)
}

fn broker_with_cert(
    pki: &Pki,
    server: &(String, String),
    tls_port: u16,
    require_cert: bool,
    password: bool,
) -> Mosquitto {
    let dir = tempfile::tempdir().unwrap().keep();
    let ca = write(&dir, "ca.pem", &pki.ca_pem);
    let cert = write(&dir, "server.pem", &server.0);
    let key = write(&dir, "server.key", &server.1);
    let mut extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate {require_cert}\n"
    );
    if password {
        let pwfile = dir.join("passwd");
        let ok = std::process::Command::new("mosquitto_passwd")
            .args([
                "-c",
                "-b",
                pwfile.to_str().unwrap(),
                "gateway",
                "right-password",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        extra.push_str(&format!(
            "allow_anonymous false\npassword_file {}\n",
            pwfile.display()
        ));
    } else {
        extra.push_str("allow_anonymous true\n");
    }
    let m = Mosquitto::start_with(&extra);
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], tls_port)),
        Duration::from_secs(10),
    );
    m
}

fn mqtt_section(
    dir: &Path,
    tls_port: u16,
    ca_pem: &str,
    client: Option<&(String, String)>,
    password: Option<&str>,
) -> String {
    let ca = write(dir, "agent-ca.pem", ca_pem);
    let mut s = format!("url = \"mqtts://localhost:{tls_port}\"\nca_file = \"{ca}\"\n");
    if let Some((cert, key)) = client {
        let c = write(dir, "client.pem", cert);
        let k = write(dir, "client.key", key);
        s.push_str(&format!(
            "client_cert_file = \"{c}\"\nclient_key_file = \"{k}\"\n"
        ));
    }
    if let Some(pw) = password {
        let f = write(dir, "mqtt-password", pw);
        s.push_str(&format!(
            "username = \"gateway\"\npassword_file = \"{f}\"\n"
        ));
    }
    s
}

/// Start the agent with the [mqtt] section replaced by `mqtt`.
fn agent_with(dir: &Path, mqtt: &str) -> AgentProc {
    let mut agent = AgentProc::start(dir, "mqtt://127.0.0.1:1");
    agent.kill9();
    let cfg = std::fs::read_to_string(&agent.config_path).unwrap();
    let cfg = cfg.replace("url = \"mqtt://127.0.0.1:1\"\n", mqtt);
    std::fs::write(&agent.config_path, cfg).unwrap();
    agent.spawn();
    agent
}

async fn deliver_one(api: &Api, agent: &AgentProc, sub: &mut Subscriber, badge: &str) {
    let (s, b) = api
        .post(
            agent,
            &clocking("gate-1", badge, "2026-05-05T08:00:00+02:00", "in"),
        )
        .await;
    assert_eq!(s, 202);
    let id = b["accepted"][0]["id"].as_str().unwrap().to_owned();
    loop {
        let (_, v, _) = sub
            .next(LONG)
            .await
            .expect("clocking not delivered over TLS");
        if v["id"] == id.as_str() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_ca_file_delivers_and_a_wrong_ca_is_reported_without_loss() {
    let pki = pki();
    let tls_port = free_port();
    let mosquitto = broker(&pki, tls_port, false, false);
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    let api = Api::new();

    // The wrong CA: the handshake fails, the agent says so, clockings wait in the store.
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent_with(
        dir.path(),
        &mqtt_section(dir.path(), tls_port, &pki.other_ca_pem, None, None),
    );
    let (s, b) = api
        .post(
            &agent,
            &clocking("gate-1", "kept", "2026-05-05T07:00:00+02:00", "in"),
        )
        .await;
    assert_eq!(s, 202);
    let kept = b["accepted"][0]["id"].as_str().unwrap().to_owned();
    api.wait_health(&agent, "the TLS failure reported", LONG, |h| {
        h["mqtt"]["connected"] == false
            && h["mqtt"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS handshake failed"))
    })
    .await;
    assert_eq!(api.pending(&agent).await, 1);

    // Fixed: the right CA; the kept clocking and a new one arrive.
    agent.kill9();
    let cfg = std::fs::read_to_string(&agent.config_path).unwrap();
    std::fs::write(dir.path().join("agent-ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(&agent.config_path, cfg).unwrap();
    agent.spawn();
    let (_, v, _) = sub.next(LONG).await.expect("the kept clocking");
    assert_eq!(v["id"], kept.as_str());
    deliver_one(&api, &agent, &mut sub, "after-fix").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate() {
    let pki = pki();
    let tls_port = free_port();
    let mosquitto = broker(&pki, tls_port, true, false);
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    let api = Api::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_with(
        dir.path(),
        &mqtt_section(dir.path(), tls_port, &pki.ca_pem, Some(&pki.client), None),
    );
    deliver_one(&api, &agent, &mut sub, "mtls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_reported_and_nothing_is_lost() {
    let pki = pki();
    let tls_port = free_port();
    let mosquitto = broker(&pki, tls_port, false, true);
    let mut sub = Subscriber::start(mosquitto.addr(), "badgegate/plant-1/clockings/#").await;
    let api = Api::new();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent_with(
        dir.path(),
        &mqtt_section(
            dir.path(),
            tls_port,
            &pki.ca_pem,
            None,
            Some("wrong-password"),
        ),
    );
    api.post(
        &agent,
        &clocking("gate-1", "waiting", "2026-05-05T07:30:00+02:00", "in"),
    )
    .await;
    api.wait_health(&agent, "the refusal reported", LONG, |h| {
        h["mqtt"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused"))
    })
    .await;
    assert!(
        !agent.log().contains("wrong-password"),
        "the password never reaches the log"
    );

    agent.kill9();
    std::fs::write(dir.path().join("mqtt-password"), "right-password\n").unwrap();
    agent.spawn();
    let (_, v, _) = sub.next(LONG).await.expect("the waiting clocking");
    assert_eq!(v["badge"], "waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_name_is_refused() {
    let pki = pki();
    let tls_port = free_port();
    let _mosquitto = broker_with_cert(&pki, &pki.misnamed_server, tls_port, false, false);
    let api = Api::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_with(
        dir.path(),
        &mqtt_section(dir.path(), tls_port, &pki.ca_pem, None, None),
    );
    let (s, _) = api
        .post(
            &agent,
            &clocking("gate-1", "held", "2026-05-05T07:00:00+02:00", "in"),
        )
        .await;
    assert_eq!(s, 202);
    api.wait_health(&agent, "the name mismatch reported", LONG, |h| {
        h["mqtt"]["connected"] == false
            && h["mqtt"]["last_error"].as_str().is_some_and(|e| {
                e.contains("TLS handshake failed") && e.contains("not valid for name")
            })
    })
    .await;
    assert_eq!(api.pending(&agent).await, 1);
}
