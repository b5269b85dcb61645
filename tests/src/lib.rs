//! Helpers shared by the integration tests: locating the project's binaries.

use std::path::PathBuf;

/// Path of one of the workspace's binaries (`overlay-master`, `overlay-agent`, ...), built into the
/// same target directory as the running test executable.
///
/// The test command (`cargo xtask test`) builds every binary before running the tests.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found: build it first (`cargo build --bins`, done by `cargo xtask test`)",
        path.display()
    );
    path
}
