//! The MQTT connection shared by the sink's delivery link and the access engine's link: both
//! connect to the broker of `[mqtt]` with its keep-alive, TLS and credentials, each with its own
//! client id, and both report connection errors the same way.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;

use crate::config::MqttConfig;

/// The TLS configuration for `mqtt.tls` (None without TLS), built once at start so that a bad
/// CA or key file stops the start.
pub fn tls(cfg: &MqttConfig) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if cfg.tls {
        Ok(Some(Arc::new(tls_config(cfg)?)))
    } else {
        Ok(None)
    }
}

/// A clean-session connection to the configured broker as `client_id`: keep-alive, TLS and
/// credentials from `[mqtt]` (the sink's and the access engine's connections share them).
pub fn connect_options(
    cfg: &MqttConfig,
    client_id: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, &cfg.host, cfg.port);
    o.set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_secs)));
    o.set_clean_session(true);
    if let Some(tls) = tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    if let (Some(user), Some(pw)) = (&cfg.username, &cfg.password) {
        o.set_credentials(user, pw.expose());
    } else if let Some(user) = &cfg.username {
        o.set_credentials(user, "");
    }
    o
}

/// TLS for `mqtts://`: the CA of `mqtt.ca_file` (else the system's bundle), an optional client
/// certificate (mTLS), and the broker's name checked against its certificate (rustls always
/// verifies it; there is deliberately no switch to turn that off).
pub fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    crate::clouds::install_crypto_provider();
    let ca = cfg
        .ca_file
        .clone()
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    let key = if cfg.ca_file.is_some() {
        "mqtt.ca_file"
    } else {
        "mqtt.ca_file (not set: the system bundle)"
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{key}: cannot read certificates from {}: {e}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{key}: no usable CA certificate in {}",
            ca.display()
        ));
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(cert), Some(k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| format!("mqtt.client_cert_file: {}: {e}", cert.display()))?;
            let private = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| format!("mqtt.client_key_file: {}: {e}", k.display()))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| format!("mqtt.client_cert_file / client_key_file: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// A connection error as the operator should read it: what failed and which setting to check.
pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Tls(tls) => format!(
            "TLS handshake failed: {tls} (check mqtt.ca_file, the broker's certificate and that mqtt.url names the host in it)"
        ),
        ConnectionError::Io(io) => format!("network error: {io}"),
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?} (check mqtt.username/password_file)")
        }
        ConnectionError::NetworkTimeout => "connection attempt timed out".into(),
        ConnectionError::FlushTimeout => "writing to the broker timed out".into(),
        other => other.to_string(),
    }
}

/// Drive the event loop, handing every event to `tx`, until the connection fails (the error is
/// the last event) or nobody listens any more.
pub async fn poll_events(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<Result<Event, ConnectionError>>,
) {
    loop {
        let ev = eventloop.poll().await;
        let failed = ev.is_err();
        if tx.send(ev).await.is_err() || failed {
            break;
        }
    }
}
