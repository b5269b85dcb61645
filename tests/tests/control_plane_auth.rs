//! The control plane lets no one in where they do not belong: a real `overlay-master` serving
//! HTTPS from its cluster CA, real certificates, real join tokens; a lab cluster whose agents
//! join with tokens and carry traffic.

use std::net::IpAddr;
use std::time::Duration;

use overlay_api::tls::wire::TokenRequest;
use overlay_api::{ClientError, MasterClient, MasterTls, OverlayInfo, State};
use overlay_tests::fixtures::agent_ip;
use overlay_tests::master::{Master, MasterSpec, agent_tls_with_ttl, ca_init, http_with};

fn network(name: &str, subnet: &str) -> OverlayInfo {
    serde_json::from_value(serde_json::json!({"name": name, "subnet": subnet, "prefix": 24}))
        .unwrap()
}

fn rejected(result: Result<impl std::fmt::Debug, ClientError>, status: u16, words: &[&str]) {
    let error = result.expect_err("must be refused");
    assert_eq!(error.rejected_status(), Some(status), "{error}");
    let text = error.to_string();
    for word in words {
        assert!(text.contains(word), "{text:?} does not name {word:?}");
    }
}

/// Every state-changing call this client can make, against a master holding agent 1 and the
/// default `dcos` network; each must be refused with `status`.
async fn try_every_change(client: &MasterClient, status: u16, words: &[&str]) {
    rejected(client.register(agent_ip(2)).await, status, words);
    rejected(client.delete_agents(&[agent_ip(1)]).await, status, words);
    rejected(
        client.add_network(&network("rogue", "10.77.0.0/16")).await,
        status,
        words,
    );
    rejected(client.remove_network("dcos").await, status, words);
    rejected(client.disable_network("dcos").await, status, words);
    rejected(client.enable_network("dcos").await, status, words);
    rejected(
        client.create_join_token(&TokenRequest::default()).await,
        status,
        words,
    );
}

async fn state(master: &Master) -> State {
    master.client().state().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_credentials_changes_nothing_and_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    master.client().register(agent_ip(1)).await.unwrap();
    let before = state(&master).await;

    let rogue = master.anonymous_client();
    try_every_change(&rogue, 401, &["no client certificate and no admin token"]).await;
    rejected(rogue.state().await, 401, &["reading the state"]);
    rejected(
        rogue.watch(0, Duration::from_millis(10)).await,
        401,
        &["watch"],
    );
    assert_eq!(
        state(&master).await,
        before,
        "a refused call changed the state"
    );

    // /health stays open; /metrics is a read like the others.
    let anonymous = http_with(&MasterTls {
        ca_pem: std::fs::read(master.tls_dir().join("ca.crt")).unwrap(),
        ..Default::default()
    });
    let health = anonymous
        .get(format!("{}/health", master.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = anonymous
        .get(format!("{}/metrics", master.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 401);
    let body: serde_json::Value = metrics.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("admin token"),
        "{body}"
    );

    // A wrong admin token is named as such.
    let mut wrong = master.admin_tls();
    wrong.admin_token = Some("not-the-token".into());
    let wrong = MasterClient::with_tls([master.base_url()], &wrong).unwrap();
    try_every_change(&wrong, 401, &["not the admin token"]).await;

    // Plain HTTP to the TLS port gets no answer at all.
    let plain = MasterClient::new([format!("http://127.0.0.1:{}", master.port)]).unwrap();
    assert!(plain.register(agent_ip(2)).await.is_err());
    assert_eq!(
        state(&master).await,
        before,
        "a refused call changed the state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_read_opens_reads_only() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start_with_args(dir.path(), None, &["--anonymous-read"]).await;
    master.client().register(agent_ip(1)).await.unwrap();
    let before = state(&master).await;
    let reader = master.anonymous_client();
    assert_eq!(reader.state().await.unwrap(), before);
    assert!(
        reader
            .watch(0, Duration::from_millis(10))
            .await
            .unwrap()
            .is_some()
    );
    try_every_change(&reader, 401, &["no client certificate and no admin token"]).await;
    assert_eq!(state(&master).await, before);
}

#[test]
fn plain_http_needs_the_explicit_lab_flag() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(overlay_tests::bin_path("overlay-master"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--tls-dir") && stderr.contains("--insecure-http"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "store opened before refusing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_http_serves_everyone_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = MasterSpec::new(dir.path()).insecure_http().spawn();
    let client = MasterClient::new([master.base_url()]).unwrap();
    let mut registered = None;
    for _ in 0..200 {
        if let Ok(info) = client.register(agent_ip(1)).await {
            registered = Some(info);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    master.kill();
    assert!(registered.is_some(), "{}", master.log());
    let log = master.log();
    assert!(log.contains("WITHOUT AUTHENTICATION"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let before = state(&master).await;
    // A rogue's own CA, with a certificate for a real agent's address.
    let rogue_ca = dir.path().join("rogue-ca");
    ca_init(&rogue_ca);
    let mut forged = agent_tls_with_ttl(&rogue_ca, agent_ip(1), "1h");
    forged.ca_pem = std::fs::read(master.tls_dir().join("ca.crt")).unwrap();
    let rogue = MasterClient::with_tls([master.base_url()], &forged).unwrap();
    let error = rogue.register(agent_ip(1)).await.unwrap_err();
    assert!(error.is_unreachable(), "{error}");
    assert_eq!(state(&master).await, before);
    assert!(
        master.log().contains("TLS handshake refused"),
        "{}",
        master.log()
    );

    // And a client that trusts another CA does not talk to this master.
    let mut mistrusting = master.admin_tls();
    mistrusting.ca_pem = std::fs::read(rogue_ca.join("ca.crt")).unwrap();
    let mistrusting = MasterClient::with_tls([master.base_url()], &mistrusting).unwrap();
    let error = mistrusting.state().await.unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_acts_only_as_its_own_agent() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    master.client().register(agent_ip(1)).await.unwrap();
    let a3 = master.agent_client(agent_ip(3));
    // As itself: register, heartbeat, read, watch.
    let me = a3.register(agent_ip(3)).await.unwrap();
    assert_eq!(me.ip, agent_ip(3));
    a3.register(agent_ip(3)).await.unwrap();
    assert_eq!(a3.state().await.unwrap().agents.len(), 2);
    assert!(
        a3.watch_delta(0, Duration::from_secs(1))
            .await
            .unwrap()
            .is_some()
    );
    let before = state(&master).await;

    // As anyone else, or as an operator: refused, naming the agent.
    rejected(
        a3.register(agent_ip(2)).await,
        403,
        &[
            "ip = 10.0.0.2",
            "agent 10.0.0.3 may register only as itself",
        ],
    );
    rejected(a3.register(agent_ip(1)).await, 403, &["only as itself"]);
    rejected(
        a3.delete_agents(&[agent_ip(1)]).await,
        403,
        &["admin token", "10.0.0.3"],
    );
    rejected(
        a3.delete_agents(&[agent_ip(3)]).await,
        403,
        &["admin token"],
    );
    rejected(
        a3.add_network(&network("rogue", "10.77.0.0/16")).await,
        403,
        &["admin token"],
    );
    rejected(a3.remove_network("dcos").await, 403, &["admin token"]);
    rejected(a3.disable_network("dcos").await, 403, &["admin token"]);
    rejected(
        a3.create_join_token(&TokenRequest::default()).await,
        403,
        &["admin token"],
    );
    assert_eq!(
        state(&master).await,
        before,
        "a refused call changed the state"
    );

    // Renewal gives a new certificate for the same address, and it works.
    let (key, csr) = overlay_agent::identity::key_and_csr(agent_ip(3)).unwrap();
    let renewed = a3.renew_certificate(&csr).await.unwrap();
    let tls = MasterTls {
        ca_pem: renewed.ca.clone().into_bytes(),
        identity: Some(overlay_api::Identity {
            cert_pem: renewed.certificate.into_bytes(),
            key_pem: key.into_bytes(),
        }),
        ..Default::default()
    };
    a3.set_tls(&tls).unwrap();
    a3.register(agent_ip(3)).await.unwrap();
    rejected(a3.register(agent_ip(2)).await, 403, &["only as itself"]);
    // Operators cannot renew (they have no agent address).
    rejected(
        master.client().renew_certificate(&csr).await,
        403,
        &["agent's certificate"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_may_change_everything() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let admin = master.client();
    admin.register(agent_ip(1)).await.unwrap();
    admin
        .add_network(&network("green", "10.77.0.0/16"))
        .await
        .unwrap();
    admin.disable_network("green").await.unwrap();
    admin.enable_network("green").await.unwrap();
    admin.remove_network("green").await.unwrap();
    assert_eq!(
        // Forced: the agent was heard from just now (master_safety.rs).
        admin
            .delete_agents_forced(&[agent_ip(1)], true)
            .await
            .unwrap(),
        vec![agent_ip(1)]
    );
    let token = admin
        .create_join_token(&TokenRequest::default())
        .await
        .unwrap();
    assert_eq!(token.token.len(), 23, "{}", token.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let short = agent_tls_with_ttl(&master.tls_dir(), agent_ip(4), "1s");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = MasterClient::with_tls([master.base_url()], &short).unwrap();
    let error = expired.register(agent_ip(4)).await.unwrap_err();
    assert!(error.is_unreachable(), "{error}");
    assert!(
        state(&master).await.agents.is_empty(),
        "an expired certificate registered"
    );
    let log = master.log();
    assert!(
        log.contains("TLS handshake refused") && log.contains("xpired"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_agent_revokes_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start(dir.path(), None).await;
    let a5 = master.agent_client(agent_ip(5));
    a5.register(agent_ip(5)).await.unwrap();
    master
        .client()
        .delete_agents_forced(&[agent_ip(5)], true)
        .await
        .unwrap();
    // The deleted agent cannot come back, nor read, with the certificate it had.
    rejected(
        a5.register(agent_ip(5)).await,
        401,
        &["revoked", "10.0.0.5"],
    );
    rejected(a5.state().await, 401, &["revoked"]);
    assert!(state(&master).await.agents.is_empty());
    // The revocation survives a restart (it is kept in the CA directory).
    master.restart().await;
    rejected(a5.register(agent_ip(5)).await, 401, &["revoked"]);
    // A certificate issued after the deletion works.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    master
        .agent_client(agent_ip(5))
        .register(agent_ip(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once_within_its_ttl_and_only_for_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start(dir.path(), None).await;
    let ca_pem = std::fs::read(master.tls_dir().join("ca.crt")).unwrap();
    let ca_der = overlay_api::tls::parse_certs(&ca_pem, "ca").unwrap();
    let hash = overlay_api::tls::cert_hash(&ca_der[0]);
    // A joining agent has no CA yet: it pins the CA's hash.
    let joiner = MasterClient::with_tls(
        [master.base_url()],
        &MasterTls {
            ca_cert_hash: Some(hash),
            ..Default::default()
        },
    )
    .unwrap();
    let token = master
        .client()
        .create_join_token(&TokenRequest {
            ttl_seconds: Some(60),
            ip: None,
        })
        .await
        .unwrap()
        .token;
    let (key, csr) = overlay_agent::identity::key_and_csr(agent_ip(6)).unwrap();
    let issued = joiner.join(&token, agent_ip(6), &csr).await.unwrap();
    assert_eq!(issued.ca.as_bytes(), ca_pem.as_slice());
    let agent = MasterClient::with_tls(
        [master.base_url()],
        &MasterTls {
            ca_pem: ca_pem.clone(),
            identity: Some(overlay_api::Identity {
                cert_pem: issued.certificate.into_bytes(),
                key_pem: key.into_bytes(),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    agent.register(agent_ip(6)).await.unwrap();
    rejected(agent.register(agent_ip(7)).await, 403, &["only as itself"]);

    // Once only.
    let (_, csr7) = overlay_agent::identity::key_and_csr(agent_ip(7)).unwrap();
    rejected(
        joiner.join(&token, agent_ip(7), &csr7).await,
        401,
        &["unknown or already used"],
    );
    // Not after its TTL (a token made with the CLI, offline, is the same).
    let dir_arg = master.tls_dir();
    let short = overlay_tests::master::master_command(&[
        "token",
        "create",
        "--dir",
        dir_arg.to_str().unwrap(),
        "--ttl",
        "1s",
    ]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    rejected(
        joiner.join(short.trim(), agent_ip(7), &csr7).await,
        401,
        &["expired"],
    );
    // A token bound to an address buys no other one.
    let bound = master
        .client()
        .create_join_token(&TokenRequest {
            ttl_seconds: Some(60),
            ip: Some(agent_ip(8)),
        })
        .await
        .unwrap()
        .token;
    rejected(
        joiner.join(&bound, agent_ip(7), &csr7).await,
        401,
        &["only valid for agent 10.0.0.8"],
    );
    // Made-up tokens and garbage requests are refused with what is wrong.
    rejected(
        joiner
            .join("abcdef.0123456789abcdef", agent_ip(7), &csr7)
            .await,
        401,
        &["unknown"],
    );
    rejected(
        joiner.join("nonsense", agent_ip(7), &csr7).await,
        400,
        &["malformed"],
    );
    let fresh = master
        .client()
        .create_join_token(&TokenRequest::default())
        .await
        .unwrap()
        .token;
    rejected(
        joiner.join(&fresh, agent_ip(7), "not a csr").await,
        400,
        &["csr"],
    );

    // A joiner pinning another CA's hash does not talk to this master.
    let wrong = MasterClient::with_tls(
        [master.base_url()],
        &MasterTls {
            ca_cert_hash: Some(format!("sha256:{}", "00".repeat(32))),
            ..Default::default()
        },
    )
    .unwrap();
    let error = wrong.join(&fresh, agent_ip(7), &csr7).await.unwrap_err();
    assert!(error.to_string().contains("pinned"), "{error}");
    let agents: Vec<IpAddr> = state(&master).await.agents.iter().map(|a| a.ip).collect();
    assert_eq!(agents, vec![agent_ip(6)]);
}

#[test]
fn agents_join_a_lab_cluster_with_tokens_renew_and_carry_traffic() {
    use std::os::unix::fs::PermissionsExt as _;
    let bin_dir = overlay_tests::bin_path("overlay-agent")
        .parent()
        .unwrap()
        .to_owned();
    let mut spec = overlay_lab::cluster::ClusterSpec::new(2, &bin_dir);
    spec.join_tokens = true;
    // Short-lived certificates: the agents renew them while the test runs.
    spec.master_args = vec!["--cert-ttl".into(), "6s".into()];
    let mut c = overlay_lab::cluster::Cluster::up(spec).unwrap();
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "dcos").unwrap();
    assert!(
        x.node.ping(y.node.ip.unwrap()),
        "no traffic between joined agents"
    );

    // Key, certificate and CA are kept in the state directory, owner-only; so is the socket.
    let state_dir = std::env::temp_dir().join(format!("{}-cluster/a1-state", c.lab.id()));
    for file in ["agent.key", "agent.crt", "ca.crt"] {
        let mode = std::fs::metadata(state_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let socket_mode = std::fs::metadata(c.socket("a1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(socket_mode & 0o777, 0o600, "agent socket");

    let first = std::fs::read(state_dir.join("agent.crt")).unwrap();
    let (_, first_expiry) = overlay_api::tls::cert_validity(&first).unwrap();
    // Past the first certificate's lifetime: renewed, and the agent still follows the master.
    std::thread::sleep(Duration::from_secs(8));
    let now = std::fs::read(state_dir.join("agent.crt")).unwrap();
    let (_, expiry) = overlay_api::tls::cert_validity(&now).unwrap();
    assert!(expiry > first_expiry, "certificate not renewed");
    let body = br#"{"name":"green","subnet":"10.77.0.0/16","prefix":24}"#;
    let (status, answer) = c
        .master_request("POST", "/overlay-master/networks", Some(body))
        .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    let g1 = c.add_container("a1", "green");
    let g2 = c.add_container("a2", "green");
    let (g1, g2) = (g1.unwrap(), g2.unwrap());
    assert!(
        g1.node.ping(g2.node.ip.unwrap()),
        "no traffic after renewal"
    );

    // A restarted agent uses its stored certificate (its token is spent).
    c.stop_agent("a1");
    c.start_agent("a1").unwrap();
    assert!(
        x.node.ping(y.node.ip.unwrap()),
        "no traffic after the agent restarted"
    );
}
