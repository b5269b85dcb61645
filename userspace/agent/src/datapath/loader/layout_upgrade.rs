//! Upgrades across a `MAP_LAYOUT_VERSION` change: the pins of this instance under another
//! layout version (`<bpffs>/ebpf-overlay/v<M>/<instance>/`, left by the agent this one
//! replaces) are taken over before this agent attaches anything.
//!
//! - Every pinned link of the old agent gets this binary's program of the same name, in place
//!   (`bpf_link_update`, atomic), and moves into this layout's `links/`: no hook ever runs two
//!   program sets, nor none. A link of a program this binary does not have is removed
//!   (detaching it).
//! - Maps whose layout is unchanged since the old version ([`SAME_LAYOUT_SINCE`]) have their
//!   entries copied into this layout's (new, empty) maps before the programs run on them, so
//!   endpoints, routes, VTEPs, networks and counters carry over and traffic keeps flowing. The
//!   others start empty and are refilled by the agent (NAT state is lost: masqueraded flows
//!   start again).
//! - Maps whose layout changed in a way this binary can translate ([`translated`]) have their
//!   entries rewritten into the new layout instead: a v2 route becomes a v3 route whose network id
//!   and VNI are both the old VNI (what it meant then), and the VNIs of the old networks are
//!   accepted, so the wire stays as it was until the agent applies the master's state.
//! - v4 gave every network a counter slot: endpoints and routes carry theirs (in what was
//!   padding, so they are copied, then rewritten with their slots: [`fill_slots`]), and
//!   the old per-CPU hash of counters is added into the new per-CPU array slot by slot
//!   ([`carry_counts`]).
//! - v5 gave every VTEP a next-hop slot: VTEPs and routes carry theirs (in what was padding and
//!   an unused flags word, so they are copied, then rewritten with their slots:
//!   [`fill_slots`]); the cached next hops themselves are mirrored again.
//! - Then the old version's pins are removed; its maps go with its last program.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{Ebpf, maps::MapData};
use overlay_common::maps::{MAP_LAYOUT_VERSION, names};

use super::{super::PinLayout, replace_in_pinned_link};

/// For each pinned map: the oldest layout version whose entries this binary reads as its own
/// (same key and value types, same meaning). Revisit with every `MAP_LAYOUT_VERSION` bump: a
/// map whose layout changed gets the new version here (its entries are then not carried over).
/// Checked for layout version [`CHECKED_FOR`].
pub const SAME_LAYOUT_SINCE: &[(&str, u32)] = &[
    (names::CONFIG, 1),
    // v4: `Endpoint::slot` took the place of the padding (0: copied, then filled in).
    (names::ENDPOINTS, 1),
    // v3: RemoteRoute holds the network id and the wire VNI apart (32 -> 36 bytes).
    // v4: `RemoteRoute::slot` took the place of the padding, as for endpoints.
    // v5: `RemoteRoute::next_hop` took the place of the flags, always 0 before (copied, then
    // filled in).
    (names::ROUTES, 3),
    (names::SUBNETS, 1),
    // v5: `Vtep::next_hop` took the place of the padding (0: copied, then filled in).
    (names::VTEPS, 1),
    (names::NETWORKS, 1),
    // v4: a per-CPU array by counter slot, not a per-CPU hash: the counts are added in
    // (`carry_counts`), not copied.
    (names::STATS, 4),
    // v4: new map, each network's counter slot (filled as the counts and entries come over).
    (names::NET_SLOTS, 4),
    (names::PROTECTED, 1),
    // v2: NatEntry flags track the TCP handshake; NatConfig grew (24 -> 40 bytes); new map.
    // v3: IPv6 masquerade. NAT entries keep their layout (IPv6 flows are new entries of it);
    // NatConfig took the IPv6 source address in place of its padding (40 -> 52 bytes): the
    // agent writes it anew at start. OVL_TAIL_CALLS grew a slot (never carried anyway).
    (names::NAT, 2),
    (names::NAT_CONFIG, 3),
    (names::NAT_QUOTA, 2),
    // v3: new map, the VNIs VXLAN is accepted in (the agent refills it from the state).
    (names::VNIS, 3),
];

/// Maps never copied from another layout: program arrays, whose entries are the loading
/// binary's own programs (every load puts them in, `fill_tail_calls`); the drop monitor's ring
/// buffer (no entries to copy: events in flight are lost), switch (every agent starts with it
/// off) and per-CPU budget (starts full); the cached next hops (the new agent mirrors them from
/// the kernel's tables again at start; until then the kernel's lookup addresses the packets).
pub const NEVER_CARRIED: &[&str] = &[
    names::TAIL_CALLS,
    names::NEXT_HOPS,
    names::DROP_EVENTS,
    names::MONITOR,
    names::DROP_BUDGET,
];

/// The layout version [`SAME_LAYOUT_SINCE`] was last checked against (a test compares it).
/// v3 changed only `OVL_TAIL_CALLS` (a third slot), which is never carried: every other map
/// keeps its layout and carries over from v1/v2. v4 changed `OVL_STATS` (carried by
/// [`carry_counts`]) and added `OVL_NET_SLOTS`. v5 made `OVL_NEXT_HOPS` an array (never
/// carried) and gave VTEPs and routes their next-hop slots ([`fill_slots`]).
#[allow(dead_code)]
pub const CHECKED_FOR: u32 = 5;

/// Whether entries of `map` pinned by an agent of layout `version` can be copied as they are.
pub fn carries_over(map: &str, version: u32) -> bool {
    // Newer layouts than ours are unknown to this binary: nothing of theirs is read.
    version <= MAP_LAYOUT_VERSION
        && !NEVER_CARRIED.contains(&map)
        && SAME_LAYOUT_SINCE
            .iter()
            .any(|(name, since)| *name == map && *since <= version)
}

/// What was taken over from one other layout version.
#[derive(Debug, Default)]
pub struct TakenOver {
    pub version: u32,
    pub links_replaced: Vec<String>,
    pub links_removed: Vec<String>,
    pub maps_copied: Vec<(String, usize)>,
    pub maps_dropped: Vec<String>,
}

/// Pin directories of `instance` under layout versions other than ours, as (version, dir).
pub fn other_layouts(root: &Path, instance: &str) -> anyhow::Result<Vec<(u32, PathBuf)>> {
    let mut found = vec![];
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(version) = name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path().join(instance);
        if version != MAP_LAYOUT_VERSION && dir.is_dir() {
            found.push((version, dir));
        }
    }
    found.sort();
    Ok(found)
}

/// Takes over the pins of this instance under every other layout version (see the module
/// comment). Called with the programs loaded and this layout's maps pinned, before anything is
/// attached.
pub fn take_over_other_layouts(ebpf: &mut Ebpf, pins: &PinLayout) -> anyhow::Result<()> {
    let instance_dir = pins.dir();
    let (Some(instance), Some(root)) = (
        instance_dir.file_name().and_then(|n| n.to_str()),
        instance_dir.parent().and_then(Path::parent),
    ) else {
        bail!("unexpected pin directory {}", instance_dir.display());
    };
    for (version, old_dir) in other_layouts(root, instance)? {
        let report = take_over(ebpf, pins, version, &old_dir).with_context(|| {
            format!(
                "taking over the pins of layout version {version} ({})",
                old_dir.display()
            )
        })?;
        tracing::warn!(
            from = report.version,
            to = MAP_LAYOUT_VERSION,
            links_replaced = ?report.links_replaced,
            links_removed = ?report.links_removed,
            maps_copied = ?report.maps_copied,
            maps_started_empty = ?report.maps_dropped,
            "map layout upgrade: took over the datapath of the previous agent"
        );
    }
    Ok(())
}

fn take_over(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    version: u32,
    old_dir: &Path,
) -> anyhow::Result<TakenOver> {
    let mut report = TakenOver {
        version,
        ..Default::default()
    };
    // Maps first: the programs put into the old links below must find the state already there.
    // Counters come over last (below), while the old programs still count: the fewer packets
    // counted after their counter was read, the fewer lost. The slots they go by come first.
    let counts_added = version < 4 && old_dir.join("maps").join(names::STATS).exists();
    let old_slots = old_dir.join("maps").join(names::NET_SLOTS);
    if counts_added
        && old_slots.exists()
        && let Some(n) = copy_entries(&old_slots, &pins.map(names::NET_SLOTS))?
    {
        report.maps_copied.push((names::NET_SLOTS.to_owned(), n));
    }
    for name in names::ALL {
        let old = old_dir.join("maps").join(name);
        let carried = counts_added && (*name == names::STATS || *name == names::NET_SLOTS);
        if !old.exists() || carried {
            continue;
        }
        if let Some(translate) = translated(name, version) {
            let n = translate_entries(&old, &pins.map(name), translate)
                .with_context(|| format!("translating the entries of {name}"))?;
            report.maps_copied.push(((*name).to_owned(), n));
            continue;
        }
        if !carries_over(name, version) {
            report.maps_dropped.push((*name).to_owned());
            continue;
        }
        match copy_entries(&old, &pins.map(name))
            .with_context(|| format!("copying the entries of {name}"))?
        {
            Some(n) => report.maps_copied.push(((*name).to_owned(), n)),
            None => report.maps_dropped.push((*name).to_owned()),
        }
    }
    if version < 3 {
        // Before v3 a network's id was its VNI: accept each old network's VNI as carrying it.
        let old = old_dir.join("maps").join(names::NETWORKS);
        if old.exists() {
            let n = vnis_of_networks(&old, &pins.map(names::VNIS))
                .context("accepting the VNIs of the old layout's networks")?;
            report.maps_copied.push((names::VNIS.to_owned(), n));
        }
    }
    if version < 5 {
        fill_slots(pins).context("giving the carried VTEPs, endpoints and routes their slots")?;
    }
    if counts_added {
        let n = carry_counts(old_dir, pins).context("adding the old layout's counters")?;
        report.maps_copied.push((names::STATS.to_owned(), n));
    }
    let links = old_dir.join("links");
    let mut pinned: Vec<PathBuf> = match std::fs::read_dir(&links) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("reading {}", links.display())),
    };
    pinned.sort();
    for old in pinned {
        let file = old
            .file_name()
            .and_then(|n| n.to_str())
            .context("link pin name")?
            .to_owned();
        let program = file.split('@').next().unwrap_or_default();
        let new = pins.dir().join("links").join(&file);
        let ours = ebpf.program(program).is_some();
        if ours && !new.exists() {
            // Our program into the old link first (the hook keeps exactly one program), then
            // the pin into our layout (bpffs renames within one mount).
            replace_in_pinned_link(ebpf, program, &old)?;
            std::fs::rename(&old, &new)
                .with_context(|| format!("moving {} to {}", old.display(), new.display()))?;
            report.links_replaced.push(file);
        } else {
            // A program this binary does not have, or a hook our layout already holds a link
            // for (an interrupted earlier take-over): the old link goes, detaching its program.
            std::fs::remove_file(&old)
                .with_context(|| format!("removing link pin {}", old.display()))?;
            report.links_removed.push(file);
        }
    }
    std::fs::remove_dir_all(old_dir).with_context(|| format!("removing {}", old_dir.display()))?;
    if let Some(version_dir) = old_dir.parent() {
        let _ = std::fs::remove_dir(version_dir); // only if no other instance is left in it
    }
    Ok(report)
}

/// Rewrites one entry's value of an older layout into this one's (None: leave the entry out).
type Translate = fn(&[u8]) -> Option<Vec<u8>>;

/// How entries of `map` pinned by an agent of layout `version` are rewritten into this layout,
/// when they are not carried as they are.
pub fn translated(map: &str, version: u32) -> Option<Translate> {
    (map == names::ROUTES && version < 3).then_some(route_v2_to_v3 as Translate)
}

/// v1/v2 `RemoteRoute` (underlay 16, MAC 6, pad 2, vni 4, flags 4) -> v3 (underlay 16, MAC 6,
/// pad 2, network 4, vni 4, flags 4): the old VNI was both the network and the wire VNI. A value
/// already of v3's size (pins recorded under an older version but written by this layout, as a
/// take-over interrupted after the copy leaves them) is this layout's already: kept as it is.
fn route_v2_to_v3(old: &[u8]) -> Option<Vec<u8>> {
    if old.len() == size_of::<overlay_common::maps::RemoteRoute>() {
        return Some(old.to_vec());
    }
    if old.len() != 32 {
        return None;
    }
    let mut new = Vec::with_capacity(36);
    new.extend_from_slice(&old[..28]);
    new.extend_from_slice(&old[24..28]);
    new.extend_from_slice(&old[28..32]);
    Some(new)
}

/// Writes every entry of the map pinned at `from`, translated, into the one pinned at `to`
/// (same key size); returns how many were written.
fn translate_entries(from: &Path, to: &Path, translate: Translate) -> anyhow::Result<usize> {
    let src = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = MapData::from_pin(to).with_context(|| format!("opening {}", to.display()))?;
    let (si, di) = (src.info()?, dst.info()?);
    if si.key_size() != di.key_size() {
        bail!("key size {} -> {}", si.key_size(), di.key_size());
    }
    let dst_fd = dst.fd().as_fd().as_raw_fd();
    let mut written = 0;
    for (key, value) in raw::entries(
        src.fd().as_fd(),
        si.key_size() as usize,
        si.value_size() as usize,
    )? {
        let Some(value) = translate(&value) else {
            continue;
        };
        if value.len() != di.value_size() as usize {
            bail!(
                "translated value of {} bytes, map holds {}",
                value.len(),
                di.value_size()
            );
        }
        raw::update(dst_fd, &key, &value).context("BPF_MAP_UPDATE_ELEM")?;
        written += 1;
    }
    Ok(written)
}

/// Puts into `OVL_VNIS` (pinned at `to`) the VNI of every network of an old layout's
/// `OVL_NETWORKS` (pinned at `from`, keyed by the VNI that was the network's id).
fn vnis_of_networks(from: &Path, to: &Path) -> anyhow::Result<usize> {
    use overlay_common::maps::WireVni;
    let src = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = MapData::from_pin(to).with_context(|| format!("opening {}", to.display()))?;
    let dst_fd = dst.fd().as_fd().as_raw_fd();
    let key_len = src.info()?.key_size() as usize;
    let value_len = src.info()?.value_size() as usize;
    if key_len != 4 {
        bail!("old OVL_NETWORKS has keys of {key_len} bytes");
    }
    let mut written = 0;
    for (key, _) in raw::entries(src.fd().as_fd(), key_len, value_len)? {
        let id = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]);
        let carries = WireVni::carrying(&[id]);
        let mut value = Vec::with_capacity(8);
        value.extend_from_slice(&carries.network.to_ne_bytes());
        value.extend_from_slice(&carries.flags.to_ne_bytes());
        raw::update(dst_fd, &key, &value).context("BPF_MAP_UPDATE_ELEM")?;
        written += 1;
    }
    Ok(written)
}

/// Adds the counts of a v1-v3 `OVL_STATS` (a per-CPU hash keyed by network id and counter,
/// 16-byte values) in `old_dir` into this layout's per-CPU array, each network's in its
/// counter slot (given to it here if it has none yet); returns how many counters came over.
/// Counters already of this layout (pins recorded under an older version but written by this
/// one, whose slots came over before) are copied as they are, the slots in use only.
fn carry_counts(old_dir: &Path, pins: &PinLayout) -> anyhow::Result<usize> {
    let from = old_dir.join("maps").join(names::STATS);
    let src = MapData::from_pin(&from).with_context(|| format!("opening {}", from.display()))?;
    let info = src.info()?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    if info.map_type().ok() == Some(aya::maps::MapType::PerCpuArray) {
        use overlay_common::maps::{STAT_COUNTERS_PER_SLOT, Stat, stat_index};
        let to = pins.map(names::STATS);
        let dst = MapData::from_pin(&to).with_context(|| format!("opening {}", to.display()))?;
        if (info.key_size(), info.value_size())
            != (dst.info()?.key_size(), dst.info()?.value_size())
        {
            bail!("old OVL_STATS is an array of another layout");
        }
        let maps = overlay_datapath::OverlayMaps::open_pinned(pins)?;
        let mut slots: Vec<u32> = maps.counter_slots()?.into_values().collect();
        slots.push(0);
        let (src_fd, dst_fd) = (src.fd().as_fd().as_raw_fd(), dst.fd().as_fd().as_raw_fd());
        let mut value = vec![0u8; size_of::<Stat>().next_multiple_of(8) * cpus];
        let mut copied = 0;
        for slot in slots {
            for counter in 0..STAT_COUNTERS_PER_SLOT {
                let key = stat_index(slot, counter).to_ne_bytes();
                if raw::lookup(src_fd, &key, &mut value).context("BPF_MAP_LOOKUP_ELEM")? {
                    raw::update(dst_fd, &key, &value).context("BPF_MAP_UPDATE_ELEM")?;
                    copied += 1;
                }
            }
        }
        return Ok(copied);
    }
    if info.key_size() != 8 || info.value_size() != 16 {
        bail!(
            "old OVL_STATS has {}-byte keys and {}-byte values",
            info.key_size(),
            info.value_size()
        );
    }
    let mut maps = overlay_datapath::OverlayMaps::open_pinned(pins)?;
    let mut carried = 0;
    for (key, value) in raw::entries(src.fd().as_fd(), 8, 16 * cpus)? {
        let word =
            |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let long = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
        let per_cpu: Vec<(u64, u64)> = value
            .chunks_exact(16)
            .map(|v| (long(v, 0), long(v, 8)))
            .collect();
        maps.add_counts(word(&key, 0), word(&key, 4), &per_cpu)?;
        carried += 1;
    }
    Ok(carried)
}

/// Rewrites every VTEP, endpoint and route of this layout's maps (carried over with slots 0)
/// through the map façade, which gives each VTEP its next-hop slot (VTEPs first: their routes
/// take it from them) and each endpoint and route its network's counter slot.
fn fill_slots(pins: &PinLayout) -> anyhow::Result<()> {
    let mut maps = overlay_datapath::OverlayMaps::open_pinned(pins)?;
    for (ip, vtep) in maps.vteps()? {
        maps.put_vtep(ip, vtep)?;
    }
    for (ip, ep) in maps.endpoints()? {
        maps.put_endpoint(ip, ep)?;
    }
    for (subnet, route) in maps.routes()? {
        maps.put_route(subnet, route)?;
    }
    Ok(())
}

/// Copies every entry of the map pinned at `from` into the one pinned at `to`, byte for byte.
/// `None` (nothing copied) when the two differ in type or key or value size: then the layout
/// changed after all, whatever [`SAME_LAYOUT_SINCE`] says.
fn copy_entries(from: &Path, to: &Path) -> anyhow::Result<Option<usize>> {
    let src = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = MapData::from_pin(to).with_context(|| format!("opening {}", to.display()))?;
    let (si, di) = (src.info()?, dst.info()?);
    let shape = |i: &aya::maps::MapInfo| (i.map_type().ok(), i.key_size(), i.value_size());
    if shape(&si) != shape(&di) {
        tracing::warn!(map = %from.display(), "pinned map's shape differs: not carried over");
        return Ok(None);
    }
    let value_len = match si.map_type().ok() {
        Some(
            aya::maps::MapType::PerCpuHash
            | aya::maps::MapType::PerCpuArray
            | aya::maps::MapType::LruPerCpuHash,
        ) => {
            let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
            (si.value_size() as usize).next_multiple_of(8) * cpus
        }
        _ => si.value_size() as usize,
    };
    let key_len = si.key_size() as usize;
    // In batches: the old programs still run on `from` (NAT flows open, close and are evicted),
    // and an entry-by-entry walk starts over each time the entry it stands on goes
    // (`overlay_datapath::batch`). Entry by entry only where the kernel has no batch calls.
    match overlay_datapath::batch::copy(src.fd().as_fd(), dst.fd().as_fd(), key_len, value_len) {
        Ok(n) => return Ok(Some(n)),
        Err(e) if overlay_datapath::batch::unsupported(&e) => {}
        Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH / BPF_MAP_UPDATE_BATCH"),
    }
    let dst_fd = dst.fd().as_fd().as_raw_fd();
    let mut copied = 0;
    for (key, value) in raw::entries_one_by_one(src.fd().as_fd().as_raw_fd(), key_len, value_len)
        .context("BPF_MAP_GET_NEXT_KEY / BPF_MAP_LOOKUP_ELEM")?
    {
        raw::update(dst_fd, &key, &value).context("BPF_MAP_UPDATE_ELEM")?;
        copied += 1;
    }
    Ok(Some(copied))
}

/// The map commands of bpf(2) the copies need, on raw key and value bytes (aya's maps are typed;
/// here the types are whatever both layouts agree on): batches where the kernel has them.
mod raw {
    use std::os::fd::{AsRawFd as _, BorrowedFd, RawFd};

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_ANY: u64 = 0;

    /// `union bpf_attr` as the map element commands read it.
    #[repr(C)]
    #[derive(Default)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value_or_next_key: u64,
        flags: u64,
    }

    fn bpf(cmd: libc::c_long, attr: &mut MapElemAttr) -> std::io::Result<()> {
        // SAFETY: `attr` is a valid bpf_attr prefix for `cmd`; the pointers in it point to
        // buffers of the map's key and value sizes that outlive the call.
        unsafe { overlay_datapath::sys::bpf(cmd, attr) }.map(drop)
    }

    /// The key after `key` (the first with `None`); false at the end.
    pub fn next_key(fd: RawFd, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<bool> {
        let mut attr = MapElemAttr {
            map_fd: fd as u32,
            key: key.map_or(0, |k| k.as_ptr() as u64),
            value_or_next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value of `key`; false if there is none.
    pub fn lookup(fd: RawFd, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
        let mut attr = MapElemAttr {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every (key, value) of a map (`value_len`: for a per-CPU map, every CPU's), in batches
    /// where the kernel has them.
    pub fn entries(
        fd: BorrowedFd<'_>,
        key_len: usize,
        value_len: usize,
    ) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let batched = overlay_datapath::batch::walk(fd, key_len, value_len, |keys, values, _| {
            out.extend(
                keys.chunks_exact(key_len)
                    .zip(values.chunks_exact(value_len))
                    .map(|(k, v)| (k.to_vec(), v.to_vec())),
            );
            Ok(())
        });
        match batched {
            Ok(()) => Ok(out),
            Err(e) if overlay_datapath::batch::unsupported(&e) => {
                entries_one_by_one(fd.as_raw_fd(), key_len, value_len)
            }
            Err(e) => Err(e),
        }
    }

    /// [`entries`] with `GET_NEXT_KEY` and a lookup per entry (kernels or maps without batch
    /// calls); an entry gone between the two is left out.
    pub fn entries_one_by_one(
        fd: RawFd,
        key_len: usize,
        value_len: usize,
    ) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut key = vec![0u8; key_len];
        let mut next = vec![0u8; key_len];
        let mut first = true;
        while next_key(fd, (!first).then_some(&key[..]), &mut next)? {
            first = false;
            key.copy_from_slice(&next);
            let mut value = vec![0u8; value_len];
            if lookup(fd, &key, &mut value)? {
                out.push((key.clone(), value));
            }
        }
        Ok(out)
    }

    pub fn update(fd: RawFd, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let mut attr = MapElemAttr {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_ptr() as u64,
            flags: BPF_ANY,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_every_map_and_the_current_layout() {
        for name in names::ALL {
            assert!(
                SAME_LAYOUT_SINCE.iter().any(|(n, _)| n == name) || NEVER_CARRIED.contains(name),
                "{name} missing from SAME_LAYOUT_SINCE (or NEVER_CARRIED)"
            );
        }
        assert_eq!(
            CHECKED_FOR, MAP_LAYOUT_VERSION,
            "MAP_LAYOUT_VERSION changed: say in SAME_LAYOUT_SINCE which maps kept their layout, \
             then set CHECKED_FOR"
        );
        for (name, since) in SAME_LAYOUT_SINCE {
            assert!(*since <= MAP_LAYOUT_VERSION, "{name}: {since}");
        }
    }

    #[test]
    fn v2_routes_become_v3_routes_of_the_same_network_and_vni() {
        use overlay_common::maps::{RemoteRoute, ipv4_mapped};
        // A v2 route as the old agent wrote it: network 4242 was also its VNI.
        let mut old = Vec::new();
        old.extend_from_slice(&ipv4_mapped([10, 0, 0, 2]));
        old.extend_from_slice(&[2, 0, 0, 0, 0, 3, 0, 0]);
        old.extend_from_slice(&4242u32.to_ne_bytes());
        old.extend_from_slice(&0u32.to_ne_bytes());
        let new = translated(names::ROUTES, 2).unwrap()(&old).unwrap();
        let want = RemoteRoute::new(ipv4_mapped([10, 0, 0, 2]), [2, 0, 0, 0, 0, 3], 4242, 4242);
        // SAFETY: RemoteRoute is plain #[repr(C)] data of this size.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&want as *const RemoteRoute).cast::<u8>(),
                size_of::<RemoteRoute>(),
            )
        };
        assert_eq!(new, bytes);
        assert!(translated(names::ROUTES, 3).is_none());
        assert!(translated(names::ROUTES, 4).is_none());
        assert!(translated(names::ENDPOINTS, 2).is_none());
        assert_eq!(route_v2_to_v3(&new), Some(new.clone()), "already v3: kept");
        assert!(route_v2_to_v3(&[0; 20]).is_none());
    }

    #[test]
    fn entries_carry_over_only_from_versions_with_the_same_layout() {
        assert!(carries_over(names::ENDPOINTS, 1));
        assert!(carries_over(names::ENDPOINTS, MAP_LAYOUT_VERSION));
        assert!(!carries_over(names::NAT, 1));
        assert!(carries_over(names::NAT, 2));
        // v3 split a route's network id from its VNI: v2 routes are not read as v3 ones (v4's
        // slot is v3's padding: carried, then filled in).
        assert!(!carries_over(names::ROUTES, 2));
        assert!(carries_over(names::ROUTES, 3));
        assert!(carries_over(names::NAT, 3));
        assert!(
            !carries_over(names::NAT_CONFIG, 2),
            "v3 NatConfig is 52 bytes"
        );
        assert!(carries_over(names::NAT_CONFIG, 3));
        // v4 counters are an array by slot: the old hash's are added in, not copied.
        assert!(!carries_over(names::STATS, 3));
        assert!(carries_over(names::STATS, 4));
        assert!(!carries_over(names::NET_SLOTS, 3));
        // A newer agent's layout is unknown to us.
        assert!(!carries_over(names::ENDPOINTS, MAP_LAYOUT_VERSION + 1));
        assert!(!carries_over("OVL_SOMETHING_ELSE", 1));
    }

    #[test]
    fn other_layouts_lists_this_instance_under_other_versions_only() {
        let root = std::env::temp_dir().join(format!("layout-upgrade-{}", std::process::id()));
        let newer = format!("v{}/a", MAP_LAYOUT_VERSION + 1);
        for dir in ["v1/a", "v1/b", newer.as_str(), "x/a", "vx/a"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::create_dir_all(root.join(format!("v{MAP_LAYOUT_VERSION}/a"))).unwrap();
        let found = other_layouts(&root, "a").unwrap();
        let missing = other_layouts(&root.join("missing"), "a").unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        let versions: Vec<u32> = found.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, [1, MAP_LAYOUT_VERSION + 1]);
        assert_eq!(found[0].1, root.join("v1/a"));
        assert!(missing.is_empty());
    }
}
