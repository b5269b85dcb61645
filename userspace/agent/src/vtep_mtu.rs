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

/// `Err` when an overlay MTU of `agent_mtu` (`--mtu`, or the master's `vtep_mtu`, which must
/// equal it) leaves no room for VXLAN's headers on the underlay link: 50 bytes over IPv4, 70 over
/// IPv6. VTEPs must not fragment (RFC 7348), so such an MTU would drop every full-sized packet.
pub fn check_underlay(
    agent_mtu: u32,
    underlay_mtu: u32,
    ipv6_underlay: bool,
) -> Result<(), String> {
    let overhead = overlay_common::underlay6::mtu_overhead(ipv6_underlay);
    let family = if ipv6_underlay { "IPv6" } else { "IPv4" };
    if agent_mtu + overhead > underlay_mtu {
        return Err(format!(
            "--mtu {agent_mtu} leaves no room for VXLAN over the {family} underlay: {agent_mtu} + \
             {overhead} bytes of outer headers exceed the underlay interface's MTU {underlay_mtu}; \
             use --mtu {} or less (and the same vtep_mtu on the master)",
            underlay_mtu.saturating_sub(overhead)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_underlay_mtu_leaves_room_for_the_family_s_headers() {
        assert!(check_underlay(1450, 1500, false).is_ok());
        assert!(check_underlay(1430, 1500, true).is_ok());
        let error = check_underlay(1450, 1500, true).unwrap_err();
        assert!(
            error.contains("--mtu 1450")
                && error.contains("IPv6")
                && error.contains("70")
                && error.contains("--mtu 1430"),
            "{error}"
        );
        assert!(
            check_underlay(1451, 1500, false)
                .unwrap_err()
                .contains("--mtu 1450")
        );
    }

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
