//! The master's `vtep_mtu` against the agent's `--mtu`. Both name the largest inner packet the
//! VTEP carries; an agent with another value would build packets its peers' containers cannot
//! take (or drop theirs as too big). The agent has set up its host link and datapath with its
//! own value before it hears from the master, so a conflict is refused, naming both, rather
//! than half-applied.

use overlay_api::AgentInfo;

/// Exit status of an agent refusing the master's settings (as the preflight's: the unit does
/// not restart on it, since only the operator can fix it).
pub const EXIT_CONFLICT: i32 = 3;

/// `Err` naming both values when the master sets a `vtep_mtu` other than `agent_mtu`.
pub fn check(agent_mtu: u32, me: &AgentInfo) -> Result<(), String> {
    let master_mtu = me.overlays.iter().find_map(|o| o.backend.vxlan.vtep_mtu);
    match master_mtu {
        Some(master_mtu) if master_mtu != agent_mtu => Err(format!(
            "--mtu {agent_mtu} conflicts with the master's vtep_mtu {master_mtu}: start the agent \
             with --mtu {master_mtu}, or change vtep_mtu in the master's configuration"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_with(vtep_mtu: Option<u32>) -> AgentInfo {
        let json = serde_json::json!({
            "ip": "10.0.0.1",
            "overlays": [{
                "info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24},
                "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_mtu": vtep_mtu}}
            }]
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_conflicting_vtep_mtu_is_refused_naming_both() {
        let error = check(1420, &agent_with(Some(1400))).unwrap_err();
        assert!(
            error.contains("--mtu 1420") && error.contains("vtep_mtu 1400"),
            "{error}"
        );
        assert!(check(1400, &agent_with(Some(1400))).is_ok());
        assert!(check(1420, &agent_with(None)).is_ok());
    }
}
