//! The lab itself: a fabric that connects its nodes, and teardown that leaves nothing behind.

use std::{collections::BTreeSet, path::Path, time::Duration};

use overlay_lab::{Lab, LabSpec, lab_namespaces};
use overlay_tests::fixtures::LabExt;

fn root_links() -> BTreeSet<String> {
    overlay_lab::run("ip", &["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
        .collect()
}

fn assert_gone(id: &str, instances: &[String]) {
    assert!(
        lab_namespaces(id).is_empty(),
        "namespaces left: {:?}",
        lab_namespaces(id)
    );
    assert!(
        !Path::new(overlay_lab::STATE_DIR)
            .join(format!("{id}.json"))
            .exists(),
        "lab record left behind"
    );
    for inst in instances {
        let pinned = Path::new("/sys/fs/bpf/ebpf-overlay/v1").join(inst);
        assert!(!pinned.exists(), "pins left at {}", pinned.display());
    }
}

#[test]
fn agents_reach_each_other_master_and_external_over_the_fabric() {
    let lab = Lab::up(LabSpec {
        agents: 3,
        id: None,
    })
    .unwrap();
    let agents = lab.agents();
    assert_eq!(agents.len(), 3);
    for a in &agents {
        for b in &agents {
            if a.role != b.role {
                assert!(a.ping(b.ip.unwrap()), "{} cannot reach {}", a.role, b.role);
            }
        }
        assert!(
            a.ping(lab.master().ip.unwrap()),
            "{} cannot reach the master",
            a.role
        );
        assert!(
            a.ping(lab.external().ip.unwrap()),
            "{} cannot reach the external host",
            a.role
        );
    }
    // Nothing in the root namespace routes into the lab.
    let routes = overlay_lab::run("ip", &["route", "show", "10.250.0.0/24"]).unwrap();
    assert!(
        routes.trim().is_empty(),
        "root namespace has a route into the lab: {routes}"
    );
}

#[test]
fn teardown_leaves_no_namespace_link_process_or_pin() {
    let links_before = root_links();
    let (id, instances, pid) = {
        let mut lab = Lab::up(LabSpec {
            agents: 2,
            id: None,
        })
        .unwrap();
        lab.container("a1", "9.0.1.2/25");
        let pid = lab.spawn("a1", "sleep", &["600"]).unwrap();
        // Something pinned for an agent of this lab, as an agent would leave it.
        let inst = lab.pin_instance("a1");
        let dir = Path::new("/sys/fs/bpf/ebpf-overlay/v1")
            .join(&inst)
            .join("maps");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!lab_namespaces(lab.id()).is_empty());
        (lab.id().to_owned(), lab.record().pin_instances.clone(), pid)
    };
    assert_gone(&id, &instances);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still running"
    );
    assert_eq!(
        root_links(),
        links_before,
        "links in the root namespace changed"
    );
}

#[test]
fn teardown_happens_on_panic() {
    let id = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let id2 = id.clone();
    let result = std::panic::catch_unwind(move || {
        let lab = Lab::up(LabSpec {
            agents: 1,
            id: None,
        })
        .unwrap();
        *id2.lock().unwrap() = lab.id().to_owned();
        panic!("test failure inside a lab");
    });
    assert!(result.is_err());
    let id = id.lock().unwrap().clone();
    assert!(!id.is_empty());
    assert_gone(&id, &[]);
}

#[test]
fn a_kept_lab_is_removed_by_lab_down() {
    let lab = Lab::up(LabSpec {
        agents: 1,
        id: None,
    })
    .unwrap();
    let record = lab.keep();
    assert!(
        !lab_namespaces(&record.id).is_empty(),
        "kept lab should still exist"
    );
    let listed = Lab::recorded().unwrap();
    assert!(
        listed.iter().any(|r| r.id == record.id),
        "kept lab is not recorded"
    );
    Lab::down_record(&record).unwrap();
    assert_gone(&record.id, &record.pin_instances);
}

#[test]
fn stop_terminates_a_started_process() {
    let mut lab = Lab::up(LabSpec {
        agents: 1,
        id: None,
    })
    .unwrap();
    let pid = lab.spawn("a1", "sleep", &["600"]).unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    lab.stop(pid, Duration::from_millis(200));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} survived stop"
    );
}
