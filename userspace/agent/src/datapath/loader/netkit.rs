//! Attaching a program to a netkit pair through `BPF_LINK_CREATE` (aya 0.14 has no netkit
//! link type): a small wrapper over bpf(2) for the four commands needed, link create, link
//! update, pin and get. The links are pinned where the TCX links of veths are, so restarts and
//! upgrades treat both alike: an existing pin gets the new program in place (`BPF_LINK_UPDATE`),
//! never a second link.
//!
//! Which side: a program attached as `BPF_NETKIT_PEER` on the host-side (primary) device runs on
//! every packet the container sends, with `skb->dev` the host-side device, as `from_container`
//! sees it on a veth's TC ingress. Its verdicts keep their meaning: `TC_ACT_OK` hands the packet
//! to the host side's stack, `TC_ACT_SHOT` drops, `TC_ACT_REDIRECT` redirects.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::Context as _;

/// bpf(2) commands (`enum bpf_cmd`).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_attach_type`: programs on packets the container side sends.
const BPF_NETKIT_PEER: u32 = 55;
/// `enum bpf_link_type`.
const BPF_LINK_TYPE_NETKIT: u32 = 13;

/// `bpf_attr.link_create` with its netkit member (relative program and revision unused: the
/// agent's program is the only one on the device).
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// `bpf_attr.link_update`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr` for `BPF_OBJ_PIN` / `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf_attr.info`.
#[repr(C)]
#[derive(Default)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// bpf(2) on one of this module's attribute structs.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: every caller passes a live, initialised `repr(C)` prefix of `union bpf_attr` for
    // `cmd`, whose pointers point at buffers that outlive the call.
    unsafe { overlay_datapath::sys::bpf(cmd, attr) }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(pin: &Path) -> anyhow::Result<CString> {
    CString::new(pin.as_os_str().as_bytes())
        .with_context(|| format!("pin path {} holds a NUL byte", pin.display()))
}

/// Opens the object pinned at `pin`.
fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjPin {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// The `bpf_link_info.type` of the link pinned at `pin`.
fn pinned_link_type(pin: &Path) -> anyhow::Result<(OwnedFd, u32)> {
    let fd = obj_get(pin).with_context(|| format!("opening link pin {}", pin.display()))?;
    // `struct bpf_link_info` starts with type, id, prog_id; the kernel fills what fits.
    let mut info = [0u32; 32];
    let mut attr = GetInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .with_context(|| format!("reading the link pinned at {}", pin.display()))?;
    Ok((fd, info[0]))
}

/// If the link pinned at `pin` is a netkit link, puts `program` into it in place of the one it
/// runs (atomically) and returns true; false for any other link type (a TCX or XDP link, for
/// aya to update).
pub fn replace_if_netkit(pin: &Path, program: BorrowedFd<'_>) -> anyhow::Result<bool> {
    let (link, kind) = pinned_link_type(pin)?;
    if kind != BPF_LINK_TYPE_NETKIT {
        return Ok(false);
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr)
        .with_context(|| format!("BPF_LINK_UPDATE of the netkit link {}", pin.display()))?;
    Ok(true)
}

/// Attaches `program` to the packets the container side of the netkit pair `ifindex` (the
/// host-side device) sends, and pins the link at `pin` (the pin keeps it attached after the
/// agent exits; the descriptor is closed here).
pub fn attach_peer(ifindex: u32, program: BorrowedFd<'_>, pin: &Path) -> anyhow::Result<()> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_NETKIT_PEER,
        ..Default::default()
    };
    let link = bpf(BPF_LINK_CREATE, &mut attr)
        .map(owned)
        .with_context(|| format!("BPF_LINK_CREATE (netkit peer) on interface #{ifindex}"))?;
    let path = c_path(pin)?;
    let mut attr = ObjPin {
        pathname: path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}
