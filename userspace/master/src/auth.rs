//! Who is calling, and what they may do.
//!
//! - An **agent** presents a client certificate issued by the cluster CA (checked in the TLS
//!   handshake: chain and validity); its IP SAN is its identity. It may read, and register,
//!   heartbeat and renew its certificate only as that address.
//! - An **operator** sends the admin token (`Authorization: Bearer ...`): everything, including
//!   registering an agent on its behalf.
//! - **Anonymous** callers get `/health`, the CA certificate and the join route (the token is
//!   the credential there); reads only with `--anonymous-read`.
//!
//! Without TLS (`--insecure-http`, a lab flag) nobody is authenticated and everything is
//! allowed.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::api::ApiError;
use crate::pki::{ClusterCa, Revocations, unix_now};

/// The client certificate of one TLS connection (already verified against the CA).
#[derive(Debug, Clone)]
pub struct PeerCert {
    /// The certificate's IP SAN (agent certificates have exactly one).
    pub agent_ip: Option<IpAddr>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl PeerCert {
    pub fn parse(der: &CertificateDer<'_>) -> Result<PeerCert, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("client certificate unreadable: {e}"))?;
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::IPAddress(bytes) = name {
                    match bytes.len() {
                        4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap())),
                        16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap())),
                        _ => {}
                    }
                }
            }
        }
        Ok(PeerCert {
            // A certificate naming several addresses is no agent's.
            agent_ip: (ips.len() == 1).then(|| ips[0]),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// Authentication settings of the API.
pub struct Auth {
    /// Plain HTTP: no authentication at all.
    pub insecure: bool,
    pub admin_token: Option<String>,
    pub anonymous_read: bool,
    pub ca: Option<ClusterCa>,
    pub revocations: Option<Revocations>,
    /// Lifetime of the agent certificates this master issues.
    pub cert_lifetime: std::time::Duration,
}

impl Auth {
    /// Everything allowed (plain HTTP lab mode, unit tests).
    pub fn insecure() -> Auth {
        Auth {
            insecure: true,
            admin_token: None,
            anonymous_read: true,
            ca: None,
            revocations: None,
            cert_lifetime: std::time::Duration::from_secs(24 * 3600),
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `--insecure-http`: nobody is authenticated, everything is allowed.
    Unauthenticated,
    Admin,
    Agent(IpAddr),
    Anonymous {
        /// Why no identity was accepted, for the error answer.
        reason: String,
    },
}

fn unauthorized(message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

impl Caller {
    fn identify(auth: &Auth, cert: Option<&PeerCert>, bearer: Option<&str>) -> Caller {
        if auth.insecure {
            return Caller::Unauthenticated;
        }
        if let Some(token) = bearer {
            return match &auth.admin_token {
                // Comparing digests: no timing signal about the token itself.
                Some(admin) if digest(admin).as_ref() == digest(token).as_ref() => Caller::Admin,
                Some(_) => Caller::Anonymous {
                    reason: "the bearer token is not the admin token".into(),
                },
                None => Caller::Anonymous {
                    reason: "this master accepts no admin token (no --admin-token-file)".into(),
                },
            };
        }
        let Some(cert) = cert else {
            return Caller::Anonymous {
                reason: "no client certificate and no admin token (Authorization: Bearer)".into(),
            };
        };
        let Some(ip) = cert.agent_ip else {
            return Caller::Anonymous {
                reason: format!(
                    "client certificate {} names no single agent address (IP SAN)",
                    cert.serial
                ),
            };
        };
        // The handshake checked validity, but a kept-alive connection outlives it.
        if cert.not_after <= unix_now() {
            return Caller::Anonymous {
                reason: format!(
                    "client certificate {} of agent {ip} has expired",
                    cert.serial
                ),
            };
        }
        if auth
            .revocations
            .as_ref()
            .is_some_and(|r| r.is_revoked(ip, cert.not_before))
        {
            return Caller::Anonymous {
                reason: format!(
                    "client certificate {} of agent {ip} is revoked (the agent was deleted); join again",
                    cert.serial
                ),
            };
        }
        Caller::Agent(ip)
    }

    /// Operators only.
    pub fn require_admin(&self, action: &str) -> Result<(), ApiError> {
        match self {
            Caller::Unauthenticated | Caller::Admin => Ok(()),
            Caller::Agent(ip) => Err(forbidden(format!(
                "{action} needs the admin token; agent {ip}'s certificate does not allow it"
            ))),
            Caller::Anonymous { reason } => Err(unauthorized(format!(
                "{action} needs the admin token: {reason}"
            ))),
        }
    }

    /// Operators, or the agent `ip` itself.
    pub fn require_agent_or_admin(&self, ip: IpAddr, action: &str) -> Result<(), ApiError> {
        match self {
            Caller::Unauthenticated | Caller::Admin => Ok(()),
            Caller::Agent(own) if *own == ip => Ok(()),
            Caller::Agent(own) => Err(forbidden(format!(
                "ip = {ip}: agent {own} may {action} only as itself"
            ))),
            Caller::Anonymous { reason } => Err(unauthorized(format!(
                "{action} needs agent {ip}'s certificate or the admin token: {reason}"
            ))),
        }
    }

    /// The agent itself (certificate renewal).
    pub fn require_agent(&self, action: &str) -> Result<IpAddr, ApiError> {
        match self {
            Caller::Agent(ip) => Ok(*ip),
            Caller::Unauthenticated | Caller::Admin => {
                Err(forbidden(format!("{action} needs an agent's certificate")))
            }
            Caller::Anonymous { reason } => Err(unauthorized(format!(
                "{action} needs an agent's certificate: {reason}"
            ))),
        }
    }

    /// Reads: agents and operators; anyone with `--anonymous-read`.
    pub fn require_read(&self, auth: &Auth, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Anonymous { reason } if !auth.anonymous_read => Err(unauthorized(format!(
                "reading {what} needs an agent certificate or the admin token: {reason}"
            ))),
            _ => Ok(()),
        }
    }
}

fn digest(text: &str) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
}

/// The request's caller and the API's auth settings.
pub struct Authenticated {
    pub caller: Caller,
    pub auth: Arc<Auth>,
}

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let auth = parts
            .extensions
            .get::<Arc<Auth>>()
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no auth configured".into(),
                )
            })?;
        let cert = parts.extensions.get::<PeerCert>();
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
        let caller = Caller::identify(&auth, cert, bearer);
        Ok(Authenticated { caller, auth })
    }
}
