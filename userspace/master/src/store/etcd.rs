//! The shared store: etcd (3.4 or later) through its JSON gRPC gateway, so several masters can
//! serve the same cluster.
//!
//! Layout under the prefix (default `/ebpf-overlay/`), JSON values as in the redb store:
//!
//! | key | value |
//! | --- | --- |
//! | `<prefix>revision` | the store revision, decimal |
//! | `<prefix>settings` | `SettingsRecord` |
//! | `<prefix>networks/<name>` | `NetworkRecord` |
//! | `<prefix>agents/<ip>` | `AgentRecord` |
//!
//! A commit is one etcd transaction: it compares the revision key (absent, i.e. create_revision
//! 0, for revision 0; otherwise its value) and, only if that still holds, writes the records
//! and the next revision. Every allocation therefore goes through one serialisation point: of
//! two masters that computed allocations from the same revision, exactly one commits and the
//! other gets `StoreError::Conflict`, reloads and retries. A transaction whose answer was lost
//! may be retried on another member safely for the same reason.
//!
//! A watch on the revision key reports every commit, by this master or another, through
//! [`Store::changes`]; the master reloads when the stored revision is ahead of its own.
//!
//! Reads are linearizable; when no member can serve one (quorum lost), `load` falls back to a
//! serializable read of a reachable member, which may be stale but only ever misses records
//! (the next commit's compare catches that), so a master keeps serving what it has and refuses
//! writes with an error naming etcd until quorum returns. The same holds when etcd raised its
//! NOSPACE alarm (quota exceeded): writes are refused, naming the alarm, and resume once the
//! operator compacted, defragmented and disarmed it.
//!
//! Security, as flannel and Calico offer it: `https://` members verified against a CA bundle,
//! a client certificate for etcd's `--client-cert-auth`, and etcd authentication by user name
//! and password (a token from `/v3/auth/authenticate`, renewed when a member no longer knows
//! it). The JSON gateway authenticates by password only: it forwards requests to the member's
//! gRPC server over its own connection, so a client certificate's CN never reaches etcd's
//! authorisation, and with authentication on etcd 3.4 refuses (400) gateway clients whose
//! certificate carries a CN: the master's certificate must have none.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{AgentRecord, NetworkRecord, Op, SettingsRecord, Snapshot, Store, StoreError};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/ebpf-overlay/";
/// Time limit of one request to one member (a member without quorum answers only after its
/// own, longer, request timeout, so the next member is tried first).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);
/// Linearizable reads fall back to a member's local copy, so they may give up sooner.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Parses `etcd://host:port,host:port,...` (or a bare `host:port,...` list) into member URLs.
/// A member may name its scheme (`http://host:port`, `https://host:port`); one that does not
/// gets `https` when `tls` (a CA or client certificate was given), `http` otherwise. Plain
/// `http` members are refused when `tls`: certificates given for nothing are a mistake.
pub fn parse_endpoints(spec: &str, tls: bool) -> Result<Vec<String>, String> {
    let list = spec.strip_prefix("etcd://").unwrap_or(spec);
    let default_scheme = if tls { "https" } else { "http" };
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|member| {
            let (scheme, address) = match member.split_once("://") {
                Some((scheme @ ("http" | "https"), address)) => (scheme, address),
                Some((scheme, _)) => {
                    return Err(format!(
                        "etcd member {member:?}: scheme {scheme:?}, expected http or https"
                    ));
                }
                None => (default_scheme, member),
            };
            if scheme == "http" && tls {
                return Err(format!(
                    "etcd member {member:?} is plain http but etcd TLS files were given"
                ));
            }
            if !address.contains(':') || address.contains('/') {
                return Err(format!("etcd member {member:?}: host:port expected"));
            }
            Ok(format!("{scheme}://{address}"))
        })
        .collect::<Result<_, _>>()?;
    if endpoints.is_empty() {
        return Err(format!("no etcd member in {spec:?}"));
    }
    Ok(endpoints)
}

/// Where the system's CA bundle is on Debian, used for `https` members without a CA file.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS and authentication towards etcd (all optional).
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    /// PEM bundle of the CA(s) that signed the members' certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and its key, for members with `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user and password, for members with authentication enabled.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl EtcdSecurity {
    /// Whether members without a scheme are `https`.
    pub fn wants_tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// The rustls client configuration: the CA file (or the system bundle) as roots, the
    /// client certificate if given.
    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
            std::fs::read(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))
        }
        fn certs(
            path: &std::path::Path,
            what: &str,
        ) -> Result<Vec<CertificateDer<'static>>, String> {
            let pem = read(path, what)?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the {what} {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "the {what} {} holds no PEM certificate",
                    path.display()
                ));
            }
            Ok(certs)
        }
        let ca_path = self
            .ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(&ca_path, "etcd CA file")? {
            roots
                .add(cert)
                .map_err(|e| format!("the etcd CA file {}: {e}", ca_path.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert_file, &self.key_file) {
            (Some(cert_path), Some(key_path)) => {
                let chain = certs(cert_path, "etcd client certificate")?;
                let pem = read(key_path, "etcd client key")?;
                let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
                    .map_err(|e| format!("the etcd client key {}: {e}", key_path.display()))?
                    .ok_or_else(|| {
                        format!(
                            "the etcd client key {} holds no PEM private key",
                            key_path.display()
                        )
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the etcd client certificate and key: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(
                    "an etcd client certificate needs its key, and the other way round".into(),
                );
            }
        };
        // The JSON gateway is HTTP/1.1; saying so keeps the member from offering gRPC's h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// Our own runtime: the trait is synchronous and is called from inside the master's runtime
    /// too, so requests run here and the caller waits on a channel.
    runtime: Option<tokio::runtime::Runtime>,
    /// Member that answered last; requests start there.
    preferred: AtomicUsize,
    changes: Mutex<Option<mpsc::Receiver<u64>>>,
}

/// The HTTP client of the members, shared by requests and the watch.
#[derive(Clone)]
struct Client {
    endpoints: Arc<Vec<String>>,
    http: reqwest::Client,
    /// User and password when etcd authentication is on.
    credentials: Option<Arc<(String, String)>>,
    /// The current auth token (cluster-wide; renewed when a member does not know it).
    token: Arc<RwLock<Option<String>>>,
}

/// An error and its causes on one line (reqwest's own text hides the TLS reason).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether an etcd error says the request's auth token is missing or unknown.
fn is_token_error(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("user name is empty")
}

impl Client {
    /// POSTs `body` to `path` on member `index`, with the auth token; a token the member does
    /// not know is renewed once.
    async fn call(
        &self,
        index: usize,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let endpoint = &self.endpoints[index];
        let url = format!("{endpoint}{path}");
        if self.credentials.is_some() && self.current_token().is_none() {
            self.authenticate(endpoint).await?;
        }
        match post(
            &self.http,
            &url,
            body,
            timeout,
            self.current_token().as_deref(),
        )
        .await
        {
            Err(reason) if self.credentials.is_some() && is_token_error(&reason) => {
                self.authenticate(endpoint).await?;
                post(
                    &self.http,
                    &url,
                    body,
                    timeout,
                    self.current_token().as_deref(),
                )
                .await
            }
            other => other,
        }
    }

    fn current_token(&self) -> Option<String> {
        self.token.read().expect("token lock").clone()
    }

    /// Gets a fresh token from `endpoint` with the user and password.
    async fn authenticate(&self, endpoint: &str) -> Result<(), String> {
        let Some(credentials) = &self.credentials else {
            return Ok(());
        };
        let answer = post(
            &self.http,
            &format!("{endpoint}/v3/auth/authenticate"),
            &json!({"name": credentials.0, "password": credentials.1}),
            REQUEST_TIMEOUT,
            None,
        )
        .await
        .map_err(|e| format!("authenticating as etcd user {:?}: {e}", credentials.0))?;
        let token = answer["token"]
            .as_str()
            .ok_or_else(|| format!("etcd gave no auth token for user {:?}", credentials.0))?;
        *self.token.write().expect("token lock") = Some(token.to_owned());
        Ok(())
    }
}

fn backend(context: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        context: context.to_owned(),
        reason: reason.to_string(),
    }
}

fn encode<T: Serialize>(value: &T) -> String {
    B64.encode(serde_json::to_vec(value).expect("records always serialise"))
}

fn b64(text: &str) -> String {
    B64.encode(text.as_bytes())
}

fn decode_b64(field: &Value) -> Vec<u8> {
    field
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn parse_revision(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_owned(),
            reason: format!("not a revision: {:?}", String::from_utf8_lossy(bytes)),
        })
}

impl EtcdStore {
    /// Connects to the members (`http://host:port`) without TLS or authentication.
    pub fn open(endpoints: Vec<String>, prefix: &str) -> Result<Self, StoreError> {
        Self::open_with(endpoints, prefix, &EtcdSecurity::default())
    }

    /// Connects to the members (`http://` or `https://host:port`) with `security`. Checks that
    /// one of them answers (and accepts the credentials).
    pub fn open_with(
        endpoints: Vec<String>,
        prefix: &str,
        security: &EtcdSecurity,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(backend("opening the etcd store", "no etcd member given"));
        }
        if prefix.is_empty() {
            return Err(backend("opening the etcd store", "the key prefix is empty"));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| backend("starting the etcd client runtime", e))?;
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if endpoints.iter().any(|e| e.starts_with("https://")) {
            let tls = security
                .tls_config()
                .map_err(|e| backend("setting up TLS towards etcd", e))?;
            builder = builder.use_preconfigured_tls(tls);
        } else if security.wants_tls() {
            return Err(backend(
                "opening the etcd store",
                "etcd TLS files were given but no member is https",
            ));
        }
        let http = builder
            .build()
            .map_err(|e| backend("building the etcd HTTP client", error_chain(&e)))?;
        let credentials = match (&security.username, &security.password) {
            (Some(user), Some(password)) => Some(Arc::new((user.clone(), password.clone()))),
            (None, None) => None,
            _ => {
                return Err(backend(
                    "opening the etcd store",
                    "an etcd user name needs its password, and the other way round",
                ));
            }
        };
        if credentials.is_some() && endpoints.iter().any(|e| e.starts_with("http://")) {
            tracing::warn!("the etcd password is sent over plain http");
        }
        let client = Client {
            endpoints: Arc::new(endpoints),
            http,
            credentials,
            token: Arc::new(RwLock::new(None)),
        };
        let (tx, rx) = mpsc::channel();
        let store = EtcdStore {
            client,
            prefix: prefix.to_owned(),
            runtime: Some(runtime),
            preferred: AtomicUsize::new(0),
            changes: Mutex::new(Some(rx)),
        };
        store.request("/v3/maintenance/status", json!({}), REQUEST_TIMEOUT)?;
        let watcher = Watcher {
            client: store.client.clone(),
            key: store.key("revision"),
            tx,
        };
        store.runtime().spawn(watcher.run());
        Ok(store)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.client.endpoints
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("runtime lives as long as the store")
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// POSTs `body` to `path` on each member in turn, starting with the last one that answered,
    /// until one gives a 2xx answer; the error lists every member's failure.
    fn request(&self, path: &str, body: Value, timeout: Duration) -> Result<Value, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let client = self.client.clone();
        let start = self.preferred.load(Ordering::Relaxed);
        let route = path.to_owned();
        self.runtime().spawn(async move {
            let mut failures = Vec::new();
            let members = client.endpoints.len();
            for n in 0..members {
                let index = (start + n) % members;
                match client.call(index, &route, &body, timeout).await {
                    Ok(answer) => {
                        let _ = tx.send(Ok((index, answer)));
                        return;
                    }
                    Err(reason) => failures.push(format!("{}: {reason}", client.endpoints[index])),
                }
            }
            let _ = tx.send(Err(failures.join("; ")));
        });
        match rx.recv() {
            Ok(Ok((index, answer))) => {
                self.preferred.store(index, Ordering::Relaxed);
                Ok(answer)
            }
            Ok(Err(reasons)) => Err(backend(
                &format!("calling etcd {path}"),
                format!("no etcd member answered: {reasons}"),
            )),
            Err(_) => Err(backend(
                &format!("calling etcd {path}"),
                "the etcd client stopped",
            )),
        }
    }

    fn range_all(&self, serializable: bool) -> Result<Value, StoreError> {
        self.request(
            "/v3/kv/range",
            json!({
                "key": b64(&self.prefix),
                "range_end": B64.encode(prefix_end(&self.prefix)),
                "serializable": serializable,
            }),
            READ_TIMEOUT,
        )
    }
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    timeout: Duration,
    token: Option<&str>,
) -> Result<Value, String> {
    let mut request = http.post(url).timeout(timeout).json(body);
    if let Some(token) = token {
        request = request.header(reqwest::header::AUTHORIZATION, token);
    }
    let response = request.send().await.map_err(|e| error_chain(&e))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| error_chain(&e))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        let hint = if text.contains("CommonName of client") {
            " (with etcd authentication on, the JSON gateway refuses client certificates that \
             carry a CN: give the master one without, and a user and password)"
        } else {
            ""
        };
        format!("{status}: unreadable answer ({e}): {:?}{hint}", text.trim())
    })?;
    if !status.is_success() || value.get("error").is_some() {
        let message = value
            .get("error")
            .or_else(|| value.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("no message");
        return Err(format!("{status}: {message}"));
    }
    Ok(value)
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime blocks, which is refused inside another runtime.
            runtime.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    /// A linearizable count of the prefix: answers only while etcd has a quorum.
    fn probe(&self) -> Result<(), StoreError> {
        self.request(
            "/v3/kv/range",
            json!({
                "key": b64(&self.prefix),
                "range_end": B64.encode(prefix_end(&self.prefix)),
                "count_only": true,
            }),
            READ_TIMEOUT,
        )
        .map(|_| ())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let answer = match self.range_all(false) {
            Ok(answer) => answer,
            Err(linearizable) => {
                tracing::warn!(%linearizable, "etcd: no linearizable read; reading a member's local copy");
                self.range_all(true).map_err(|_| linearizable)?
            }
        };
        let mut snapshot = Snapshot::default();
        let empty = Vec::new();
        for kv in answer["kvs"].as_array().unwrap_or(&empty) {
            let key = String::from_utf8_lossy(&decode_b64(&kv["key"])).into_owned();
            let value = decode_b64(&kv["value"]);
            let Some(name) = key.strip_prefix(&self.prefix) else {
                continue;
            };
            if name == "revision" {
                snapshot.revision = parse_revision(&key, &value)?;
            } else if name == "settings" {
                snapshot.settings = Some(decode::<SettingsRecord>(&key, &value)?);
            } else if name.starts_with("networks/") {
                snapshot
                    .networks
                    .push(decode::<NetworkRecord>(&key, &value)?);
            } else if name.starts_with("agents/") {
                snapshot.agents.push(decode::<AgentRecord>(&key, &value)?);
            } else {
                tracing::warn!(%key, "etcd: unknown key under the prefix, ignored");
            }
        }
        Ok(snapshot)
    }

    fn commit(&self, expected_revision: u64, ops: &[Op]) -> Result<u64, StoreError> {
        let revision_key = self.key("revision");
        let compare = if expected_revision == 0 {
            json!({"target": "CREATE", "key": b64(&revision_key), "create_revision": "0", "result": "EQUAL"})
        } else {
            json!({"target": "VALUE", "key": b64(&revision_key),
                   "value": b64(&expected_revision.to_string()), "result": "EQUAL"})
        };
        let put =
            |key: String, value: String| json!({"request_put": {"key": b64(&key), "value": value}});
        let delete = |key: String| json!({"request_delete_range": {"key": b64(&key)}});
        let mut success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                Op::PutSettings(record) => put(self.key("settings"), encode(record)),
                Op::PutNetwork(record) => put(
                    self.key(&format!("networks/{}", record.info.name)),
                    encode(record),
                ),
                Op::DeleteNetwork(name) => delete(self.key(&format!("networks/{name}"))),
                Op::PutAgent(record) => {
                    put(self.key(&format!("agents/{}", record.ip)), encode(record))
                }
                Op::DeleteAgent(ip) => delete(self.key(&format!("agents/{ip}"))),
            })
            .collect();
        let new_revision = expected_revision + 1;
        success.push(put(revision_key.clone(), b64(&new_revision.to_string())));
        let answer = self
            .request(
                "/v3/kv/txn",
                json!({
                    "compare": [compare],
                    "success": success,
                    "failure": [{"request_range": {"key": b64(&revision_key)}}],
                }),
                REQUEST_TIMEOUT,
            )
            .map_err(|e| match e {
                StoreError::Backend { context, reason } => StoreError::Backend {
                    context: format!(
                        "committing {} record(s) at revision {new_revision} ({context})",
                        ops.len()
                    ),
                    reason: if reason.contains("database space exceeded") {
                        format!(
                            "{reason}; etcd raised its NOSPACE alarm: writes are refused until \
                             it is compacted, defragmented and the alarm disarmed, then resume \
                             by themselves"
                        )
                    } else {
                        reason
                    },
                },
                other => other,
            })?;
        if answer["succeeded"].as_bool() == Some(true) {
            return Ok(new_revision);
        }
        let kv = &answer["responses"][0]["response_range"]["kvs"][0];
        let actual = if kv.is_null() {
            0
        } else {
            parse_revision(&revision_key, &decode_b64(&kv["value"]))?
        };
        Err(StoreError::Conflict {
            expected: expected_revision,
            actual,
        })
    }

    fn changes(&self) -> Option<mpsc::Receiver<u64>> {
        self.changes.lock().expect("changes lock").take()
    }
}

/// Follows the revision key on any member, reconnecting to the next one when a stream ends.
struct Watcher {
    client: Client,
    key: String,
    tx: mpsc::Sender<u64>,
}

enum WatchEnd {
    /// The stream ended or failed: reconnect.
    Retry(String),
    /// Nobody listens any more.
    Stop,
}

impl Watcher {
    async fn run(self) {
        let mut index = 0;
        loop {
            let member = index % self.client.endpoints.len();
            let endpoint = &self.client.endpoints[member];
            match self.follow(member).await {
                WatchEnd::Stop => return,
                WatchEnd::Retry(reason) => {
                    tracing::debug!(%endpoint, %reason, "etcd watch ended; reconnecting");
                }
            }
            index += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn report(&self, revision: u64) -> Result<(), WatchEnd> {
        self.tx.send(revision).map_err(|_| WatchEnd::Stop)
    }

    async fn follow(&self, member: usize) -> WatchEnd {
        match self.follow_inner(member).await {
            Ok(reason) => WatchEnd::Retry(reason),
            Err(end) => end,
        }
    }

    async fn follow_inner(&self, member: usize) -> Result<String, WatchEnd> {
        let endpoint = &self.client.endpoints[member];
        if self.client.credentials.is_some()
            && self.client.current_token().is_none()
            && let Err(reason) = self.client.authenticate(endpoint).await
        {
            return Ok(reason);
        }
        let mut request = self
            .client
            .http
            .post(format!("{endpoint}/v3/watch"))
            .json(&json!({"create_request": {"key": b64(&self.key)}}));
        if let Some(token) = self.client.current_token() {
            request = request.header(reqwest::header::AUTHORIZATION, token);
        }
        let mut response = match request.send().await {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => return Ok(format!("status {}", response.status())),
            Err(e) => return Ok(e.to_string()),
        };
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Ok("stream closed".into()),
                Err(e) => return Ok(e.to_string()),
            };
            buffer.extend_from_slice(&chunk);
            let mut stream = serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
            let mut consumed = 0;
            let mut messages = Vec::new();
            loop {
                match stream.next() {
                    Some(Ok(message)) => {
                        consumed = stream.byte_offset();
                        messages.push(message);
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => return Ok(format!("unreadable watch message: {e}")),
                    None => break,
                }
            }
            buffer.drain(..consumed);
            for message in messages {
                let result = &message["result"];
                if message.get("error").is_some() || result["canceled"].as_bool() == Some(true) {
                    if is_token_error(&message.to_string()) {
                        // Renewed by the next stream's start.
                        *self.client.token.write().expect("token lock") = None;
                    }
                    return Ok(format!("watch canceled: {message}"));
                }
                if result["created"].as_bool() == Some(true) {
                    // Commits made while no stream was open are seen through a fresh read.
                    if let Some(revision) = self.current(member).await {
                        self.report(revision)?;
                    }
                }
                for event in result["events"].as_array().into_iter().flatten() {
                    let value = decode_b64(&event["kv"]["value"]);
                    if let Ok(revision) = parse_revision(&self.key, &value) {
                        self.report(revision)?;
                    }
                }
            }
        }
    }

    async fn current(&self, member: usize) -> Option<u64> {
        let answer = self
            .client
            .call(
                member,
                "/v3/kv/range",
                &json!({"key": b64(&self.key), "serializable": true}),
                REQUEST_TIMEOUT,
            )
            .await
            .ok()?;
        let kv = &answer["kvs"][0];
        if kv.is_null() {
            return Some(0);
        }
        parse_revision(&self.key, &decode_b64(&kv["value"])).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_prefix_end() {
        assert_eq!(
            parse_endpoints("etcd://127.0.0.1:2379,10.0.0.2:2379", false).unwrap(),
            vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(
            parse_endpoints("etcd://127.0.0.1:2379,https://10.0.0.2:2379", true).unwrap(),
            vec!["https://127.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(
            parse_endpoints("https://a:1,http://b:2", false).unwrap(),
            vec!["https://a:1", "http://b:2"]
        );
        assert!(parse_endpoints("etcd://", false).is_err());
        assert!(parse_endpoints("etcd://ftp://x:1", false).is_err());
        assert!(parse_endpoints("etcd://http://x:1", true).is_err());
        assert!(parse_endpoints("etcd://nohost", false).is_err());
        assert!(parse_endpoints("etcd://x:1/path", false).is_err());
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
