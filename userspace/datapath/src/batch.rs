//! Reading and copying whole maps with `BPF_MAP_LOOKUP_BATCH` / `BPF_MAP_UPDATE_BATCH` (aya 0.14
//! has no batch operations).
//!
//! Why not aya's iterator (or a `BPF_MAP_GET_NEXT_KEY` loop): it asks the kernel for the key after
//! the last one it read, and when that key has gone meanwhile (an LRU map evicting under a
//! connection storm, the datapath closing a flow) the kernel answers with the table's first key:
//! the walk starts over, reads entries twice and, while the churn lasts, may never end. It also
//! costs two syscalls per entry. A batch walk of a hash map goes bucket by bucket with a cursor
//! the kernel hands back, so deletions elsewhere in the table cannot send it back to the start,
//! and it reads thousands of entries per syscall.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{Pod, maps::MapData};

/// `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h, enum bpf_cmd).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's `ENOTSUPP` (not in libc: kernel-internal, but bpf(2) returns it for a map type
/// without batch operations).
const ENOTSUPP: i32 = 524;

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

/// Whether `e` says the kernel has no batch operations for this map (older kernels, map types
/// without them): the caller walks entry by entry instead.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP))
}

/// Hands every entry of the map behind `fd` to `each`, a batch at a time, as raw bytes: `keys`
/// holds `n` keys of `key_len` bytes, `values` `n` values of `value_len` bytes (for a per-CPU
/// map: the value size rounded up to 8, times the possible CPUs). Any map type with batch
/// lookups: hash maps (the cursor is a bucket), arrays and tries (the kernel's generic walk,
/// whose cursor is a key).
pub fn walk(
    fd: BorrowedFd<'_>,
    key_len: usize,
    value_len: usize,
    mut each: impl FnMut(&[u8], &[u8], usize) -> io::Result<()>,
) -> io::Result<()> {
    let mut keys = vec![0u8; key_len * CHUNK];
    let mut values = vec![0u8; value_len * CHUNK];
    // Big enough for either cursor: a hash map's bucket index (u32) or a key.
    let mut cursor = vec![0u8; key_len.max(8)];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: cursor.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the sizes the caller
        // gave for this map, and at a cursor of at least a key's size; all outlive the call.
        // The kernel reads `in_batch` before it writes `out_batch`.
        let rc = unsafe { crate::sys::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match rc {
            Ok(_) => false,
            // The last bucket was read: `count` holds what it had.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let got = (attr.count as usize).min(CHUNK);
        if got > 0 {
            each(&keys[..got * key_len], &values[..got * value_len], got)?;
        }
        if done {
            return Ok(());
        }
        first = false;
    }
}

/// Every entry of a (non-per-CPU) hash map, LRU or not. An error for which [`unsupported`] holds
/// means the kernel has no batch operations for this map (callers fall back to the iterator).
pub fn hash_entries<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let (key_len, value_len) = (size_of::<K>(), size_of::<V>());
    let mut out = Vec::new();
    walk(map.fd().as_fd(), key_len, value_len, |keys, values, n| {
        out.extend((0..n).map(|i| {
            // SAFETY: K and V are plain data (Pod) of exactly these sizes (aya checked them
            // against the map when the typed map was made); the reads need no alignment.
            unsafe {
                (
                    keys.as_ptr().add(i * key_len).cast::<K>().read_unaligned(),
                    values
                        .as_ptr()
                        .add(i * value_len)
                        .cast::<V>()
                        .read_unaligned(),
                )
            }
        }));
        Ok(())
    })?;
    Ok(out)
}

/// Writes `n` entries (raw keys and values as [`walk`] hands them) into the map behind `fd`
/// with one `BPF_MAP_UPDATE_BATCH` (`BPF_ANY`).
pub fn update(fd: BorrowedFd<'_>, keys: &[u8], values: &[u8], n: usize) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: n as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    assert!(n == 0 || (keys.len().is_multiple_of(n) && values.len().is_multiple_of(n)));
    // SAFETY: `keys` and `values` hold `n` keys and values of the map's sizes (the caller's
    // promise) and outlive the call.
    unsafe { crate::sys::bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
}

/// Writes `entries` into `map` with one `BPF_MAP_UPDATE_BATCH` (`BPF_ANY`).
pub fn put_entries<K: Pod, V: Pod>(map: &MapData, entries: &[(K, V)]) -> io::Result<()> {
    let (key_len, value_len) = (size_of::<K>(), size_of::<V>());
    let mut keys = Vec::with_capacity(entries.len() * key_len);
    let mut values = Vec::with_capacity(entries.len() * value_len);
    for (k, v) in entries {
        // SAFETY: K and V are plain data (Pod): every byte of them may be read as a u8.
        unsafe {
            keys.extend_from_slice(std::slice::from_raw_parts((k as *const K).cast(), key_len));
            values.extend_from_slice(std::slice::from_raw_parts(
                (v as *const V).cast(),
                value_len,
            ));
        }
    }
    update(map.fd().as_fd(), &keys, &values, entries.len())
}

/// Copies every entry of `from` into `to` (maps of the same type, key and value sizes), a batch
/// at a time; returns how many entries were copied. `value_len` as for [`walk`].
pub fn copy(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_len: usize,
    value_len: usize,
) -> io::Result<usize> {
    let mut copied = 0;
    walk(from, key_len, value_len, |keys, values, n| {
        update(to, keys, values, n)?;
        copied += n;
        Ok(())
    })?;
    Ok(copied)
}
