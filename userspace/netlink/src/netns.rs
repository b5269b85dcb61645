//! Network namespaces: open one by path, run code inside it on the calling thread (`setns`),
//! start a child process in it, and create or remove named ones under /run/netns the way
//! `ip netns add|del` does (so both tools see the same namespaces).

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result};

/// Where named namespaces are bind-mounted (as iproute2 keeps them).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

fn last_os_error(op: impl Into<String>) -> Error {
    Error::from_io(op, std::io::Error::last_os_error())
}

fn setns(file: &File, path: &Path) -> Result<()> {
    // SAFETY: setns on the calling thread with a valid namespace fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(last_os_error(format!(
            "entering network namespace {}",
            path.display()
        )));
    }
    Ok(())
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns> {
        let path = path.as_ref().to_owned();
        let file = File::open(&path).map_err(|e| {
            Error::from_io(format!("opening network namespace {}", path.display()), e)
        })?;
        Ok(Netns { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Netns> {
        Netns::open("/proc/thread-self/ns/net")
    }

    /// The named namespace `/run/netns/<name>`.
    pub fn named(name: &str) -> Result<Netns> {
        Netns::open(Path::new(NETNS_RUN_DIR).join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back to
    /// where it was (also when `f` panics). Only the thread moves: other threads, and sockets
    /// opened before, stay in their namespaces.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let home = Netns::current()?;
        setns(&self.file, &self.path)?;
        struct Back(Netns);
        impl Drop for Back {
            fn drop(&mut self) {
                // Going back to a namespace we were in cannot fail short of fd exhaustion; a
                // thread stuck elsewhere would act on the wrong namespace, so do not go on.
                if setns(&self.0.file, &self.0.path).is_err() {
                    std::process::abort();
                }
            }
        }
        let _back = Back(home);
        Ok(f())
    }

    /// Makes `cmd` start inside this namespace (`setns` in the child before `exec`), without a
    /// new mount namespace, so the child sees the host's /sys and bpffs.
    pub fn prepare_command(&self, cmd: &mut Command) {
        let file = self.file.try_clone();
        // SAFETY: the closure only calls setns(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let file = file
                    .as_ref()
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Creates the named namespace `/run/netns/<name>` (with its loopback down, as the kernel
    /// makes it). [`Error::Exists`] if the name is taken.
    pub fn create_named(name: &str) -> Result<Netns> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::Os {
                op: format!("creating network namespace {name:?}"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        make_run_dir_shared()?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let op = format!("creating network namespace {}", path.display());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::from_io(op.clone(), e))?;
        // A new namespace on a short-lived thread (unshare moves only that thread), pinned by a
        // bind mount of its nsfs file onto /run/netns/<name>.
        let target = path.clone();
        let made = std::thread::spawn(move || -> Result<()> {
            // SAFETY: unshare affects only this thread's namespace membership.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(last_os_error("unshare(CLONE_NEWNET)"));
            }
            mount_bind(Path::new("/proc/thread-self/ns/net"), &target)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Os {
                op: op.clone(),
                source: std::io::Error::other("namespace thread panicked"),
            })
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Netns::open(&path)
    }

    /// Removes the named namespace (it lives on while a process or open fd still holds it).
    pub fn delete_named(name: &str) -> Result<()> {
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let c = cstr(&path)?;
        // SAFETY: umount2 with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: not a mount point (a half-made namespace); remove the file all the same.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(Error::from_io(
                    format!("unmounting network namespace {}", path.display()),
                    e,
                ));
            }
        }
        std::fs::remove_file(&path).map_err(|e| {
            Error::from_io(format!("removing network namespace {}", path.display()), e)
        })
    }

    /// The names under /run/netns.
    pub fn list_named() -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
            return vec![];
        };
        let mut names: Vec<String> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Os {
        op: format!("path {}", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn mount_bind(src: &Path, dst: &Path) -> Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: mount(2) with valid C strings and no data.
    if unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(format!(
            "bind-mounting {} on {}",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}

/// Makes /run/netns a shared mount point, as iproute2 does, so namespace mounts made later
/// propagate into mount namespaces that copied it (and the ones there come back out).
fn make_run_dir_shared() -> Result<()> {
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::from_io(format!("creating {NETNS_RUN_DIR}"), e))?;
    let c = cstr(dir)?;
    let shared = || {
        // SAFETY: mount(2) changing propagation; no source or data.
        unsafe {
            libc::mount(
                c"none".as_ptr(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        }
    };
    if shared() == 0 {
        return Ok(());
    }
    // EINVAL: not a mount point yet. Bind it onto itself, then share it.
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(last_os_error(format!("making {NETNS_RUN_DIR} shared")));
    }
    // SAFETY: as above, a recursive bind of the directory onto itself.
    if unsafe {
        libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(format!("bind-mounting {NETNS_RUN_DIR}")));
    }
    if shared() != 0 {
        return Err(last_os_error(format!("making {NETNS_RUN_DIR} shared")));
    }
    Ok(())
}
