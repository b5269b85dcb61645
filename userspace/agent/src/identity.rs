//! The agent's TLS identity towards the master: the cluster CA to trust and a client
//! certificate bound to the agent's underlay address. Given as files (`--ca`, `--cert`,
//! `--key`), or obtained with a join token (`--join-token` with `--ca-cert-hash` or `--ca`):
//! the agent makes its own key, sends a signing request, and keeps key, certificate and CA in
//! its state directory (0600). It renews the certificate when two thirds of its lifetime
//! have passed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use overlay_api::MasterClient;
use overlay_api::tls::{Identity, MasterTls, cert_validity};

pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "agent.crt";
pub const KEY_FILE: &str = "agent.key";

/// What the command line says about TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub join_token: Option<String>,
    pub ca_cert_hash: Option<String>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A new key and a signing request for it (the master puts the address in itself).
pub fn key_and_csr(ip: IpAddr) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("generating the agent key")?;
    let mut params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("overlay-agent {ip}"));
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), csr))
}

/// The agent's client of the masters, with its identity established; and, for renewal,
/// where the identity lives.
pub struct Established {
    pub client: MasterClient,
    pub renewal: Option<Renewal>,
}

/// Everything needed to renew the certificate in place.
pub struct Renewal {
    ip: IpAddr,
    state_dir: PathBuf,
    ca_pem: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

/// Sets up the client: plain HTTP when every master URL is `http://`, otherwise TLS with the
/// CA and certificate from the options or the state directory, joining with the token when
/// there is no valid certificate yet. Retries while no master answers.
pub async fn establish(
    masters: &[String],
    ip: IpAddr,
    options: &TlsOptions,
    state_dir: &Path,
) -> anyhow::Result<Established> {
    if masters.iter().all(|m| m.starts_with("http://")) {
        if options.join_token.is_some() || options.cert.is_some() {
            bail!("--join-token/--cert need https:// master URLs");
        }
        tracing::warn!("plain HTTP to the master: no authentication, no encryption");
        return Ok(Established {
            client: MasterClient::new(masters.iter().map(String::as_str))?,
            renewal: None,
        });
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let stored_ca = state_dir.join(CA_FILE);
    let ca_pem = match &options.ca {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("--ca {}", path.display()))?)
        }
        None if stored_ca.exists() => Some(std::fs::read(&stored_ca)?),
        None => None,
    };
    let (cert_pem, key_pem) = match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => (
            std::fs::read(cert).with_context(|| format!("--cert {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("--key {}", key.display()))?,
        ),
        (Some(_), None) | (None, Some(_)) => bail!("--cert and --key go together"),
        (None, None) => {
            let (cert, key) = (state_dir.join(CERT_FILE), state_dir.join(KEY_FILE));
            let usable = cert.exists()
                && key.exists()
                && std::fs::read(&cert)
                    .ok()
                    .and_then(|pem| cert_validity(&pem).ok())
                    .is_some_and(|(_, not_after)| not_after > now() + 1);
            if usable && ca_pem.is_some() {
                (std::fs::read(&cert)?, std::fs::read(&key)?)
            } else {
                join(masters, ip, options, ca_pem.as_deref(), state_dir).await?
            }
        }
    };
    let ca_pem = std::fs::read(&stored_ca)
        .ok()
        .filter(|_| options.ca.is_none())
        .or(ca_pem)
        .context(
            "no CA to verify the master with: give --ca or --join-token with --ca-cert-hash",
        )?;
    let (not_before, not_after) = cert_validity(&cert_pem).context("the agent certificate")?;
    let tls = MasterTls {
        ca_pem: ca_pem.clone(),
        identity: Some(Identity { cert_pem, key_pem }),
        ..Default::default()
    };
    let client = MasterClient::with_tls(masters.iter().map(String::as_str), &tls)?;
    Ok(Established {
        client,
        renewal: Some(Renewal {
            ip,
            state_dir: state_dir.to_owned(),
            ca_pem,
            not_before,
            not_after,
        }),
    })
}

/// Trades the join token for a certificate; stores key, certificate and CA.
async fn join(
    masters: &[String],
    ip: IpAddr,
    options: &TlsOptions,
    ca_pem: Option<&[u8]>,
    state_dir: &Path,
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let Some(token) = &options.join_token else {
        bail!(
            "no agent certificate: give --cert/--key, or --join-token (with --ca-cert-hash or --ca); none valid in {}",
            state_dir.display()
        );
    };
    let trust = match (ca_pem, &options.ca_cert_hash) {
        (_, Some(hash)) => MasterTls {
            ca_cert_hash: Some(hash.clone()),
            ..Default::default()
        },
        (Some(ca), None) => MasterTls {
            ca_pem: ca.to_vec(),
            ..Default::default()
        },
        (None, None) => bail!("--join-token needs --ca-cert-hash sha256:... or --ca FILE"),
    };
    let client = MasterClient::with_tls(masters.iter().map(String::as_str), &trust)?;
    let (key_pem, csr) = key_and_csr(ip)?;
    let mut backoff = Duration::from_millis(100);
    let issued = loop {
        match client.join(token, ip, &csr).await {
            Ok(issued) => break issued,
            Err(e) if e.is_unreachable() => {
                tracing::warn!("joining: no master answered (retrying in {backoff:?}): {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => bail!("joining the cluster with the token: {e}"),
        }
    };
    write_private(&state_dir.join(KEY_FILE), key_pem.as_bytes())?;
    write_private(&state_dir.join(CERT_FILE), issued.certificate.as_bytes())?;
    write_private(&state_dir.join(CA_FILE), issued.ca.as_bytes())?;
    tracing::info!(%ip, not_after = issued.not_after, "joined the cluster: certificate stored in {}", state_dir.display());
    Ok((issued.certificate.into_bytes(), key_pem.into_bytes()))
}

impl Renewal {
    /// Renews the certificate at two thirds of its lifetime, for as long as the agent runs;
    /// a failed renewal is retried (every 30 s at most) until the certificate expires.
    pub async fn run(mut self, client: MasterClient) {
        loop {
            let lifetime = (self.not_after - self.not_before).max(3);
            let due = self.not_before + lifetime * 2 / 3;
            let wait = (due - now()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match self.renew(&client).await {
                Ok(()) => tracing::info!(not_after = self.not_after, "agent certificate renewed"),
                Err(e) => {
                    let left = self.not_after - now();
                    tracing::warn!(
                        seconds_left = left,
                        "renewing the agent certificate failed: {e:#}"
                    );
                    let retry = (left / 10).clamp(1, 30) as u64;
                    // `due` has passed, so the next round retries right after this pause.
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                }
            }
        }
    }

    async fn renew(&mut self, client: &MasterClient) -> anyhow::Result<()> {
        let (key_pem, csr) = key_and_csr(self.ip)?;
        let issued = client.renew_certificate(&csr).await?;
        let (not_before, not_after) = cert_validity(issued.certificate.as_bytes())?;
        write_private(&self.state_dir.join(KEY_FILE), key_pem.as_bytes())?;
        write_private(
            &self.state_dir.join(CERT_FILE),
            issued.certificate.as_bytes(),
        )?;
        client.set_tls(&MasterTls {
            ca_pem: self.ca_pem.clone(),
            identity: Some(Identity {
                cert_pem: issued.certificate.into_bytes(),
                key_pem: key_pem.into_bytes(),
            }),
            ..Default::default()
        })?;
        self.not_before = not_before;
        self.not_after = not_after;
        Ok(())
    }
}
