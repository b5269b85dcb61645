//! Async client of the overlay master, with failover across several master URLs.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::tls::MasterTls;
use crate::tls::wire::{IssuedCertificate, JoinRequest, RenewRequest, TokenRequest, TokenResponse};
use crate::types::{
    AgentInfo, DELETED_AGENTS_HEADER, DeleteAgentsRequest, ErrorBody, OverlayInfo, RegisterRequest,
    State, Watched, WatchedDelta,
};

/// Time limit of an ordinary request (a watch adds its own long-poll time to it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No master answered (connection refused, timeout, or a 5xx from every one of them).
    #[error("no overlay master reachable: {}", .attempts.join("; "))]
    Unreachable { attempts: Vec<String> },
    /// A master refused the request (4xx); `message` is its `{"error": ...}` text.
    #[error("overlay master refused the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// A master answered with a body this client cannot read.
    #[error("bad answer from overlay master {url}: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("invalid master URL list: {0}")]
    Config(String),
}

impl ClientError {
    /// True when the request should simply be retried later (no master answered).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }

    /// The HTTP status of a refusal, if this is one.
    pub fn rejected_status(&self) -> Option<u16> {
        match self {
            ClientError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Client of one overlay master or of several: each request goes to the first master that
/// answers, in the given order (a connection failure or a 5xx moves on to the next one).
#[derive(Debug, Clone)]
pub struct MasterClient {
    base_urls: Vec<String>,
    /// Replaced whole when the TLS identity changes (certificate renewal), so no pooled
    /// connection keeps presenting the old certificate.
    http: Arc<RwLock<reqwest::Client>>,
}

fn http_client(tls: Option<&MasterTls>) -> Result<reqwest::Client, ClientError> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        let config = tls
            .client_config()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        builder = builder.use_preconfigured_tls(config);
        if let Some(token) = &tls.admin_token {
            let mut headers = reqwest::header::HeaderMap::new();
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::Config("admin token: not a valid header value".into()))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder = builder.default_headers(headers);
        }
    }
    builder
        .build()
        .map_err(|e| ClientError::Config(e.to_string()))
}

impl MasterClient {
    /// `base_urls` are like `http://10.0.0.1:5000` (no trailing route). Plain HTTP, or
    /// HTTPS without a client identity and trusting no CA: use [`with_tls`](Self::with_tls)
    /// for a master serving TLS.
    pub fn new<I, S>(base_urls: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::build(base_urls, None)
    }

    /// A client of masters serving HTTPS: trusts `tls.ca_pem`, presents `tls.identity` (an
    /// agent) and/or sends `tls.admin_token` (an operator).
    pub fn with_tls<I, S>(base_urls: I, tls: &MasterTls) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::build(base_urls, Some(tls))
    }

    /// Replaces the TLS material (a renewed certificate); later requests use new connections.
    pub fn set_tls(&self, tls: &MasterTls) -> Result<(), ClientError> {
        let http = http_client(Some(tls))?;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
        Ok(())
    }

    fn build<I, S>(base_urls: I, tls: Option<&MasterTls>) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let base_urls: Vec<String> = base_urls
            .into_iter()
            .map(|u| u.into().trim_end_matches('/').to_owned())
            .collect();
        if base_urls.is_empty() {
            return Err(ClientError::Config(
                "at least one master URL is needed".into(),
            ));
        }
        for url in &base_urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ClientError::Config(format!(
                    "master URL {url:?} must start with http:// or https://"
                )));
            }
        }
        let http = Arc::new(RwLock::new(http_client(tls)?));
        Ok(MasterClient { base_urls, http })
    }

    pub fn base_urls(&self) -> &[String] {
        &self.base_urls
    }

    /// Registers (or heartbeats) the agent with this underlay IP; returns its allocation.
    /// Idempotent: the same IP always gets the same allocation back.
    pub async fn register(&self, agent_ip: IpAddr) -> Result<AgentInfo, ClientError> {
        self.register_with(agent_ip, None).await
    }

    /// [`Self::register`] saying what the agent asks for, as DC/OS agents do (e.g. no
    /// bridges on a master node).
    pub async fn register_with(
        &self,
        agent_ip: IpAddr,
        network_config: Option<crate::AgentNetworkConfig>,
    ) -> Result<AgentInfo, ClientError> {
        let body = RegisterRequest {
            ip: agent_ip,
            endpoints: None,
            endpoint_list: None,
            drops: None,
            network_config,
        };
        self.send(
            Method::POST,
            "/overlay-master/agents",
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    pub async fn state(&self) -> Result<State, ClientError> {
        self.send::<()>(Method::GET, "/overlay-master/state", None, REQUEST_TIMEOUT)
            .await?
            .json()
    }

    /// Long-polls for a state newer than `after_revision`. Returns at once when the master is
    /// already past it, `Ok(None)` when nothing changed within `timeout`.
    pub async fn watch(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<Option<Watched>, ClientError> {
        self.long_poll(after_revision, timeout, "").await
    }

    /// Like [`watch`](Self::watch), but answers with only what changed after `after_revision`
    /// (see [`WatchedDelta`]); apply it to the copy of the state held at that revision.
    pub async fn watch_delta(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<Option<WatchedDelta>, ClientError> {
        self.long_poll(after_revision, timeout, "&delta=true").await
    }

    /// One long-poll of the watch; `None` when it timed out with nothing new (204).
    async fn long_poll<T: DeserializeOwned>(
        &self,
        after_revision: u64,
        timeout: Duration,
        extra_query: &str,
    ) -> Result<Option<T>, ClientError> {
        let path = format!(
            "/overlay-master/watch?after={after_revision}&timeout_ms={}{extra_query}",
            timeout.as_millis()
        );
        let answer = self
            .send::<()>(Method::GET, &path, None, timeout + REQUEST_TIMEOUT)
            .await?;
        if answer.status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        answer.json().map(Some)
    }

    /// Forgets these agents and frees their allocations; returns the ones that existed.
    pub async fn delete_agents(&self, agent_ips: &[IpAddr]) -> Result<Vec<IpAddr>, ClientError> {
        let body = DeleteAgentsRequest {
            agents: agent_ips.to_vec(),
        };
        self.send(
            Method::POST,
            "/overlay-master/agents/delete",
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .await?
        .deleted_agents()
    }

    /// Adds a network at run time; registered agents get their share at once.
    /// Returns the network as stored (with its VNI filled in).
    pub async fn add_network(&self, network: &OverlayInfo) -> Result<OverlayInfo, ClientError> {
        self.send(
            Method::POST,
            "/overlay-master/networks",
            Some(network),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    /// Sets `enabled: false` on a network (agents keep their allocation).
    pub async fn disable_network(&self, name: &str) -> Result<OverlayInfo, ClientError> {
        let path = format!("/overlay-master/networks/{name}/disable");
        self.send::<()>(Method::POST, &path, None, REQUEST_TIMEOUT)
            .await?
            .json()
    }

    /// Sets `enabled: true` on a network.
    pub async fn enable_network(&self, name: &str) -> Result<OverlayInfo, ClientError> {
        let path = format!("/overlay-master/networks/{name}/enable");
        self.send::<()>(Method::POST, &path, None, REQUEST_TIMEOUT)
            .await?
            .json()
    }

    /// Removes a network and frees every agent's allocation in it.
    pub async fn remove_network(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/overlay-master/networks/{name}");
        self.send::<()>(Method::DELETE, &path, None, REQUEST_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Registers (or heartbeats) and reports the agent's local endpoints per network.
    pub async fn heartbeat(
        &self,
        agent_ip: IpAddr,
        endpoints: std::collections::BTreeMap<String, u32>,
    ) -> Result<AgentInfo, ClientError> {
        let body = RegisterRequest {
            ip: agent_ip,
            endpoints: Some(endpoints),
            endpoint_list: None,
            drops: None,
            network_config: None,
        };
        self.send(
            Method::POST,
            "/overlay-master/agents",
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    /// [`Self::heartbeat`] that also reports every container address (for the master's
    /// `/overlay-master/endpoints` and Networks page).
    pub async fn heartbeat_with_endpoints(
        &self,
        agent_ip: IpAddr,
        endpoints: std::collections::BTreeMap<String, u32>,
        endpoint_list: Vec<crate::types::ReportedEndpoint>,
        drops: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    ) -> Result<AgentInfo, ClientError> {
        let body = RegisterRequest {
            ip: agent_ip,
            endpoints: Some(endpoints),
            endpoint_list: Some(endpoint_list),
            drops: Some(drops),
            network_config: None,
        };
        self.send(
            Method::POST,
            "/overlay-master/agents",
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    /// Trades a join token for a certificate of `agent_ip`'s key (`csr_pem`).
    pub async fn join(
        &self,
        token: &str,
        agent_ip: IpAddr,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, ClientError> {
        let body = JoinRequest {
            token: token.to_owned(),
            ip: agent_ip,
            csr: csr_pem.to_owned(),
        };
        self.send(
            Method::POST,
            "/overlay-master/join",
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    /// [`Self::delete_agents`], with `force` also agents that heartbeated recently.
    pub async fn delete_agents_forced(
        &self,
        agent_ips: &[IpAddr],
        force: bool,
    ) -> Result<Vec<IpAddr>, ClientError> {
        let body = DeleteAgentsRequest {
            agents: agent_ips.to_vec(),
        };
        let path = format!("/overlay-master/agents/delete?force={force}");
        self.send(Method::POST, &path, Some(&body), REQUEST_TIMEOUT)
            .await?
            .deleted_agents()
    }

    /// [`Self::disable_network`], with `force` also one that holds endpoints or that the
    /// configuration file defines.
    pub async fn disable_network_forced(
        &self,
        name: &str,
        force: bool,
    ) -> Result<OverlayInfo, ClientError> {
        let path = format!("/overlay-master/networks/{name}/disable?force={force}");
        self.send::<()>(Method::POST, &path, None, REQUEST_TIMEOUT)
            .await?
            .json()
    }

    /// [`Self::remove_network`], with `force` also one that holds endpoints or that the
    /// configuration file defines.
    pub async fn remove_network_forced(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let path = format!("/overlay-master/networks/{name}?force={force}");
        self.send::<()>(Method::DELETE, &path, None, REQUEST_TIMEOUT)
            .await?;
        Ok(())
    }

    /// A new certificate for the caller's own address (authenticated by its current one).
    pub async fn renew_certificate(&self, csr_pem: &str) -> Result<IssuedCertificate, ClientError> {
        let body = RenewRequest {
            csr: csr_pem.to_owned(),
        };
        self.send(
            Method::POST,
            "/overlay-master/certificates/renew",
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    /// A single-use join token (admin).
    pub async fn create_join_token(
        &self,
        request: &TokenRequest,
    ) -> Result<TokenResponse, ClientError> {
        self.send(
            Method::POST,
            "/overlay-master/tokens",
            Some(request),
            REQUEST_TIMEOUT,
        )
        .await?
        .json()
    }

    /// `GET /health` of the first master that answers at all: its JSON body, whether it says
    /// healthy (200) or not (503, e.g. its store lost quorum).
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        let mut attempts = Vec::new();
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        for base in &self.base_urls {
            let url = format!("{base}/health");
            match http.get(&url).timeout(REQUEST_TIMEOUT).send().await {
                Ok(response) => {
                    let bytes = response.bytes().await.unwrap_or_default();
                    return serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
                        url,
                        reason: e.to_string(),
                    });
                }
                Err(error) => attempts.push(format!("{url}: {}", error_chain(&error))),
            }
        }
        Err(ClientError::Unreachable { attempts })
    }

    /// `GET` of an extra JSON route of the master (`/overlay-master/agents/liveness`, ...).
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<()>(Method::GET, path, None, REQUEST_TIMEOUT)
            .await?
            .json()
    }

    /// Sends the request to each master in turn until one answers with a non-5xx status.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let mut attempts = Vec::new();
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        for base in &self.base_urls {
            let url = format!("{base}{path}");
            let mut request = http.request(method.clone(), &url).timeout(timeout);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(error) => {
                    tracing::debug!(%url, %error, "overlay master unreachable, trying the next");
                    attempts.push(format!("{url}: {}", error_chain(&error)));
                    continue;
                }
            };
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(error) => {
                    attempts.push(format!("{url}: reading the answer: {error}"));
                    continue;
                }
            };
            if status.is_server_error() {
                attempts.push(format!("{url}: {status}: {}", error_message(&bytes)));
                continue;
            }
            if status.is_client_error() {
                return Err(ClientError::Rejected {
                    status: status.as_u16(),
                    message: error_message(&bytes),
                });
            }
            return Ok(Answer {
                url,
                status,
                headers,
                bytes,
            });
        }
        Err(ClientError::Unreachable { attempts })
    }
}

/// A successful (2xx/3xx) answer.
struct Answer {
    url: String,
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    bytes: bytes::Bytes,
}

impl Answer {
    /// The agents a delete removed (the answer's body is the whole state).
    fn deleted_agents(&self) -> Result<Vec<IpAddr>, ClientError> {
        let bad = |reason: String| ClientError::BadResponse {
            url: self.url.clone(),
            reason,
        };
        let text = self
            .headers
            .get(DELETED_AGENTS_HEADER)
            .ok_or_else(|| bad(format!("no {DELETED_AGENTS_HEADER} header")))?
            .to_str()
            .map_err(|e| bad(format!("{DELETED_AGENTS_HEADER}: {e}")))?;
        text.split(',')
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse()
                    .map_err(|e| bad(format!("{DELETED_AGENTS_HEADER} {part:?}: {e}")))
            })
            .collect()
    }

    fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.bytes).map_err(|e| ClientError::BadResponse {
            url: self.url.clone(),
            reason: e.to_string(),
        })
    }
}

/// An error with its sources (reqwest hides a TLS refusal's reason in them).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The `error` text of an error body, or the raw body when it is not one.
fn error_message(bytes: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => body.error,
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_or_schemeless_url_lists() {
        assert!(matches!(
            MasterClient::new(Vec::<String>::new()),
            Err(ClientError::Config(_))
        ));
        assert!(matches!(
            MasterClient::new(["10.0.0.1:5055"]),
            Err(ClientError::Config(_))
        ));
        let client = MasterClient::new(["http://10.0.0.1:5055/", "http://10.0.0.2:5055"]).unwrap();
        assert_eq!(
            client.base_urls(),
            ["http://10.0.0.1:5055", "http://10.0.0.2:5055"]
        );
    }

    #[tokio::test]
    async fn unreachable_masters_are_reported_as_such() {
        // Bind and drop to get a loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = MasterClient::new([format!("http://127.0.0.1:{port}")]).unwrap();
        let error = client.state().await.unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        assert!(error.to_string().contains(&port.to_string()), "{error}");
    }
}
