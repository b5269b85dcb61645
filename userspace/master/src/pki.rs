//! The cluster's certificate authority and what hangs off it, all in one directory (the
//! `--tls-dir`): the CA (`ca.crt`, `ca.key`), the admin token (`admin.token`), single-use join
//! tokens (`join-tokens.json`) and revocations (`revoked.json`). Masters sharing a store share
//! this directory too; the files are re-read when they change.
//!
//! Agent certificates carry the agent's underlay address as their only IP SAN: that address is
//! the identity the master authorises.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const ADMIN_TOKEN: &str = "admin.token";
pub const JOIN_TOKENS: &str = "join-tokens.json";
pub const REVOKED: &str = "revoked.json";

const CA_NAME: &str = "ebpf-overlay cluster CA";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the certificate a master issues itself at start.
const SERVER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn offset(at: i64) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(at).context("certificate time out of range")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a file readable by its owner only, atomically (temp file + rename).
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
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

fn random_serial() -> SerialNumber {
    let mut serial = [0u8; 16];
    rand::rng().fill(&mut serial[..]);
    serial[0] &= 0x7f; // positive
    serial[0] |= 0x01; // and 16 bytes long
    SerialNumber::from(serial.to_vec())
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ebpf-overlay");
    dn.push(DnType::CommonName, common);
    dn
}

/// The cluster CA, loaded with its key.
pub struct ClusterCa {
    dir: PathBuf,
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl ClusterCa {
    /// Creates the CA and the admin token in `dir` (created 0700 if missing); refuses to
    /// overwrite an existing CA.
    pub fn init(dir: &Path) -> anyhow::Result<ClusterCa> {
        if dir.join(CA_CERT).exists() {
            bail!("{} already holds a CA ({CA_CERT})", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(CA_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = unix_now();
        params.not_before = offset(now - 60)?;
        params.not_after = offset(now + CA_LIFETIME.as_secs() as i64)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).context("signing the CA")?;
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join(CA_CERT), cert.pem())?;
        write_private(
            &dir.join(ADMIN_TOKEN),
            format!("{}\n", random_hex(32)).as_bytes(),
        )?;
        Self::load(dir)
    }

    pub fn load(dir: &Path) -> anyhow::Result<ClusterCa> {
        let cert_path = dir.join(CA_CERT);
        let cert_pem = std::fs::read_to_string(&cert_path).with_context(|| {
            format!(
                "reading {} (create it with `overlay-master ca init --dir {}`)",
                cert_path.display(),
                dir.display()
            )
        })?;
        let key_path = dir.join(CA_KEY);
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a private key", key_path.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .with_context(|| format!("{}: not a CA certificate", cert_path.display()))?;
        let cert_der = overlay_api::tls::parse_certs(cert_pem.as_bytes(), "CA certificate")?
            .into_iter()
            .next()
            .with_context(|| format!("{}: no certificate in it", cert_path.display()))?
            .to_vec();
        // Re-signing the parsed parameters gives an issuer with the CA's name and key; only
        // those go into the certificates it signs.
        let issuer = params.self_signed(&key).context("loading the CA")?;
        Ok(ClusterCa {
            dir: dir.to_owned(),
            cert_pem,
            cert_der,
            issuer,
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// `sha256:<hex>` of the CA certificate (DER), what `--ca-cert-hash` pins.
    pub fn cert_hash(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.cert_der))
    }

    /// A server certificate for the master, for these DNS names and IP addresses; returns
    /// (chain PEM: leaf then CA, key PEM).
    pub fn issue_server(&self, names: &[String]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec()).context("--tls-san")?;
        params.distinguished_name = name("overlay-master");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = unix_now();
        params.not_before = offset(now - 60)?;
        params.not_after = offset(now + SERVER_LIFETIME.as_secs() as i64)?;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }

    fn agent_params(ip: IpAddr, lifetime: Duration) -> anyhow::Result<(CertificateParams, i64)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.distinguished_name = name(&format!("overlay-agent {ip}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = unix_now();
        let not_after = now + lifetime.as_secs() as i64;
        params.not_before = offset(now)?;
        params.not_after = offset(not_after)?;
        params.serial_number = Some(random_serial());
        Ok((params, not_after))
    }

    /// An agent certificate for `ip` and a fresh key: (certificate PEM, key PEM, expiry).
    pub fn issue_agent_with_key(
        &self,
        ip: IpAddr,
        lifetime: Duration,
    ) -> anyhow::Result<(String, String, i64)> {
        let key = KeyPair::generate()?;
        let (params, not_after) = Self::agent_params(ip, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok((cert.pem(), key.serialize_pem(), not_after))
    }

    /// Signs the public key of `csr_pem` as agent `ip`; whatever names the request asks for
    /// are ignored. Returns (certificate PEM, expiry).
    pub fn sign_agent_csr(
        &self,
        ip: IpAddr,
        csr_pem: &str,
        lifetime: Duration,
    ) -> anyhow::Result<(String, i64)> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("csr: not a valid PKCS#10 request: {e}"))?;
        let (params, not_after) = Self::agent_params(ip, lifetime)?;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer, &self.key)?;
        Ok((cert.pem(), not_after))
    }
}

/// A join token as created: `<id>.<secret>` (kubeadm's bootstrap token shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    /// sha256 of the secret part; the secret itself is never stored.
    secret_sha256: String,
    expires: i64,
    /// The only agent address the token may join as.
    #[serde(default)]
    ip: Option<IpAddr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: BTreeMap<String, StoredToken>,
}

/// Why a join token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token: malformed (expected <6 chars>.<16 chars>)")]
    Malformed,
    #[error("token: unknown or already used")]
    Unknown,
    #[error("token: expired")]
    Expired,
    #[error("token: only valid for agent {0}")]
    WrongIp(IpAddr),
    #[error("token store: {0}")]
    Store(String),
}

/// Serialises token use within one master (the file is the shared truth).
static TOKEN_LOCK: Mutex<()> = Mutex::new(());

fn token_chars(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn read_tokens(path: &Path) -> anyhow::Result<TokenFile> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: unreadable", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Creates a single-use join token valid for `ttl` (optionally only for agent `ip`);
/// returns the token and its expiry.
pub fn create_join_token(
    dir: &Path,
    ttl: Duration,
    ip: Option<IpAddr>,
) -> anyhow::Result<(String, i64)> {
    let _guard = TOKEN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = dir.join(JOIN_TOKENS);
    let mut file = read_tokens(&path)?;
    let now = unix_now();
    file.tokens.retain(|_, t| t.expires > now);
    let (id, secret) = (token_chars(6), token_chars(16));
    let expires = now + ttl.as_secs() as i64;
    file.tokens.insert(
        id.clone(),
        StoredToken {
            secret_sha256: sha256_hex(secret.as_bytes()),
            expires,
            ip,
        },
    );
    write_private(&path, &serde_json::to_vec_pretty(&file)?)?;
    Ok((format!("{id}.{secret}"), expires))
}

/// Uses up `token` for agent `ip`: valid, unexpired, unused and (if bound) for this address.
pub fn consume_join_token(dir: &Path, token: &str, ip: IpAddr) -> Result<(), TokenError> {
    let (id, secret) = token.split_once('.').ok_or(TokenError::Malformed)?;
    if id.len() != 6 || secret.len() != 16 {
        return Err(TokenError::Malformed);
    }
    let _guard = TOKEN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = dir.join(JOIN_TOKENS);
    let store = |e: anyhow::Error| TokenError::Store(format!("{e:#}"));
    let mut file = read_tokens(&path).map_err(store)?;
    let stored = file.tokens.get(id).ok_or(TokenError::Unknown)?;
    // Comparing digests: no timing signal about the secret itself.
    if stored.secret_sha256 != sha256_hex(secret.as_bytes()) {
        return Err(TokenError::Unknown);
    }
    if stored.expires <= unix_now() {
        return Err(TokenError::Expired);
    }
    if let Some(bound) = stored.ip
        && bound != ip
    {
        return Err(TokenError::WrongIp(bound));
    }
    file.tokens.remove(id);
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| store(e.into()))?;
    write_private(&path, &bytes).map_err(store)?;
    Ok(())
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RevokedFile {
    /// Agent address -> time of revocation: its certificates issued before are refused
    /// (deleting an agent revokes it).
    #[serde(default)]
    agents: BTreeMap<IpAddr, i64>,
}

/// Revoked agent certificates, kept in `revoked.json`. Deleting an agent revokes every
/// certificate issued to its address until then; it comes back only with a new one.
pub struct Revocations {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, RevokedFile)>,
}

impl Revocations {
    pub fn new(dir: &Path) -> Revocations {
        Revocations {
            path: dir.join(REVOKED),
            cache: Mutex::new((None, RevokedFile::default())),
        }
    }

    fn current(&self) -> RevokedFile {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified != cache.0 {
            match std::fs::read(&self.path) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(file) => *cache = (modified, file),
                    Err(error) => {
                        tracing::error!(file = %self.path.display(), %error, "revocation list unreadable; keeping the last one read")
                    }
                },
                Err(_) => *cache = (modified, RevokedFile::default()),
            }
        }
        cache.1.clone()
    }

    /// True if a certificate of agent `ip` issued at `not_before` is revoked.
    pub fn is_revoked(&self, ip: IpAddr, not_before: i64) -> bool {
        self.current()
            .agents
            .get(&ip)
            .is_some_and(|&revoked_at| not_before <= revoked_at)
    }

    /// Revokes every certificate of these agents issued until now.
    pub fn revoke_agents(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut file = self.current();
        let now = unix_now();
        for ip in ips {
            file.agents.insert(*ip, now);
        }
        write_private(&self.path, &serde_json::to_vec_pretty(&file)?)?;
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = (modified, file);
        Ok(())
    }
}

/// Parses `90s`, `15m`, `1h`, `24h`, `7d` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with s, m, h or d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    if seconds == 0 {
        return Err(format!("{text:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn join_tokens_are_single_use_bound_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (token, _) = create_join_token(dir.path(), Duration::from_secs(60), None).unwrap();
        assert_eq!(
            consume_join_token(dir.path(), "short.x", ip),
            Err(TokenError::Malformed)
        );
        let forged = format!("{}.{}", &token[..6], "a".repeat(16));
        assert_eq!(
            consume_join_token(dir.path(), &forged, ip),
            Err(TokenError::Unknown)
        );
        assert_eq!(consume_join_token(dir.path(), &token, ip), Ok(()));
        assert_eq!(
            consume_join_token(dir.path(), &token, ip),
            Err(TokenError::Unknown)
        );
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let (bound, _) =
            create_join_token(dir.path(), Duration::from_secs(60), Some(other)).unwrap();
        assert_eq!(
            consume_join_token(dir.path(), &bound, ip),
            Err(TokenError::WrongIp(other))
        );
        assert_eq!(consume_join_token(dir.path(), &bound, other), Ok(()));
    }

    #[test]
    fn csr_signing_binds_the_certificate_to_the_given_ip_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("tls")).unwrap();
        let key = KeyPair::generate().unwrap();
        // The request asks for another address: the certificate carries the given one.
        let csr = CertificateParams::new(vec!["10.9.9.9".to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let (pem, _) = ca
            .sign_agent_csr(ip, &csr, Duration::from_secs(60))
            .unwrap();
        let der = overlay_api::tls::parse_certs(pem.as_bytes(), "cert").unwrap();
        let info = crate::auth::PeerCert::parse(&der[0]).unwrap();
        assert_eq!(info.agent_ip, Some(ip));
        assert!(
            ca.sign_agent_csr(ip, "garbage", Duration::from_secs(60))
                .is_err()
        );
    }
}
