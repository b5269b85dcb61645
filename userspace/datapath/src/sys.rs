//! The one raw bpf(2) call, for the commands aya 0.14 does not offer (batch lookups, netkit
//! links, the layout upgrade's untyped copies). Each caller defines the `union bpf_attr` member
//! it needs as a `#[repr(C)]` struct.

use std::io;

/// `bpf(cmd, attr, size_of::<T>())`: the command's return value (a new descriptor for the
/// commands that make one, 0 otherwise), or the errno.
///
/// # Safety
/// `attr` must be a `#[repr(C)]` prefix of `union bpf_attr` as `cmd` reads it, and every pointer
/// in it must point at memory of the size the command expects, live for the call (the kernel
/// zero-extends a shorter attribute).
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: as the caller promises.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
