//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH` (aya 0.14 has no batch operations).
//!
//! Why not aya's iterator: it asks `BPF_MAP_GET_NEXT_KEY` for the key after the last one it
//! read, and when that key has gone meanwhile (an LRU map evicting under a connection storm, the
//! datapath closing a flow) the kernel answers with the table's first key: the walk starts over,
//! reads entries twice and, while the churn lasts, may never end. It also costs two syscalls per
//! entry. A batch walk goes bucket by bucket with a cursor the kernel hands back, so deletions
//! elsewhere in the table cannot send it back to the start, and it reads thousands of entries per
//! syscall.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h, enum bpf_cmd).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per syscall: large enough that one bucket always fits (the kernel answers
/// `ENOSPC` for a bucket larger than the space left), small enough to keep each copy short.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a (non-per-CPU) hash map, LRU or not. `Err` with `EINVAL` means the kernel
/// has no batch operations for this map (callers fall back to the iterator).
pub fn hash_entries<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(CHUNK);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(CHUNK);
    // SAFETY: MaybeUninit needs no initialisation; the kernel writes the first `count`.
    unsafe {
        keys.set_len(CHUNK);
        values.set_len(CHUNK);
    }
    // The cursor of a hash map is a bucket index (u32); the first call passes none.
    let mut cursor: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const cursor as u64 },
            out_batch: &raw mut cursor as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the map's own types
        // (aya checked their sizes when the typed map was made) and at `cursor`; all outlive
        // the call.
        let rc = unsafe { crate::sys::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match rc {
            Ok(_) => false,
            // The last bucket was read: `count` holds what it had.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let got = (attr.count as usize).min(CHUNK);
        out.extend((0..got).map(|i| {
            // SAFETY: the kernel wrote the first `got` keys and values.
            unsafe { (keys[i].assume_init(), values[i].assume_init()) }
        }));
        if done {
            return Ok(out);
        }
        first = false;
    }
}
