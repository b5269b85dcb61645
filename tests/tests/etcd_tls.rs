//! The master on a real 3-member etcd cluster with TLS (peers and clients), client certificates
//! required and etcd authentication on (issue 17): the right certificate and password work,
//! and every other way in is refused at start with an error naming etcd — no client
//! certificate, one from another CA, a CA that did not sign the members, a wrong password, no
//! login at all, plain http to a TLS member. The store tests themselves run over TLS in
//! `etcd_store.rs` (`tls::*`).

use std::time::Duration;

use overlay_tests::master::Master;
use overlay_tests::support_etcd::{EtcdCluster, MASTER_USER, Security, StoreFlags, http};

const PREFIX: &str = "/ebpf-overlay/";

/// Starts a master with `store` and expects it to give up at start; its log.
fn refused(dir: &std::path::Path, store: &StoreFlags) -> String {
    let mut master = Master::spawn_etcd(dir, store, PREFIX, None);
    let (status, log) = master.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("etcd"), "the error names etcd: {log}");
    log
}

#[test]
fn only_the_right_certificate_and_password_open_the_tls_store() {
    let etcd = EtcdCluster::start_secured(3, Security::TlsAuth);
    let pki = etcd.pki.as_ref().unwrap();
    let file = |name: &str| pki.path(name).display().to_string();
    let dir = tempfile::tempdir().unwrap();

    // The right flags: the master serves and writes (an agent registers).
    let master = Master::start_etcd(dir.path(), &etcd.store(), PREFIX, None);
    let addr = format!("127.0.0.1:{}", master.port);
    let (status, body) = http(
        &addr,
        "POST",
        "/overlay-master/agents",
        Some(r#"{"ip":"10.0.0.1"}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}\n{}", master.log());
    // ...and it really went to etcd, under the prefix, readable with etcd's own client.
    let stored = etcd
        .etcdctl(&["get", "--prefix", "--keys-only", PREFIX])
        .unwrap();
    assert!(stored.contains("/ebpf-overlay/agents/10.0.0.1"), "{stored}");

    // No client certificate: the members' TLS refuses the connection.
    let log = refused(
        dir.path(),
        &etcd
            .store()
            .without("--etcd-certfile")
            .without("--etcd-keyfile"),
    );
    assert!(log.contains("https://127.0.0.1"), "{log}");

    // A client certificate (same CN) from another CA.
    refused(
        dir.path(),
        &etcd
            .store()
            .with("--etcd-certfile", file("rogue-client.pem"))
            .with("--etcd-keyfile", file("rogue-client-key.pem")),
    );

    // Members whose certificates the given CA did not sign are not trusted.
    let log = refused(
        dir.path(),
        &etcd.store().with("--etcd-cafile", file("rogue-ca.pem")),
    );
    assert!(
        log.contains("certificate") || log.contains("UnknownIssuer"),
        "{log}"
    );

    // Right certificate, wrong password.
    let log = refused(
        dir.path(),
        &etcd.store().with("--etcd-password", "not-the-password"),
    );
    assert!(log.contains("authentication failed"), "{log}");
    assert!(log.contains(MASTER_USER), "{log}");

    // A certificate whose CN names the master's etcd user: etcd's gateway does not pass the
    // CN on to its authorisation and refuses such a client while authentication is on.
    let log = refused(
        dir.path(),
        &etcd
            .store()
            .with("--etcd-certfile", file("cn-client.pem"))
            .with("--etcd-keyfile", file("cn-client-key.pem")),
    );
    assert!(log.contains("CommonName"), "{log}");

    // Right certificate, no login while etcd authentication is on: nothing is readable.
    refused(
        dir.path(),
        &etcd
            .store()
            .without("--etcd-username")
            .without("--etcd-password"),
    );

    // Plain http to a TLS member, without any TLS flag.
    let http_url = etcd
        .store_url()
        .replace("etcd://", "etcd://http://")
        .replace(",", ",http://");
    refused(dir.path(), &StoreFlags::plain(http_url));

    // The running master was not disturbed by any of this.
    let (status, _) = http(&addr, "GET", "/overlay-master/state", None).unwrap();
    assert_eq!(status, 200);
}
