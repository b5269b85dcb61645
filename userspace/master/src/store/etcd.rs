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
//! writes with an error naming etcd until quorum returns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
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
pub fn parse_endpoints(spec: &str) -> Result<Vec<String>, String> {
    let list = spec.strip_prefix("etcd://").unwrap_or(spec);
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|member| {
            if member.contains("://") {
                Err(format!(
                    "etcd member {member:?}: give host:port (the scheme is http)"
                ))
            } else if !member.contains(':') {
                Err(format!("etcd member {member:?}: host:port expected"))
            } else {
                Ok(format!("http://{member}"))
            }
        })
        .collect::<Result<_, _>>()?;
    if endpoints.is_empty() {
        return Err(format!("no etcd member in {spec:?}"));
    }
    Ok(endpoints)
}

pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    http: reqwest::Client,
    /// Our own runtime: the trait is synchronous and is called from inside the master's runtime
    /// too, so requests run here and the caller waits on a channel.
    runtime: Option<tokio::runtime::Runtime>,
    /// Member that answered last; requests start there.
    preferred: AtomicUsize,
    changes: Mutex<Option<mpsc::Receiver<u64>>>,
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
    /// Connects to the members (`http://host:port`). Checks that one of them answers.
    pub fn open(endpoints: Vec<String>, prefix: &str) -> Result<Self, StoreError> {
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
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| backend("building the etcd HTTP client", e))?;
        let (tx, rx) = mpsc::channel();
        let store = EtcdStore {
            endpoints,
            prefix: prefix.to_owned(),
            http,
            runtime: Some(runtime),
            preferred: AtomicUsize::new(0),
            changes: Mutex::new(Some(rx)),
        };
        store.request("/v3/maintenance/status", json!({}), REQUEST_TIMEOUT)?;
        let watcher = Watcher {
            endpoints: store.endpoints.clone(),
            http: store.http.clone(),
            key: store.key("revision"),
            tx,
        };
        store.runtime().spawn(watcher.run());
        Ok(store)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
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
        let endpoints = self.endpoints.clone();
        let http = self.http.clone();
        let start = self.preferred.load(Ordering::Relaxed);
        let route = path.to_owned();
        self.runtime().spawn(async move {
            let mut failures = Vec::new();
            for n in 0..endpoints.len() {
                let index = (start + n) % endpoints.len();
                let url = format!("{}{route}", endpoints[index]);
                match post(&http, &url, &body, timeout).await {
                    Ok(answer) => {
                        let _ = tx.send(Ok((index, answer)));
                        return;
                    }
                    Err(reason) => failures.push(format!("{}: {reason}", endpoints[index])),
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
) -> Result<Value, String> {
    let response = http
        .post(url)
        .timeout(timeout)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{status}: unreadable answer ({e})"))?;
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
                    reason,
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
    endpoints: Vec<String>,
    http: reqwest::Client,
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
            let endpoint = &self.endpoints[index % self.endpoints.len()];
            match self.follow(endpoint).await {
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

    async fn follow(&self, endpoint: &str) -> WatchEnd {
        match self.follow_inner(endpoint).await {
            Ok(reason) => WatchEnd::Retry(reason),
            Err(end) => end,
        }
    }

    async fn follow_inner(&self, endpoint: &str) -> Result<String, WatchEnd> {
        let mut response = match self
            .http
            .post(format!("{endpoint}/v3/watch"))
            .json(&json!({"create_request": {"key": b64(&self.key)}}))
            .send()
            .await
        {
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
                    return Ok(format!("watch canceled: {message}"));
                }
                if result["created"].as_bool() == Some(true) {
                    // Commits made while no stream was open are seen through a fresh read.
                    if let Some(revision) = self.current(endpoint).await {
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

    async fn current(&self, endpoint: &str) -> Option<u64> {
        let answer = post(
            &self.http,
            &format!("{endpoint}/v3/kv/range"),
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
            parse_endpoints("etcd://127.0.0.1:2379,10.0.0.2:2379").unwrap(),
            vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert!(parse_endpoints("etcd://").is_err());
        assert!(parse_endpoints("etcd://http://x:1").is_err());
        assert!(parse_endpoints("etcd://nohost").is_err());
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
