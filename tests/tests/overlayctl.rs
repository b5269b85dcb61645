//! `overlayctl` against a real lab cluster: a real master (HTTPS, admin token), real agents with
//! their eBPF datapath, run from an agent's namespace as an operator on that host would.

use std::process::Output;

use overlay_lab::cluster::Cluster;
use overlay_tests::bin_path;
use overlay_tests::fixtures::cluster;
use serde_json::Value;

/// Runs `overlayctl ARGS` in `agent`'s namespace, with the cluster's master, CA, admin token
/// and that agent's socket.
fn ctl(c: &Cluster, agent: &str, args: &[&str]) -> Output {
    c.node(agent)
        .unwrap()
        .command(bin_path("overlayctl"))
        .args(["--master", &c.master_url()])
        .args(["--ca", c.ca_cert().to_str().unwrap()])
        .args(["--admin-token-file", c.admin_token_file().to_str().unwrap()])
        .args(["--socket", c.socket(agent).to_str().unwrap()])
        .args(args)
        .output()
        .expect("run overlayctl")
}

/// stdout of a command that must succeed.
fn ok(c: &Cluster, agent: &str, args: &[&str]) -> String {
    let out = ctl(c, agent, args);
    assert!(
        out.status.success(),
        "overlayctl {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(c: &Cluster, agent: &str, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let text = ok(c, agent, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

#[test]
fn status_networks_agents_ipam_and_endpoints_against_a_lab_cluster() {
    let mut c = cluster(2);

    // status: healthy, exit 0, and what it says is the agent's and master's real state.
    let text = ok(&c, "a1", &["status"]);
    assert!(text.starts_with("healthy\n"), "{text}");
    assert!(text.contains("registered: yes"), "{text}");
    let status = json(&c, "a1", &["status"]);
    assert_eq!(status["healthy"], true, "{status}");
    let agent = &status["agent"];
    assert!(agent["programs_attached"].as_u64().unwrap() >= 1, "{agent}");
    assert!(agent["applied_revision"].as_u64().unwrap() >= 1, "{agent}");
    let maps = agent["maps"].as_array().unwrap();
    let endpoints_map = maps.iter().find(|m| m["map"] == "OVL_ENDPOINTS").unwrap();
    assert!(
        endpoints_map["max_entries"].as_u64().unwrap() > 0,
        "{endpoints_map}"
    );
    let ipam_networks: Vec<&str> = agent["ipam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["network"].as_str().unwrap())
        .collect();
    assert!(
        ipam_networks.contains(&"dcos") && ipam_networks.contains(&"blue"),
        "{agent}"
    );
    assert_eq!(status["master"]["agents"], 2, "{status}");
    assert_eq!(status["master"]["networks"], 2, "{status}");
    assert_eq!(status["master"]["store_healthy"], true, "{status}");
    let yaml = ok(&c, "a1", &["-o", "yaml", "status"]);
    assert!(yaml.contains("healthy: true"), "{yaml}");

    // network list: names, VNIs, subnets; text and JSON.
    let text = ok(&c, "a1", &["network", "list"]);
    let dcos_line = text.lines().find(|l| l.starts_with("dcos ")).expect(&text);
    assert!(
        dcos_line.contains("9.0.0.0/8") && dcos_line.contains("yes"),
        "{text}"
    );
    let networks = json(&c, "a1", &["network", "list"]);
    let names: Vec<&str> = networks
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dcos", "blue"]);
    assert_eq!(networks[0]["agents"], 2, "{networks}");

    // network add / disable / enable / remove.
    let added = json(
        &c,
        "a1",
        &[
            "network",
            "add",
            "green",
            "--subnet",
            "10.2.0.0/16",
            "--prefix",
            "24",
        ],
    );
    assert_eq!(added["name"], "green");
    // The master's id; no VNI of its own (it shares 1024).
    assert!(
        added["id"].as_u64().is_some() && added.get("vni").is_none(),
        "{added}"
    );
    let disabled = json(&c, "a1", &["network", "disable", "green"]);
    assert_eq!(disabled["enabled"], false, "{disabled}");
    let text = ok(&c, "a1", &["network", "enable", "green"]);
    assert!(text.contains("green") && text.contains("enabled"), "{text}");
    // A refused change names the network (not its place in the list) and the reason.
    let out = ctl(
        &c,
        "a1",
        &[
            "network",
            "add",
            "clash",
            "--subnet",
            "10.2.128.0/17",
            "--prefix",
            "24",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("clash") && stderr.contains("green"),
        "{stderr}"
    );
    ok(&c, "a1", &["network", "remove", "green"]);
    let names: Vec<String> = json(&c, "a1", &["network", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["dcos", "blue"]);

    // agent list: both agents, live, with VTEPs and their subnets by network name.
    let agents = json(&c, "a1", &["agent", "list"]);
    let agents = agents.as_array().unwrap();
    assert_eq!(agents.len(), 2);
    for a in agents {
        assert_eq!(a["status"], "live", "{a}");
        assert!(a["vtep_ip"].as_str().is_some(), "{a}");
        assert_eq!(a["networks"][0]["network"], "dcos", "{a}");
    }
    let text = ok(&c, "a1", &["agent", "list"]);
    assert!(
        text.contains("live") && text.contains("dcos=9.0."),
        "{text}"
    );

    // A container appears in endpoints and ipam, by network name.
    let container = c.add_container("a1", "blue").unwrap();
    let ip = container.node.ip.unwrap().to_string();
    let endpoints = json(&c, "a1", &["endpoints"]);
    let ep = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == ip.as_str())
        .unwrap_or_else(|| panic!("{ip} not in {endpoints}"));
    assert_eq!(ep["network"], "blue");
    assert_eq!(ep["host_veth"], container.host_veth.as_str());
    let text = ok(&c, "a1", &["endpoints"]);
    assert!(text.contains(&ip) && text.contains("blue"), "{text}");
    let text = ok(&c, "a1", &["ipam", "show", "--network", "blue"]);
    assert!(text.contains(&ip) && !text.contains("dcos"), "{text}");
    let out = ctl(&c, "a1", &["ipam", "show", "--network", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--network nope"),
        "{stderr}"
    );

    // The datapath view names networks beside their VNIs.
    let instance = c.lab.pin_instance("a1");
    let text = ok(&c, "a1", &["datapath", "--instance", &instance]);
    assert!(text.contains("blue (id "), "{text}");
}

#[test]
fn errors_show_their_root_cause_and_status_fails_when_unhealthy() {
    let c = cluster(1);
    // Nothing listens on port 1 of the master's address: the cause, not "error sending request".
    let nowhere = format!("https://{}:1", overlay_lab::fabric_ip(1));
    let out = ctl(&c, "a1", &["network", "list", "--master", &nowhere]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("connection refused"), "{stderr}");

    // status: the agent is fine but the master is not reachable: exit 1, saying why.
    let out = ctl(&c, "a1", &["status", "--master", &nowhere]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("NOT HEALTHY"), "{stdout}");
    assert!(
        stdout.to_lowercase().contains("connection refused"),
        "{stdout}"
    );
    // A socket nobody serves: the agent is reported down.
    let out = ctl(
        &c,
        "a1",
        &["status", "--socket", "/nonexistent.sock", "--no-master"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("/nonexistent.sock"), "{stdout}");
}

#[test]
fn completions_man_pages_and_version_come_from_the_cli_definition() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin_path("overlayctl"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("overlayctl") && bash.contains("network"),
        "{bash}"
    );
    assert!(run(&["completions", "zsh"]).contains("#compdef overlayctl"));
    let man = run(&["man"]);
    assert!(
        man.contains(".TH overlayctl") && man.contains("status"),
        "{man}"
    );
    let dir = tempfile::tempdir().unwrap();
    run(&["man", "--dir", dir.path().to_str().unwrap()]);
    let page = std::fs::read_to_string(dir.path().join("overlayctl-network.1")).unwrap();
    assert!(page.contains("add") && page.contains("remove"), "{page}");
    let version = run(&["--version"]);
    assert!(
        version.contains("git ") && version.contains("map layout v"),
        "{version}"
    );
    // Default master address = the master's default listen port.
    let help = run(&["status", "--help"]);
    assert!(help.contains("https://127.0.0.1:5055"), "{help}");
}

#[test]
fn ipam_status_and_endpoints_show_each_family_of_a_dual_stack_cluster() {
    let mut spec = overlay_tests::fixtures::cluster_spec(1);
    spec.config = "\
vtep_subnet: 44.128.0.0/20
vtep_subnet6: fd01:a::/64
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - {name: dcos, subnet: 9.0.0.0/8, prefix: 24}
  - {name: dcos6, subnet6: 'fd01:b::/64', prefix6: 80}
  - {name: dual, subnet: 10.7.0.0/16, prefix: 24, subnet6: 'fd02:7::/64', prefix6: 80}
"
    .into();
    let mut c = Cluster::up(spec).expect("cluster up");
    let (_container, addrs) = c.add_container_addrs("a1", "dual").unwrap();
    let (ip4, ip6) = (addrs.ip4.unwrap(), addrs.ip6.unwrap());
    let (_only6, only6) = c.add_container_addrs("a1", "dcos6").unwrap();
    assert!(only6.ip4.is_none(), "dcos6 has no IPv4 subnet");
    let only6 = only6.ip6.unwrap();

    // ipam show: one row per network and family, each allocation under its own family.
    let ipam = json(&c, "a1", &["ipam", "show"]);
    let rows = ipam.as_array().unwrap_or_else(|| panic!("{ipam}"));
    // The rows of a network and family (one per half), as JSON text.
    let rows_of = |network: &str, family: &str| {
        let found: Vec<String> = rows
            .iter()
            .filter(|r| r["network"] == network && r["family"] == family)
            .map(|r| r.to_string())
            .collect();
        assert!(!found.is_empty(), "no {network}/{family} row in {ipam}");
        found
    };
    for (network, family, ip) in [
        ("dual", "ipv4", ip4.to_string()),
        ("dual", "ipv6", ip6.to_string()),
        ("dcos6", "ipv6", only6.to_string()),
    ] {
        let found = rows_of(network, family);
        assert!(
            found.iter().any(|r| r.contains(&format!("\"{ip}\""))),
            "{network}/{family} lacks {ip}: {found:?}"
        );
    }
    assert!(
        !rows
            .iter()
            .any(|r| r["network"] == "dcos6" && r["family"] == "ipv4"),
        "dcos6 has no IPv4 half: {ipam}"
    );
    let text = ok(&c, "a1", &["ipam", "show", "--network", "dual"]);
    assert!(
        text.contains(&ip4.to_string()) && text.contains(&ip6.to_string()),
        "{text}"
    );

    // status: IPAM use by network and family.
    let status = json(&c, "a1", &["status"]);
    let families: Vec<(String, String)> = status["agent"]["ipam"]
        .as_array()
        .unwrap_or_else(|| panic!("{status}"))
        .iter()
        .map(|u| {
            (
                u["network"].as_str().unwrap().to_owned(),
                u["family"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("dual", "ipv4"),
        ("dual", "ipv6"),
        ("dcos6", "ipv6"),
        ("dcos", "ipv4"),
    ] {
        assert!(
            families.contains(&(want.0.to_owned(), want.1.to_owned())),
            "status lacks {want:?}: {families:?}"
        );
    }

    // endpoints: the container's IPv6 address beside its IPv4 one.
    let text = ok(&c, "a1", &["endpoints"]);
    assert!(
        text.contains(&ip4.to_string()) && text.contains(&ip6.to_string()),
        "{text}"
    );
    assert!(text.contains(&only6.to_string()), "{text}");
}
