//! `ebpf-overlay`: the CNI plugin binary (see the `overlay_cni` library).

use std::io::{Read as _, Write as _};

fn main() {
    // Run by hand (no CNI_COMMAND): say what this is, as the reference plugins do.
    if std::env::var_os("CNI_COMMAND").is_none() {
        eprint!("{}", overlay_cni::spec::about(env!("CARGO_PKG_VERSION")));
        return;
    }
    let vars = std::env::vars_os().filter_map(|(k, v)| {
        let k = k.into_string().ok()?;
        k.starts_with("CNI_").then(|| (k, v.into_string().ok()))
    });
    let mut stdin = Vec::new();
    let out = match overlay_cni::spec::Env::from_vars(vars) {
        Err(e) => {
            let _ = std::io::stdin().read_to_end(&mut stdin);
            overlay_cni::Output {
                stdout: e.to_json(&overlay_cni::spec::answer_version(&stdin)),
                code: 1,
            }
        }
        Ok(env) => {
            // VERSION may come without a config; everything else reads one.
            if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
                let e = overlay_cni::spec::CniError::new(
                    overlay_cni::spec::code::IO,
                    format!("reading the network configuration: {e}"),
                );
                overlay_cni::Output {
                    stdout: e.to_json(overlay_cni::spec::LATEST),
                    code: 1,
                }
            } else {
                overlay_cni::run(&overlay_cni::System, &env, &stdin)
            }
        }
    };
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(out.stdout.as_bytes());
    if !out.stdout.is_empty() {
        let _ = so.write_all(b"\n");
    }
    let _ = so.flush();
    std::process::exit(out.code);
}
