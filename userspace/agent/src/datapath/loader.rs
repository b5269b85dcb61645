//! Loading the embedded eBPF object and attaching its programs with pinned TCX links.

mod layout_upgrade;
mod netkit;
mod xdp_mode;

pub use xdp_mode::{XdpAttached, XdpMode, driver_of};

use std::{io, os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use overlay_common::maps::{names, programs, tail_calls};

use super::{OverlayMaps, PinLayout};

/// The eBPF object, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

/// What one `BPF_PROG_TEST_RUN` call returned.
#[derive(Clone, Debug)]
pub struct TestRunOutcome {
    /// The program's return value (the TC or XDP verdict) of the last run.
    pub verdict: u32,
    /// The packet as the last run left it.
    pub packet: Vec<u8>,
    /// Kernel-measured time per run (the test run's `duration`: includes reading the clock
    /// around the runs).
    pub per_run: std::time::Duration,
    /// The program's own run time per run as the kernel's run-time statistics account it
    /// (`run_time_ns` / `run_cnt` around the call: the program alone, as for attached programs),
    /// when those statistics are on (`BPF_ENABLE_STATS`).
    pub per_run_stats: Option<std::time::Duration>,
}

/// The loaded datapath of one agent: programs in the kernel, maps pinned, links pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    maps: OverlayMaps,
}

/// Loads the programs `from_container` and `from_host` tail-call into and puts them in their
/// slots of `OVL_TAIL_CALLS`.
fn fill_tail_calls(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    for &(slot, name) in tail_calls::ALL {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("verifier rejected program {name}"))?;
        let fd = program.fd()?.try_clone()?;
        let map = ebpf
            .map_mut(tail_calls::MAP)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", tail_calls::MAP))?;
        aya::maps::ProgramArray::try_from(map)?
            .set(slot, &fd, 0)
            .with_context(|| format!("putting {name} into {}", tail_calls::MAP))?;
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs, reusing maps already pinned under `pins` (an agent restart keeps every
    /// entry, so traffic keeps flowing) or creating and pinning them.
    pub fn load(pins: PinLayout) -> anyhow::Result<Datapath> {
        pins.create_dirs()?;
        let map_paths: Vec<_> = names::ALL.iter().map(|n| (*n, pins.map(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object into the kernel (needs CAP_BPF and CAP_NET_ADMIN)")?;
        for name in [
            programs::FROM_CONTAINER,
            programs::FROM_UNDERLAY,
            programs::FROM_HOST,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifier rejected program {name}"))?;
        }
        fill_tail_calls(&mut ebpf)?;
        let xdp: &mut Xdp = ebpf
            .program_mut(programs::XDP_UNDERLAY)
            .ok_or_else(|| {
                anyhow!(
                    "program {} missing from the eBPF object",
                    programs::XDP_UNDERLAY
                )
            })?
            .try_into()?;
        xdp.load()
            .with_context(|| format!("verifier rejected program {}", programs::XDP_UNDERLAY))?;
        // Pins an agent of another map layout left: its links get these programs (so two
        // program sets are never attached at once), its maps' entries where the layout is the
        // same, and its pins go.
        layout_upgrade::take_over_other_layouts(&mut ebpf, &pins)?;
        let maps = OverlayMaps::take_from(&mut ebpf)?;
        Ok(Datapath { ebpf, pins, maps })
    }

    /// The maps, to change them.
    pub fn maps_mut(&mut self) -> &mut OverlayMaps {
        &mut self.maps
    }

    /// The maps, to read them.
    pub fn maps(&self) -> &OverlayMaps {
        &self.maps
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Attaches `program` to TC ingress of `ifname` (TCX), pinning the link under the interface
    /// name. See [`Datapath::attach_keyed`].
    pub fn attach(&mut self, ifname: &str, program_name: &str) -> anyhow::Result<()> {
        self.attach_keyed(ifname, program_name, ifname)
    }

    /// Attaches `program` to TC ingress of `ifname` (TCX) and pins the link under `key`. If a
    /// link pinned by an earlier run exists, the new program replaces the old one in it
    /// atomically: no packet meets an interface without a program (hitless restart/upgrade).
    pub fn attach_keyed(
        &mut self,
        ifname: &str,
        program_name: &str,
        key: &str,
    ) -> anyhow::Result<()> {
        let pin = self.pins.link(program_name, key);
        if replace_in_pinned_link(&mut self.ebpf, program_name, &pin)
            .with_context(|| format!("replacing {program_name} on {ifname}"))?
        {
            return Ok(());
        }
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_name)
            .ok_or_else(|| anyhow!("no program {program_name}"))?
            .try_into()?;
        // A netkit pair has no TC hook of its own in the datapath's sense: the program becomes
        // the policy of what its container side sends (the same packets a veth's host-side TC
        // ingress sees).
        let link = overlay_netlink::Handle::new()
            .and_then(|mut nl| nl.link(ifname))
            .with_context(|| format!("looking up {ifname} to attach {program_name}"))?;
        if link.kind.as_deref() == Some("netkit") {
            return netkit::attach_peer(link.ifindex, program.fd()?.as_fd(), &pin)
                .with_context(|| format!("attaching {program_name} to netkit {ifname}"));
        }
        let link_id = program
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("attaching {program_name} to TC ingress of {ifname}"))?;
        let link: FdLink = program.take_link(link_id)?.try_into()?;
        link.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        Ok(())
    }

    /// Runs `program` once on `packet` with `BPF_PROG_TEST_RUN`: no interface, no netns of its
    /// own (the kernel hands the program an skb on the caller's loopback, ifindex 1). Returns the
    /// program's verdict and the packet as the program left it. Maps are the live ones, so the
    /// run counts in `OVL_STATS` like a real packet.
    pub fn test_run(&self, program: &str, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let run = self.test_run_repeated(program, packet, 1)?;
        Ok((run.verdict, run.packet))
    }

    /// As [`Datapath::test_run`], with the program run `repeat` times in one call and the
    /// kernel's measure of the time per run (`BPF_PROG_TEST_RUN`'s `duration`: the runs alone,
    /// without the syscall or building the skb). The kernel runs every repetition on the same
    /// skb, so a program that rewrites the packet sees its own output from the second run on:
    /// `repeat > 1` measures one path only for packets the program leaves as it found them.
    pub fn test_run_repeated(
        &self,
        program: &str,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<TestRunOutcome> {
        use aya::programs::{Program, TestRun as _, TestRunOptions};
        let prog = self
            .ebpf
            .program(program)
            .ok_or_else(|| anyhow!("no program {program}"))?;
        // Room for what the programs add (encapsulation grows a frame by 50 bytes).
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::new()
        };
        let stats = || {
            prog.info()
                .map(|i| (i.run_count(), i.run_time()))
                .with_context(|| format!("reading the run-time statistics of {program}"))
        };
        let before = stats()?;
        let result = match prog {
            Program::SchedClassifier(p) => p.test_run(opts),
            Program::Xdp(p) => p.test_run(opts),
            other => anyhow::bail!("cannot test-run {program} ({:?})", other.prog_type()),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        let after = stats()?;
        let runs = after.0.saturating_sub(before.0);
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            verdict: result.return_value,
            packet: out,
            per_run: result.duration,
            per_run_stats: (runs == u64::from(repeat.max(1)))
                .then(|| after.1.saturating_sub(before.1) / repeat.max(1)),
        })
    }

    /// Detaches `program_name` by removing the link pinned under `key` (a veth that is already
    /// gone took its link with it; the pin is removed all the same).
    pub fn detach(&mut self, program_name: &str, key: &str) -> anyhow::Result<()> {
        let pin = self.pins.link(program_name, key);
        match std::fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing link pin {}", pin.display())),
        }
    }
}

/// If a link is pinned at `pin`, puts `program_name` into it in place of whatever program it
/// runs (atomically: no packet meets the hook without a program) and returns true; false when
/// there is no such pin. The link stays pinned where it is.
fn replace_in_pinned_link(ebpf: &mut Ebpf, program_name: &str, pin: &Path) -> anyhow::Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let old =
        PinnedLink::from_pin(pin).with_context(|| format!("opening link pin {}", pin.display()))?;
    let program = ebpf
        .program_mut(program_name)
        .ok_or_else(|| anyhow!("no program {program_name}"))?;
    if let aya::programs::Program::SchedClassifier(p) = &*program {
        if netkit::replace_if_netkit(pin, p.fd()?.as_fd())? {
            return Ok(true);
        }
    }
    let link = FdLink::from(old);
    match program {
        aya::programs::Program::SchedClassifier(p) => {
            let link = link.try_into().context("pinned link is not a TC link")?;
            let id = p.attach_to_link(link)?;
            // Closing our descriptor leaves the link attached: the pin holds it.
            let _: FdLink = p.take_link(id)?.try_into()?;
        }
        aya::programs::Program::Xdp(p) => {
            let link = link.try_into().context("pinned link is not an XDP link")?;
            let id = p.attach_to_link(link)?;
            let _: FdLink = p.take_link(id)?.try_into()?;
        }
        other => anyhow::bail!(
            "program {program_name} ({:?}) has no pinned links",
            other.prog_type()
        ),
    }
    Ok(true)
}
