//! The agent's local HTTP API, served on a Unix socket (and `/metrics` optionally on TCP).

use std::net::IpAddr;

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

use crate::{endpoints::EndpointError, runtime::Handle};

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

fn internal(e: anyhow::Error) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

async fn overlay(State(agent): State<Handle>) -> Response {
    match agent.me().await {
        Ok(Some(me)) => Json(me).into_response(),
        Err(e) => internal(e),
        Ok(None) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not registered with a master yet (no master answers and no saved state)",
        ),
    }
}

async fn status(State(agent): State<Handle>) -> Response {
    match agent.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => internal(e),
    }
}

async fn list_endpoints(State(agent): State<Handle>) -> Response {
    match agent.endpoints().await {
        Ok(eps) => Json(eps).into_response(),
        Err(e) => internal(e),
    }
}

async fn add_endpoint(
    State(agent): State<Handle>,
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
    match agent.add_endpoint(req).await {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn remove_endpoint(State(agent): State<Handle>, Path(ip): Path<String>) -> Response {
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{ip:?} is not an IP address"),
        );
    };
    match agent.remove_endpoint(ip).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn ipam(State(agent): State<Handle>) -> Response {
    match agent.ipam_usage().await {
        Ok(u) => Json(u).into_response(),
        Err(e) => internal(e),
    }
}

async fn release_attachment(State(agent): State<Handle>, Path(id): Path<String>) -> Response {
    match agent.release_attachment(id).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn gc(State(agent): State<Handle>, body: Result<Json<GcRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad GC request: {}", e.body_text()),
            );
        }
    };
    match agent.gc(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => endpoint_error(e),
    }
}

async fn metrics(State(agent): State<Handle>) -> Response {
    match agent.metrics().await {
        Ok(text) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => internal(e),
    }
}

pub fn router(agent: Handle) -> Router {
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
        .with_state(agent)
}

pub fn metrics_router(agent: Handle) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent)
}
