//! The HTTPS serve loop: rustls (ring provider) in front of the axum router, so each
//! connection's verified client certificate reaches the handlers as a [`PeerCert`] extension.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_service::Service as _;

use crate::auth::PeerCert;
use crate::pki::ClusterCa;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Server TLS: the master's own certificate (issued by the cluster CA at start, for `names`),
/// client certificates optional but, when given, verified against the CA (chain, validity).
pub fn server_config(ca: &ClusterCa, names: &[String]) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in overlay_api::tls::parse_certs(ca.cert_pem().as_bytes(), "CA certificate")? {
        roots
            .add(cert)
            .context("adding the CA to the trust roots")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
    let (chain_pem, key_pem) = ca.issue_server(names)?;
    let chain = overlay_api::tls::parse_certs(chain_pem.as_bytes(), "server certificate")?;
    let key = overlay_api::tls::parse_key(key_pem.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("loading the server certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over TLS until `shutdown` completes.
pub async fn serve_tls(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%remote, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(der) => match PeerCert::parse(der) {
                    Ok(peer) => Some(peer),
                    Err(error) => {
                        tracing::info!(%remote, %error, "client certificate refused");
                        return;
                    }
                },
                None => None,
            };
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    if let Some(peer) = &peer {
                        request.extensions_mut().insert(peer.clone());
                    }
                    let mut router = router.clone();
                    async move { router.call(request).await }
                },
            );
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%remote, %error, "connection ended with an error");
            }
        });
    }
}
