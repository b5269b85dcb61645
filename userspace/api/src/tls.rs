//! TLS of the control plane, client side: the cluster CA to trust, an optional client
//! identity (an agent's certificate, bound to its underlay IP), an optional admin token.
//! rustls on the ring provider.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Wire types of the master's certificate routes (join, renew, tokens).
pub mod wire {
    use std::net::IpAddr;

    use serde::{Deserialize, Serialize};

    /// `POST /overlay-master/join`: a join token buys a certificate for `ip`.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct JoinRequest {
        pub token: String,
        pub ip: IpAddr,
        /// PKCS#10 certificate signing request (PEM) of the agent's own key.
        pub csr: String,
    }

    /// `POST /overlay-master/certificates/renew` (authenticated by the current certificate).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RenewRequest {
        pub csr: String,
    }

    /// Answer of join and renew.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct IssuedCertificate {
        /// The agent's certificate (PEM).
        pub certificate: String,
        /// The cluster CA (PEM).
        pub ca: String,
        /// Expiry, seconds since the Unix epoch.
        pub not_after: i64,
    }

    /// `POST /overlay-master/tokens` (admin).
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TokenRequest {
        /// Lifetime in seconds (default one hour).
        #[serde(default)]
        pub ttl_seconds: Option<u64>,
        /// Only an agent with this underlay address may join with the token.
        #[serde(default)]
        pub ip: Option<IpAddr>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct TokenResponse {
        pub token: String,
        /// Expiry, seconds since the Unix epoch.
        pub expires: i64,
    }
}

/// Error reading TLS material.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct TlsError {
    pub what: String,
    pub reason: String,
}

fn tls_error(what: impl Into<String>, reason: impl ToString) -> TlsError {
    TlsError {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// An agent's certificate chain and key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

/// What a client presents to and trusts of the master.
#[derive(Clone, Default)]
pub struct MasterTls {
    /// The cluster CA (PEM); the master's certificate must chain to it.
    pub ca_pem: Vec<u8>,
    /// Client certificate (agents).
    pub identity: Option<Identity>,
    /// Sent as `Authorization: Bearer ...` (operators).
    pub admin_token: Option<String>,
    /// Instead of `ca_pem` (a joining agent that has no CA yet): `sha256:<hex>` of the CA
    /// certificate (DER); the master's chain must contain that CA and its certificate must
    /// verify against it.
    pub ca_cert_hash: Option<String>,
}

impl std::fmt::Debug for MasterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterTls")
            .field("identity", &self.identity.is_some())
            .field("admin_token", &self.admin_token.is_some())
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| tls_error(format!("{what} {}", path.display()), e))
}

impl MasterTls {
    /// Reads the CA, an optional certificate+key pair and an optional admin token file
    /// (first line, trimmed).
    pub fn from_files(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        admin_token_file: Option<&Path>,
    ) -> Result<MasterTls, TlsError> {
        let ca_pem = read(ca, "CA certificate")?;
        let identity = match identity {
            Some((cert, key)) => Some(Identity {
                cert_pem: read(cert, "certificate")?,
                key_pem: read(key, "private key")?,
            }),
            None => None,
        };
        let admin_token = admin_token_file.map(read_token_file).transpose()?;
        Ok(MasterTls {
            ca_pem,
            identity,
            admin_token,
            ca_cert_hash: None,
        })
    }

    /// The rustls client configuration: CA roots, client certificate if any.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| tls_error("TLS versions", e))?;
        let builder = match &self.ca_cert_hash {
            Some(pin) => {
                let hash = parse_ca_hash(pin)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { hash, provider }))
            }
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let cas = parse_certs(&self.ca_pem, "CA certificate")?;
                if cas.is_empty() {
                    return Err(tls_error("CA certificate", "no PEM certificate in it"));
                }
                for ca in cas {
                    roots.add(ca).map_err(|e| tls_error("CA certificate", e))?;
                }
                builder.with_root_certificates(roots)
            }
        };
        match &self.identity {
            Some(identity) => {
                let chain = parse_certs(&identity.cert_pem, "certificate")?;
                let key = parse_key(&identity.key_pem)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error("client certificate", e))
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// Reads a token file: its first line, trimmed; an empty file is an error.
pub fn read_token_file(path: &Path) -> Result<String, TlsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| tls_error(format!("token file {}", path.display()), e))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(tls_error(format!("token file {}", path.display()), "empty"));
    }
    Ok(token)
}

/// Every certificate of a PEM text.
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, e))
}

/// The first private key of a PEM text.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut BufReader::new(pem))
        .map_err(|e| tls_error("private key", e))?
        .ok_or_else(|| tls_error("private key", "no PEM private key in it"))
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// `sha256:<64 hex digits>` -> the digest.
pub fn parse_ca_hash(text: &str) -> Result<Vec<u8>, TlsError> {
    let bad = || {
        tls_error(
            "--ca-cert-hash",
            format!("{text:?}: expected sha256:<64 hex digits>"),
        )
    };
    let hex = text.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64 {
        return Err(bad());
    }
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad()))
        .collect()
}

/// `sha256:<hex>` of a certificate (DER).
pub fn cert_hash(der: &[u8]) -> String {
    let hex: String = sha256(der).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Trusts a server whose chain carries the CA with the pinned hash and whose certificate
/// verifies against that CA (kubeadm's `--discovery-token-ca-cert-hash`, on the certificate).
#[derive(Debug)]
struct PinnedCaVerifier {
    hash: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c.as_ref()) == self.hash)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the master's chain holds no CA with the pinned --ca-cert-hash".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// (not before, not after) of the first certificate of a PEM text, seconds since the epoch.
pub fn cert_validity(pem: &[u8]) -> Result<(i64, i64), TlsError> {
    let der = parse_certs(pem, "certificate")?
        .into_iter()
        .next()
        .ok_or_else(|| tls_error("certificate", "no PEM certificate in it"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| tls_error("certificate", e))?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_hashes_must_be_sha256_hex() {
        assert_eq!(
            parse_ca_hash(&format!("sha256:{}", "ab".repeat(32))).unwrap(),
            vec![0xab; 32]
        );
        assert!(parse_ca_hash("sha256:abc").is_err());
        assert!(parse_ca_hash(&format!("md5:{}", "ab".repeat(32))).is_err());
        assert!(parse_ca_hash(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }
}
