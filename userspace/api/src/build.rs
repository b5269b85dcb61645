//! What a binary was built from, for `--version` and the `*_build_info` metrics.

use std::sync::OnceLock;

/// Package version (Cargo.toml).
pub const PKG_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git revision of the tree built (`unknown` outside a git checkout).
pub const GIT_REVISION: &str = env!("OVERLAY_GIT_REVISION");
/// Layout version of the pinned maps (part of every pin path).
pub const MAP_LAYOUT_VERSION: u32 = overlay_common::maps::MAP_LAYOUT_VERSION;

/// `0.1.0 (git 1a2b3c4d5e6f, map layout v2)`: the `--version` of every binary.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        format!("{PKG_VERSION} (git {GIT_REVISION}, map layout v{MAP_LAYOUT_VERSION})")
    })
}

/// A Prometheus `<prefix>_build_info` gauge (always 1; the facts are labels).
pub fn build_info_metric(prefix: &str) -> String {
    format!(
        "# HELP {prefix}_build_info Version, git revision and map layout of this binary.\n\
         # TYPE {prefix}_build_info gauge\n\
         {prefix}_build_info{{version=\"{PKG_VERSION}\",git_revision=\"{GIT_REVISION}\",map_layout=\"{MAP_LAYOUT_VERSION}\"}} 1\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_names_revision_and_layout() {
        let v = super::version();
        assert!(
            v.contains(super::GIT_REVISION) && v.contains("map layout v"),
            "{v}"
        );
        assert!(super::build_info_metric("x").contains("x_build_info{version="));
    }
}
