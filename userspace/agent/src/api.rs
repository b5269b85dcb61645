//! The agent's local HTTP API, served on a Unix socket (and `/metrics` optionally on TCP).

use std::net::Ipv4Addr;

use axum::{
    Json, Router,
    extract::{Path, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use overlay_api::{
    ErrorBody,
    agent::{AddEndpoint, GcRequest},
};

use crate::runtime::{EndpointError, Shared};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

fn endpoint_error(e: EndpointError) -> Response {
    let status = match &e {
        EndpointError::Invalid(_) => StatusCode::BAD_REQUEST,
        EndpointError::Conflict(_) => StatusCode::CONFLICT,
        EndpointError::NotFound(_) => StatusCode::NOT_FOUND,
        EndpointError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        EndpointError::Exhausted(_) => StatusCode::INSUFFICIENT_STORAGE,
        EndpointError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, format!("{e:#}"))
}

async fn overlay(State(core): State<Shared>) -> Response {
    match core.lock().unwrap().me() {
        Some(me) => Json(me.clone()).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not registered with a master yet (no master answers and no saved state)",
        ),
    }
}

async fn status(State(core): State<Shared>) -> Response {
    Json(core.lock().unwrap().status()).into_response()
}

async fn list_endpoints(State(core): State<Shared>) -> Response {
    match core.lock().unwrap().endpoints() {
        Ok(eps) => Json(eps).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn add_endpoint(
    State(core): State<Shared>,
    body: Result<Json<AddEndpoint>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad endpoint request: {}", e.body_text()),
            );
        }
    };
    match core.lock().unwrap().add_endpoint(&req) {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn remove_endpoint(State(core): State<Shared>, Path(ip): Path<String>) -> Response {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{ip:?} is not an IPv4 address"),
        );
    };
    match core.lock().unwrap().remove_endpoint(ip) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn ipam(State(core): State<Shared>) -> Response {
    Json(core.lock().unwrap().ipam_usage()).into_response()
}

async fn release_attachment(State(core): State<Shared>, Path(id): Path<String>) -> Response {
    match core.lock().unwrap().release_attachment(&id) {
        Ok(r) => Json(r).into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn gc(State(core): State<Shared>, body: Result<Json<GcRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad GC request: {}", e.body_text()),
            );
        }
    };
    match core.lock().unwrap().gc(&req) {
        Ok(r) => Json(r).into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn metrics(State(core): State<Shared>) -> Response {
    match core.lock().unwrap().metrics() {
        Ok(text) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

pub fn router(core: Shared) -> Router {
    Router::new()
        .route("/overlay-agent/overlay", get(overlay))
        .route("/overlay-agent/status", get(status))
        .route(
            "/overlay-agent/endpoints",
            get(list_endpoints).post(add_endpoint),
        )
        .route("/overlay-agent/endpoints/{ip}", delete(remove_endpoint))
        .route("/overlay-agent/ipam", get(ipam))
        .route(
            "/overlay-agent/attachments/{id}",
            delete(release_attachment),
        )
        .route("/overlay-agent/gc", post(gc))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .with_state(core)
}

pub fn metrics_router(core: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(core)
}
