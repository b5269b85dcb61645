//! Records the git revision the binaries are built from (`--version`, `*_build_info`).
//! `OVERLAY_GIT_REVISION` in the environment wins (package builds from a tarball).
//!
//! The revision is read from the repository's files (HEAD -> ref -> loose ref or packed-refs),
//! not by running `git`: product crates spawn no processes, their build scripts included, and a
//! build host needs no git.

use std::fs;
use std::path::{Path, PathBuf};

/// Where a checkout keeps HEAD (`git_dir`) and the refs (`common_dir`): the same directory for a
/// plain clone; for a worktree, `.git` is a file naming its own directory, whose `commondir`
/// points at the main repository's.
struct GitDirs {
    git_dir: PathBuf,
    common_dir: PathBuf,
}

fn find_git_dirs(start: &Path) -> Option<GitDirs> {
    let dot_git = start
        .ancestors()
        .map(|dir| dir.join(".git"))
        .find(|p| p.exists())?;
    let git_dir = if dot_git.is_file() {
        let text = fs::read_to_string(&dot_git).ok()?;
        let target = PathBuf::from(text.trim().strip_prefix("gitdir:")?.trim());
        if target.is_absolute() {
            target
        } else {
            dot_git.parent()?.join(target)
        }
    } else {
        dot_git
    };
    let common_dir = match fs::read_to_string(git_dir.join("commondir")) {
        Ok(text) => git_dir.join(text.trim()),
        Err(_) => git_dir.clone(),
    };
    Some(GitDirs {
        git_dir,
        common_dir,
    })
}

fn is_object_id(s: &str) -> bool {
    s.len() >= 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit HEAD names, and tells cargo which files a new commit or checkout changes.
fn head_revision(dirs: &GitDirs) -> Option<String> {
    let head_path = dirs.git_dir.join("HEAD");
    println!("cargo:rerun-if-changed={}", head_path.display());
    let head = fs::read_to_string(&head_path).ok()?;
    let head = head.trim();
    let Some(name) = head.strip_prefix("ref:").map(str::trim) else {
        // Detached HEAD: the object id itself.
        return is_object_id(head).then(|| head.to_owned());
    };
    // A branch's loose ref lives with the refs (per-worktree refs such as `refs/bisect` beside
    // HEAD); a packed one in packed-refs. Watch both: a commit rewrites the loose file, `git gc`
    // moves it into packed-refs.
    let packed = dirs.common_dir.join("packed-refs");
    if packed.exists() {
        println!("cargo:rerun-if-changed={}", packed.display());
    }
    for dir in [&dirs.git_dir, &dirs.common_dir] {
        let loose = dir.join(name);
        if loose.exists() {
            println!("cargo:rerun-if-changed={}", loose.display());
            let id = fs::read_to_string(&loose).ok()?;
            let id = id.trim();
            return is_object_id(id).then(|| id.to_owned());
        }
    }
    // Not loose (yet): the first commit on a packed branch creates the file, which changes the
    // directory it lands in.
    if let Some(parent) = dirs.common_dir.join(name).parent().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", parent.display());
    }
    let packed = fs::read_to_string(&packed).ok()?;
    packed.lines().find_map(|line| {
        let (id, ref_name) = line.split_once(' ')?;
        (ref_name.trim() == name && is_object_id(id)).then(|| id.to_owned())
    })
}

fn main() {
    println!("cargo:rerun-if-env-changed=OVERLAY_GIT_REVISION");
    let from_env = std::env::var("OVERLAY_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty());
    let revision = from_env
        .or_else(|| {
            let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
            let dirs = find_git_dirs(Path::new(&manifest_dir))?;
            let id = head_revision(&dirs)?;
            Some(id[..12].to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=OVERLAY_GIT_REVISION={revision}");
}
