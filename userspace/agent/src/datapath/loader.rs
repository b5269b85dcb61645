//! Loading the embedded eBPF object and attaching its programs with pinned TCX links.

use std::io;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use overlay_common::maps::{names, programs, tail_calls};

use super::{OverlayMaps, PinLayout};

/// The eBPF object, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

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
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_name)
            .ok_or_else(|| anyhow!("no program {program_name}"))?
            .try_into()?;
        let link_id = if pin.exists() {
            let old = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening link pin {}", pin.display()))?;
            let link = FdLink::from(old)
                .try_into()
                .context("pinned link is not a TC link")?;
            program
                .attach_to_link(link)
                .with_context(|| format!("replacing {program_name} on {ifname}"))?
        } else {
            program
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {program_name} to TC ingress of {ifname}"))?
        };
        let link: FdLink = program.take_link(link_id)?.try_into()?;
        // Re-pinning an already pinned link fails with EEXIST; it is pinned either way.
        if !pin.exists() {
            link.pin(&pin)
                .with_context(|| format!("pinning link at {}", pin.display()))?;
        }
        Ok(())
    }

    /// Runs `program` once on `packet` with `BPF_PROG_TEST_RUN`: no interface, no netns of its
    /// own (the kernel hands the program an skb on the caller's loopback, ifindex 1). Returns the
    /// program's verdict and the packet as the program left it. Maps are the live ones, so the
    /// run counts in `OVL_STATS` like a real packet.
    pub fn test_run(&self, program: &str, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or_else(|| anyhow!("no program {program}"))?
            .try_into()?;
        // Room for what the programs add (encapsulation grows a frame by 50 bytes).
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
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
