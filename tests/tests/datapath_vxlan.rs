//! VXLAN between two agents, built and stripped in BPF: the maps are written through the façade
//! as the agent's reconciler will write them from the master's state.

use overlay_common::counters::Counter;
use overlay_datapath::OverlayMaps;
use overlay_lab::Lab;
use overlay_tests::fixtures::{LabExt, lab, two_agents_over_vxlan};
use overlay_tests::lab_pins;

const VNI: u32 = 1024;

fn stat(lab: &Lab, role: &str, counter: Counter) -> u64 {
    OverlayMaps::open_pinned(&lab_pins(lab, role))
        .unwrap()
        .stat(VNI, counter)
        .unwrap()
}

#[test]
fn containers_on_two_agents_talk_over_bpf_vxlan() {
    let mut lab = lab(2);
    let c1 = lab.container("a1", "9.0.1.2/25");
    let c2 = lab.container("a2", "9.0.2.2/25");
    two_agents_over_vxlan(&lab, VNI, [&c1, &c2]);

    assert!(
        c1.node.ping(c2.node.ip.unwrap()),
        "no ping reply across agents"
    );
    assert!(stat(&lab, "a1", Counter::Encapsulated) > 0);
    assert!(stat(&lab, "a2", Counter::Decapsulated) > 0);

    // A bulk TCP transfer (GSO super-packets through encap and decap) arrives intact.
    let dir = tempfile::tempdir().unwrap();
    let recv = dir.path().join("received");
    let send = dir.path().join("sent");
    let mut server = c2.node.command("sh");
    server
        .args(["-c", &format!("nc -l -p 5001 > {}", recv.display())])
        .stdin(std::process::Stdio::null());
    let mut server = server.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    c1.node
        .exec(
            "sh",
            &[
                "-c",
                &format!(
                    "head -c 64000000 /dev/urandom > {s}; nc -N 9.0.2.2 5001 < {s}",
                    s = send.display()
                ),
            ],
        )
        .unwrap();
    server.wait().unwrap();
    let sent = std::fs::read(&send).unwrap();
    let received = std::fs::read(&recv).unwrap();
    assert_eq!(received.len(), sent.len(), "bytes lost across agents");
    assert!(received == sent, "payload corrupted across agents");
    assert!(
        stat(&lab, "a1", Counter::Encapsulated) > 1000,
        "bulk data did not take the encap path"
    );
    drop(lab);
}
