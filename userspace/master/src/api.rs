//! HTTP/JSON API (DC/OS routes and shapes, plus network changes, watch, metrics, health).
//! Every error answer is `{"error": "..."}` naming the offending field.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use overlay_api::ErrorBody;
use overlay_api::tls::wire::{
    IssuedCertificate, JoinRequest, RenewRequest, TokenRequest, TokenResponse,
};
use serde::Deserialize;

use crate::auth::{Auth, Authenticated};
use crate::config::OverlaySpec;
use crate::master::{AgentNetworkConfig, Master, MasterError, NetworkChange};
use crate::pki::TokenError;

/// Longest long-poll a watcher may ask for.
pub const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The API; `auth` decides who may call what (see [`crate::auth`]).
pub fn router(master: Arc<Master>, auth: Arc<Auth>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/overlay-master/agents/liveness", get(agents_liveness))
        .route("/overlay-master/endpoints", get(endpoints))
        .route("/overlay-master/ui", get(crate::ui::page))
        .route("/overlay-master/ui/data", get(crate::ui::data))
        .route("/metrics", get(metrics))
        .route("/overlay-master/state", get(state))
        .route("/overlay-master/watch", get(watch))
        .route("/overlay-master/agents", post(register))
        .route("/overlay-master/agents/delete", post(delete_agents))
        .route("/overlay-master/networks", post(add_network))
        .route(
            "/overlay-master/networks/{name}",
            axum::routing::delete(remove_network),
        )
        .route(
            "/overlay-master/networks/{name}/disable",
            post(disable_network),
        )
        .route(
            "/overlay-master/networks/{name}/enable",
            post(enable_network),
        )
        .route("/overlay-master/ca", get(ca_certificate))
        .route("/overlay-master/join", post(join))
        .route(
            "/overlay-master/certificates/renew",
            post(renew_certificate),
        )
        .route("/overlay-master/tokens", post(create_token))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(access_log))
        .layer(axum::Extension(auth))
        .with_state(master)
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: String) -> Self {
        ApiError { status, message }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<MasterError> for ApiError {
    fn from(error: MasterError) -> Self {
        let status = match &error {
            MasterError::Invalid(_) => StatusCode::BAD_REQUEST,
            MasterError::NotFound(_) => StatusCode::NOT_FOUND,
            MasterError::Conflict(_) => StatusCode::CONFLICT,
            MasterError::Unavailable(_) | MasterError::Exhausted(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError {
            status,
            message: error.to_string(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // The body text names the field path (e.g. "subnet: invalid IP address syntax").
        ApiError {
            status: rejection.status(),
            message: format!("invalid request body: {}", rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(format!("invalid query: {}", rejection.body_text()))
    }
}

fn json_bytes(bytes: bytes::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such route".into(),
    }
}

/// Longest a health check waits for the store.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The store's answer to a probe read, or why there was none.
async fn probe_store(master: &Arc<Master>) -> Result<(), String> {
    let probing = Arc::clone(master);
    match tokio::time::timeout(
        STORE_PROBE_TIMEOUT,
        tokio::task::spawn_blocking(move || probing.probe_store()),
    )
    .await
    {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(format!("the store probe failed: {join}")),
        Err(_) => Err(format!(
            "the store did not answer within {} s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// 200 while the store answers reads (etcd: with a quorum), 503 naming the fault otherwise.
/// Unauthenticated: load balancers and systemd probes call it.
async fn health(State(master): State<Arc<Master>>) -> Response {
    match probe_store(&master).await {
        Ok(()) => Json(serde_json::json!({
            "status": "ok", "store": "ok", "revision": master.revision()
        }))
        .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "unhealthy", "store": error, "revision": master.revision()
            })),
        )
            .into_response(),
    }
}

/// Whether this master takes agents: its state is loaded (the route answers 503 `starting`
/// before, see [`starting_router`]) and its store answers.
async fn ready(State(master): State<Arc<Master>>) -> Response {
    match probe_store(&master).await {
        Ok(()) => {
            Json(serde_json::json!({"ready": true, "revision": master.revision()})).into_response()
        }
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": error})),
        )
            .into_response(),
    }
}

/// What answers while the master is still opening its store (the listen address is bound
/// first, so a port conflict fails before the store is touched).
pub fn starting_router() -> Router {
    let starting = || async {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({"status": "starting", "ready": false, "reason": "opening the store"}),
            ),
        )
    };
    Router::new()
        .route("/health", get(starting))
        .route("/ready", get(starting))
        .fallback(starting)
}

/// Every agent with its last heartbeat and whether it is stale.
async fn agents_liveness(
    State(master): State<Arc<Master>>,
    who: Authenticated,
) -> Result<Response, ApiError> {
    who.caller.require_read(&who.auth, "agents")?;
    Ok(Json(master.liveness()).into_response())
}

/// Every container address the agents reported, with its agent.
async fn endpoints(
    State(master): State<Arc<Master>>,
    who: Authenticated,
) -> Result<Response, ApiError> {
    who.caller.require_read(&who.auth, "endpoints")?;
    Ok(Json(master.endpoints()).into_response())
}

/// Who made a request, for the access log.
fn caller_name(caller: &crate::auth::Caller) -> String {
    use crate::auth::Caller;
    match caller {
        Caller::Unauthenticated => "unauthenticated (insecure http)".into(),
        Caller::Admin => "admin".into(),
        Caller::Agent(ip) => format!("agent {ip}"),
        Caller::Anonymous { .. } => "anonymous".into(),
    }
}

/// Logs every state-changing request (anything but GET/HEAD): who, what, the answer. Agent
/// heartbeats (`POST /overlay-master/agents` by the agent itself) are logged at debug only.
async fn access_log(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::extract::FromRequestParts as _;
    let method = request.method().clone();
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let caller = Authenticated::from_request_parts(&mut parts, &())
        .await
        .map(|who| who.caller);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let request = axum::extract::Request::from_parts(parts, body);
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let who = caller
        .as_ref()
        .map_or_else(|_| "unknown".to_owned(), caller_name);
    let heartbeat =
        path == "/overlay-master/agents" && matches!(caller, Ok(crate::auth::Caller::Agent(_)));
    let millis = started.elapsed().as_millis() as u64;
    let query = query.unwrap_or_default();
    if heartbeat && status < 400 {
        tracing::debug!(target: "access", %method, %path, status, caller = %who, millis, "request");
    } else {
        tracing::info!(target: "access", %method, %path, %query, status, caller = %who, millis, "request");
    }
    response
}

async fn metrics(
    State(master): State<Arc<Master>>,
    who: Authenticated,
) -> Result<Response, ApiError> {
    who.caller.require_read(&who.auth, "/metrics")?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        master.metrics_text(),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateQuery {
    /// JSONP callback, as DC/OS's (libprocess) endpoints take it.
    jsonp: Option<String>,
}

/// Longest JSONP callback name accepted.
const MAX_JSONP_CALLBACK: usize = 128;

/// A JSONP callback must be a (dotted) JavaScript identifier: anything else could inject
/// script into the answer. (DC/OS echoes any text; this master refuses it.)
fn check_jsonp_callback(callback: &str) -> Result<(), ApiError> {
    let identifier = |part: &str| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    };
    if callback.len() > MAX_JSONP_CALLBACK || !callback.split('.').all(identifier) {
        return Err(ApiError::bad_request(format!(
            "jsonp = {callback:?}: not a JavaScript identifier (letters, digits, _ and $, \
             dot-separated, at most {MAX_JSONP_CALLBACK} characters)"
        )));
    }
    Ok(())
}

async fn state(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    query: Result<Query<StateQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_read(&who.auth, "the state")?;
    let Query(query) = query?;
    let state = master.state_body().await.state_json();
    match query.jsonp {
        None => Ok(json_bytes(state)),
        Some(callback) => {
            check_jsonp_callback(&callback)?;
            let mut body = Vec::with_capacity(callback.len() + state.len() + 3);
            body.extend_from_slice(callback.as_bytes());
            body.push(b'(');
            body.extend_from_slice(&state);
            body.extend_from_slice(b");");
            Ok((
                [
                    (header::CONTENT_TYPE, "text/javascript"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                body,
            )
                .into_response())
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    after: Option<u64>,
    timeout_ms: Option<u64>,
    /// Answer with a `WatchedDelta` (only what changed after `after`).
    delta: Option<bool>,
}

/// Decrements the watcher gauge however the request ends (including client disconnects).
struct WatcherGuard<'a>(&'a Master);

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Long-poll: answers as soon as the revision differs from `after` (at once when it already
/// does, including when the master's revision is behind the caller's after a data loss),
/// 204 when nothing changed within `timeout_ms`. With `delta=true` the answer is a
/// `WatchedDelta` instead of the whole state.
async fn watch(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_read(&who.auth, "the watch")?;
    let Query(query) = query?;
    let after = query.after.unwrap_or(0);
    let timeout = query
        .timeout_ms
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_millis)
        .min(MAX_WATCH_TIMEOUT);
    let mut revisions = master.subscribe();
    master.metrics.watchers.fetch_add(1, Ordering::Relaxed);
    let guard = WatcherGuard(&master);
    // Reduce the borrowed `Ref` to a plain outcome before awaiting anything else.
    let changed = tokio::time::timeout(timeout, revisions.wait_for(|&revision| revision != after))
        .await
        .map(|result| result.map(|_| ()));
    drop(guard);
    match changed {
        Err(_elapsed) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Err(_closed)) => Err(MasterError::Unavailable("master is shutting down".into()).into()),
        Ok(Ok(())) if query.delta == Some(true) => Ok(json_bytes(master.delta_body(after).await)),
        Ok(Ok(())) => Ok(json_bytes(master.state_body().await.watch_body)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    ip: IpAddr,
    /// The agent's local endpoints per network (optional).
    #[serde(default)]
    endpoints: Option<std::collections::BTreeMap<String, u32>>,
    /// The agent's containers (optional).
    #[serde(default)]
    endpoint_list: Option<Vec<overlay_api::ReportedEndpoint>>,
    /// Drops by network and reason (optional).
    #[serde(default)]
    drops: Option<crate::master::DropReport>,
    /// DC/OS's `AgentNetworkConfig` (optional).
    #[serde(default)]
    network_config: Option<overlay_api::AgentNetworkConfig>,
}

/// `?force=true`: the change goes ahead even where it would cut off running containers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

fn force_of(query: Result<Query<ForceQuery>, QueryRejection>) -> Result<bool, ApiError> {
    let Query(query) = query?;
    Ok(query.force)
}

fn check_agent_ip(field: &str, ip: IpAddr) -> Result<(), ApiError> {
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err(ApiError::bad_request(format!(
            "{field} = {ip}: not a unicast agent address"
        )));
    }
    Ok(())
}

async fn register(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    body: Result<Json<RegisterBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    // Authentication first: an anonymous caller learns nothing from validation errors.
    who.caller.require_read(&who.auth, "agents")?;
    let Json(body) = body?;
    who.caller.require_agent_or_admin(body.ip, "register")?;
    check_agent_ip("ip", body.ip)?;
    let wishes = body.network_config.unwrap_or_default();
    if wishes.allocate_subnet == Some(false) {
        // DC/OS would give such an agent VTEP-only entries; nothing here uses them.
        return Err(ApiError::bad_request(
            "network_config.allocate_subnet = false: not supported (every agent gets a \
             subnet of every network; ask for mesos_bridge/docker_bridge = false instead)",
        ));
    }
    let info = master
        .heartbeat_with(
            body.ip,
            body.endpoints,
            AgentNetworkConfig {
                mesos_bridge: wishes.mesos_bridge,
                docker_bridge: wishes.docker_bridge,
            },
        )
        .await?;
    if body.endpoint_list.is_some() || body.drops.is_some() {
        master.note_report(
            body.ip,
            body.endpoint_list.unwrap_or_default(),
            body.drops.unwrap_or_default(),
        );
    }
    Ok(Json(info).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    /// Read as values so a bad entry is a 400 naming it (as DC/OS answers), not a 422.
    agents: Vec<serde_json::Value>,
}

/// The agents of a delete request: IPv4 addresses (IPv6 too with `--ipv6-underlay`).
fn delete_targets(body: &DeleteBody, ipv6_underlay: bool) -> Result<Vec<IpAddr>, ApiError> {
    body.agents
        .iter()
        .enumerate()
        .map(|(index, value)| {
            let ip = value
                .as_str()
                .and_then(|text| text.parse::<IpAddr>().ok())
                .filter(|ip| ip.is_ipv4() || ipv6_underlay);
            ip.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "agents[{index}] = {value}: not an {} address",
                    if ipv6_underlay { "IP" } else { "IPv4" }
                ))
            })
        })
        .collect()
}

async fn delete_agents(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    query: Result<Query<ForceQuery>, QueryRejection>,
    body: Result<Json<DeleteBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_admin("deleting agents")?;
    let force = force_of(query)?;
    let Json(body) = body?;
    let agents = delete_targets(&body, master.ipv6_underlay())?;
    // Delete first (an unforced delete of a live agent is refused and must revoke nothing),
    // then revoke what was deleted: it must not register again with the certificate it has.
    let deleted = master.delete_agents(agents, force).await?;
    if let Some(revocations) = &who.auth.revocations {
        revocations.revoke_agents(&deleted).map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("revoking the agents' certificates: {e:#}"),
            )
        })?;
    }
    // DC/OS answers with the whole state; which agents existed and went is in a header.
    let deleted_header = deleted
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut response = json_bytes(master.state_body().await.state_json());
    response.headers_mut().insert(
        overlay_api::DELETED_AGENTS_HEADER,
        deleted_header
            .parse()
            .expect("addresses are valid header text"),
    );
    Ok(response)
}

async fn add_network(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    body: Result<Json<OverlaySpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_admin("adding a network")?;
    let Json(spec) = body?;
    let overlay = spec.into_overlay("").map_err(ApiError::bad_request)?;
    let network = master.change_networks(NetworkChange::Add(overlay)).await?;
    Ok((StatusCode::CREATED, Json(network)).into_response())
}

async fn set_enabled(
    master: &Master,
    name: String,
    enabled: bool,
    force: bool,
) -> Result<Response, ApiError> {
    let network = master
        .change_networks_forced(NetworkChange::SetEnabled { name, enabled }, force)
        .await?;
    Ok(Json(network).into_response())
}

async fn disable_network(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    Path(name): Path<String>,
    query: Result<Query<ForceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_admin("disabling a network")?;
    set_enabled(&master, name, false, force_of(query)?).await
}

async fn enable_network(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    Path(name): Path<String>,
    query: Result<Query<ForceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_admin("enabling a network")?;
    set_enabled(&master, name, true, force_of(query)?).await
}

async fn remove_network(
    State(master): State<Arc<Master>>,
    who: Authenticated,
    Path(name): Path<String>,
    query: Result<Query<ForceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_admin("removing a network")?;
    let force = force_of(query)?;
    master
        .change_networks_forced(NetworkChange::Remove(name.clone()), force)
        .await?;
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

fn needs_tls(auth: &Auth) -> Result<&crate::pki::ClusterCa, ApiError> {
    auth.ca.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this master serves plain HTTP (--insecure-http): no CA, no certificates".into(),
        )
    })
}

fn unavailable(context: &str, error: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{context}: {error:#}"),
    )
}

/// The cluster CA certificate (public; an agent joining with `--ca-cert-hash` checks it).
async fn ca_certificate(who: Authenticated) -> Result<Response, ApiError> {
    let ca = needs_tls(&who.auth)?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        ca.cert_pem().to_owned(),
    )
        .into_response())
}

fn issued(ca: &crate::pki::ClusterCa, certificate: String, not_after: i64) -> Response {
    Json(IssuedCertificate {
        certificate,
        ca: ca.cert_pem().to_owned(),
        not_after,
    })
    .into_response()
}

/// A join token buys an agent certificate for the address it names (once).
async fn join(
    who: Authenticated,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let ca = needs_tls(&who.auth)?;
    let Json(body) = body?;
    check_agent_ip("ip", body.ip)?;
    crate::pki::consume_join_token(ca.dir(), &body.token, body.ip).map_err(|e| match e {
        TokenError::Malformed => ApiError::bad_request(e.to_string()),
        TokenError::Store(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        _ => ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()),
    })?;
    let (certificate, not_after) = ca
        .sign_agent_csr(body.ip, &body.csr, who.auth.cert_lifetime)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    tracing::info!(agent = %body.ip, "agent joined with a token; certificate issued");
    Ok(issued(ca, certificate, not_after))
}

/// A fresh certificate for the calling agent's own address.
async fn renew_certificate(
    who: Authenticated,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let ca = needs_tls(&who.auth)?;
    let ip = who.caller.require_agent("renewing a certificate")?;
    let Json(body) = body?;
    let (certificate, not_after) = ca
        .sign_agent_csr(ip, &body.csr, who.auth.cert_lifetime)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    Ok(issued(ca, certificate, not_after))
}

/// Largest join-token lifetime the API hands out.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

async fn create_token(
    who: Authenticated,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    who.caller.require_admin("creating a join token")?;
    let ca = needs_tls(&who.auth)?;
    let Json(body) = body?;
    let ttl = Duration::from_secs(body.ttl_seconds.unwrap_or(3600));
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(ApiError::bad_request(format!(
            "ttl_seconds = {}: must be between 1 and {}",
            ttl.as_secs(),
            MAX_TOKEN_TTL.as_secs()
        )));
    }
    if let Some(ip) = body.ip {
        check_agent_ip("ip", ip)?;
    }
    let (token, expires) = crate::pki::create_join_token(ca.dir(), ttl, body.ip)
        .map_err(|e| unavailable("storing the join token", e))?;
    Ok((StatusCode::CREATED, Json(TokenResponse { token, expires })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dcos_default;
    use crate::store::memory::MemoryStore;
    use tower_service::Service as _;

    /// A watch asking for an hour ends (204) after [`MAX_WATCH_TIMEOUT`]: no client can pin a
    /// connection and a watcher slot for longer.
    #[tokio::test(start_paused = true)]
    async fn a_watch_longer_than_the_cap_ends_at_the_cap() {
        let master = Master::start(Arc::new(MemoryStore::new()), dcos_default()).unwrap();
        let mut api = router(Arc::clone(&master), Arc::new(Auth::insecure()));
        let request = axum::http::Request::get(format!(
            "/overlay-master/watch?after={}&timeout_ms=3600000",
            master.revision()
        ))
        .body(axum::body::Body::empty())
        .unwrap();
        let started = tokio::time::Instant::now();
        let answer = api.call(request).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(answer.status(), StatusCode::NO_CONTENT);
        assert!(
            waited >= MAX_WATCH_TIMEOUT && waited < MAX_WATCH_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
    }
}
