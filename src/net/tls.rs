//! TLS for the tunnel (protocol v2): the server's identity (a configured PEM pair or
//! a self-signed certificate generated once into the state dir), its fingerprint,
//! and the client's two ways of trusting it — a pinned fingerprint or a CA file.
//!
//! TLS 1.3 only, with the ring provider. The auth handshake binds the client's
//! HMAC answer to the TLS session through [`binding`] (an exporter value), so a
//! relayed answer from another session is worthless.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{parse_fingerprint, split_host_port, ClientConfig, ServerConfig, NO_TRUST_ANCHOR};

/// File names of the generated identity inside the state dir.
pub(crate) const GENERATED_CERT: &str = "tls-cert.pem";
pub(crate) const GENERATED_KEY: &str = "tls-key.pem";

/// Exporter label for the auth binding (RFC 8446 §7.5); both sides must agree.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-tunneld-auth-v2";

/// The first byte of a TLS handshake record; a plain v1/v2 frame starts with a
/// length prefix whose first byte is 0 (frames are at most 16 KiB).
pub(crate) const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// The first byte of a TLS alert record.
pub(crate) const TLS_ALERT_BYTE: u8 = 0x15;

/// ring, with AES-128-GCM preferred: on the bulk path encryption is the largest
/// cost, and AES-128 does 10 rounds to AES-256's 14 at a security margin that is
/// ample for a tunnel. Both sides list it first, so it is what they agree on.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let cipher_suites =
        vec![cipher_suite::TLS13_AES_128_GCM_SHA256, cipher_suite::TLS13_AES_256_GCM_SHA384, cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(CryptoProvider { cipher_suites, ..default_provider() })
}

/// `sha256:<64 hex>` over a certificate's DER.
pub(crate) fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert)))
}

/// The server's certificate chain and key.
pub(crate) struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Where the certificate came from, for logs.
    pub cert_path: PathBuf,
}

impl Identity {
    pub(crate) fn fingerprint(&self) -> String {
        self.chain.first().map(|c| fingerprint(c)).unwrap_or_default()
    }
}

/// Where the server's certificate lives: configured, or generated in the state dir.
pub(crate) fn cert_paths(server: &ServerConfig, state_dir: &Path) -> (PathBuf, PathBuf) {
    match (&server.tls_cert, &server.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => (state_dir.join(GENERATED_CERT), state_dir.join(GENERATED_KEY)),
    }
}

/// Loads the configured PEM pair, or the generated one — generating it (key 0600)
/// on first start.
pub(crate) fn load_or_generate(server: &ServerConfig, state_dir: &Path) -> anyhow::Result<Identity> {
    let (cert_path, key_path) = cert_paths(server, state_dir);
    let configured = server.tls_cert.is_some();
    if !configured && !cert_path.exists() {
        generate(&cert_path, &key_path)?;
        tracing::info!(path = %cert_path.display(), "generated a self-signed tunnel certificate");
    }
    load(&cert_path, &key_path)
}

/// Loads an existing PEM certificate chain and key.
pub(crate) fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Identity> {
    let pem = std::fs::read(cert_path).with_context(|| format!("cannot read the TLS certificate {}", cert_path.display()))?;
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no PEM certificate", cert_path.display());
    }
    let pem = std::fs::read(key_path).with_context(|| format!("cannot read the TLS key {}", key_path.display()))?;
    let key = rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?
        .ok_or_else(|| anyhow!("{} holds no PEM private key", key_path.display()))?;
    Ok(Identity { chain, key, cert_path: cert_path.to_path_buf() })
}

fn generate(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let certified = rcgen::generate_simple_self_signed(vec!["tunneld".to_string()]).context("cannot generate a certificate")?;
    if let Some(dir) = key_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Key first, so a crash in between leaves no certificate without its key.
    write_new(key_path, certified.key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert_path, certified.cert.pem().as_bytes(), 0o644)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(data)?;
    file.sync_all()?;
    Ok(())
}

/// The server's TLS configuration for the tunnel port: its TCP acceptor
/// ([`ServerTls`]) and its QUIC endpoint (`net::quic`) present the same certificate.
pub(crate) fn server_config(identity: Identity) -> anyhow::Result<rustls::ServerConfig> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .context("the TLS certificate and key do not match")
}

/// The server's TLS on its tunnel port: the buffered acceptor (control
/// connections, whose auth is bound to the exporter, and older clients' data
/// channels), and the configuration for data channels served through rustls's
/// unbuffered API (those whose ClientHello offers `net::tls_channel::DATA_ALPN`;
/// see `net::transport::accept_tls`).
pub struct ServerTls {
    pub(crate) buffered: tokio_rustls::TlsAcceptor,
    /// The same configuration, listing the data channels' ALPN protocol so the
    /// client sees it taken, with secret extraction on for their own record layer.
    pub(crate) data: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    pub(crate) fn new(config: rustls::ServerConfig) -> ServerTls {
        let mut data = config.clone();
        data.alpn_protocols = vec![crate::net::tls_channel::DATA_ALPN.to_vec()];
        // Its record layer takes the traffic secrets over after the handshake.
        data.enable_secret_extraction = true;
        ServerTls { buffered: tokio_rustls::TlsAcceptor::from(Arc::new(config)), data: Arc::new(data) }
    }
}

/// The client's connector and the server name it presents, from `client.*`:
/// a pinned fingerprint, or a CA file checked against `tls_server_name`.
pub fn connector(client: &ClientConfig) -> anyhow::Result<(tokio_rustls::TlsConnector, ServerName<'static>)> {
    let (config, name) = client_config(client)?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

/// The client's TLS configuration and the server name it presents: the same
/// trust for its TCP connections ([`connector`]) and its QUIC one (`net::quic`).
pub fn client_config(client: &ClientConfig) -> anyhow::Result<(rustls::ClientConfig, ServerName<'static>)> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let host = split_host_port(&client.server).map(|(h, _)| h.to_string()).unwrap_or_default();
    let (config, name) = if let Some(pin) = client.server_fingerprint.as_deref().and_then(parse_fingerprint) {
        let verifier = PinnedVerifier { pin, algorithms: provider().signature_verification_algorithms };
        let config = builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth();
        // The name is not checked when pinning; the certificate itself is.
        (config, ServerName::try_from("tunneld").map_err(|e| anyhow!("{e}"))?)
    } else if let Some(ca) = &client.tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read client.tls_ca {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.with_context(|| format!("client.tls_ca {} is not PEM", ca.display()))?;
            roots.add(cert).with_context(|| format!("client.tls_ca {}: unusable certificate", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("client.tls_ca {} holds no certificate", ca.display());
        }
        let name = client.tls_server_name.clone().unwrap_or(host);
        let name = ServerName::try_from(name.clone()).map_err(|_| anyhow!("client.tls_server_name {name:?} is not a DNS name or IP"))?;
        (builder.with_root_certificates(roots).with_no_client_auth(), name)
    } else {
        bail!("{}", NO_TRUST_ANCHOR);
    };
    Ok((config, name))
}

/// The value both ends of one TLS session derive alike, and no other session can.
pub(crate) fn binding(conn: &rustls::ConnectionCommon<impl Sized>) -> Vec<u8> {
    conn.export_keying_material(vec![0u8; 32], EXPORTER_LABEL, None).unwrap_or_default()
}

/// Trusts exactly one certificate, by the SHA-256 of its DER; the handshake
/// signature is still verified against that certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity);
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = PinMismatch { presented, pinned: self.pin.clone() };
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(mismatch)))))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server presented another certificate than the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate fingerprint {presented} does not match the pinned {pinned} (client.server_fingerprint, or this server's fingerprint in client.servers)")]
struct PinMismatch {
    presented: String,
    pinned: String,
}

/// A failed TLS handshake: why, as `tunneld_client_connect_failures_total`'s
/// `reason` (see `telemetry::connect_failure`), and in words an operator can
/// act on.
pub(crate) fn explain_client_error(e: &std::io::Error, client: &ClientConfig) -> (&'static str, String) {
    use crate::telemetry::connect_failure::{CERTIFICATE, PIN_MISMATCH, SERVER_TLS_OFF, THROTTLED, TLS_ERROR};
    use rustls::{CertificateError, Error};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    let reason = match inner {
        Some(Error::InvalidCertificate(CertificateError::Other(other))) if other.0.downcast_ref::<PinMismatch>().is_some() => PIN_MISMATCH,
        Some(Error::InvalidCertificate(_)) => CERTIFICATE,
        Some(Error::AlertReceived(rustls::AlertDescription::AccessDenied)) => THROTTLED,
        Some(Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)) => SERVER_TLS_OFF,
        _ => TLS_ERROR,
    };
    (reason, explain(e, inner, client))
}

fn explain(e: &std::io::Error, inner: Option<&rustls::Error>, client: &ClientConfig) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    match inner {
        Some(Error::General(msg)) => msg.clone(),
        Some(Error::InvalidCertificate(CertificateError::Other(other))) if other.0.downcast_ref::<PinMismatch>().is_some() => {
            other.0.to_string()
        }
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => format!(
            "the server's certificate is not signed by client.tls_ca {} (a self-signed server certificate needs \
             client.server_fingerprint instead; see `tunneld fingerprint`)",
            client.tls_ca.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
        ),
        Some(Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            "the server's certificate has expired".to_string()
        }
        Some(Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => format!(
            "the server's certificate is not valid for {:?} (set client.tls_server_name to a name it carries)",
            client
                .tls_server_name
                .clone()
                .unwrap_or_else(|| split_host_port(&client.server).map(|(h, _)| h.to_string()).unwrap_or_default())
        ),
        Some(Error::InvalidCertificate(other)) => format!("the server's certificate is not acceptable: {other:?}"),
        Some(Error::AlertReceived(AlertDescription::AccessDenied)) => THROTTLED.to_string(),
        Some(Error::AlertReceived(AlertDescription::ProtocolVersion)) => {
            "the server does not speak TLS on its tunnel port (it runs with server.tls = false): set client.tls = false \
             on a trusted network, or turn TLS on at the server"
                .to_string()
        }
        Some(Error::InvalidMessage(_)) | Some(Error::InappropriateMessage { .. }) => {
            "the server answered the TLS handshake with something that is not TLS: it runs with server.tls = false, or \
             it is older than protocol version 2 (upgrade the server)"
                .to_string()
        }
        _ if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
            "the server closed the connection during the TLS handshake: \
             it may be older than protocol version 2 (upgrade the server) or run with server.tls = false"
                .to_string()
        }
        _ => format!("TLS handshake failed: {e}"),
    }
}

/// A plain TLS alert record (fatal, protocol_version): what a plain server
/// answers a TLS client, so the client can say "the server has TLS off" instead
/// of timing out.
pub(crate) const PLAIN_SERVER_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 70];

/// A plain TLS alert record (fatal, access_denied): what the server answers a
/// connection its defences refuse before any handshake, so the client can say
/// it was throttled instead of "connection closed". The server's TLS stack
/// never sends this alert itself (there are no client certificates).
pub(crate) const THROTTLED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

/// What a throttled client logs when its server does not say for how long
/// (a server from before `retry_after_secs`; see `tunnel::message::Challenge`).
pub(crate) const THROTTLED: &str = "throttled by the server: too many failed or unfinished tunnel handshakes from this address; \
                             retrying later (if this client's name, secret and fingerprint are right, another program \
                             at the same address is failing to authenticate)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_is_reused_and_its_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let server = ServerConfig::default();
        let first = load_or_generate(&server, dir.path()).unwrap();
        let second = load_or_generate(&server, dir.path()).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
        let mode = std::fs::metadata(dir.path().join(GENERATED_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(server_config(first).is_ok());
    }
}
