//! Validation of a complete network configuration (after default VNIs are assigned).
//! Every error names the field and its value, so a user can find the line to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_api::{
    NetworkConfig, OverlayInfo,
    subnets::{MAX_AGENT_PREFIX4, MAX_AGENT_PREFIX6},
};

use crate::config::{MAX_NETWORK_ID, MAX_VNI};
use overlay_api::SHARED_VNI;

/// Longest network name: Linux device names have 15 characters and the bridges are
/// `m-<name>` / `d-<name>`.
pub const MAX_NAME_LEN: usize = 13;
pub const RESERVED_NAMES: [&str; 4] = ["host", "bridge", "default", "none"];
/// Smallest MTU an IPv4 host must accept, plus room for the VXLAN header.
pub const MIN_MTU: u32 = 552;
pub const MAX_MTU: u32 = 65535;
/// VTEP subnets may not be shorter than this (DC/OS's rule: the MAC carries 24 bits of the IP).
pub const MIN_VTEP_PREFIX: u8 = 8;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.reason)
    }
}

/// Every broken rule of one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<FieldError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "invalid overlay configuration: {}", parts.join("; "))
    }
}

impl ConfigError {
    pub fn single(
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError(vec![FieldError {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }])
    }
}

struct Collector(Vec<FieldError>);

impl Collector {
    fn fail(
        &mut self,
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) {
        self.0.push(FieldError {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        });
    }
}

/// Checks every rule; returns all violations at once.
pub fn validate(config: &NetworkConfig) -> Result<(), ConfigError> {
    let mut errors = Collector(Vec::new());
    validate_vtep(config, &mut errors);
    if config.overlays.is_empty() {
        errors.fail("overlays", "[]", "at least one overlay network is required");
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut vnis: BTreeMap<u32, usize> = BTreeMap::new();
    let mut ids: BTreeMap<u32, usize> = BTreeMap::new();
    for (index, overlay) in config.overlays.iter().enumerate() {
        validate_overlay(index, overlay, &mut errors);
        if let Some(first) = names.insert(&overlay.name, index) {
            errors.fail(
                format!("overlays[{index}].name ({})", overlay.name),
                &overlay.name,
                format!("duplicate network name (also overlays[{first}])"),
            );
        }
        // Networks share VNI 1024 by default (isolation comes from the addresses); a VNI of
        // its own is one network's alone.
        if let Some(vni) = overlay.vni.filter(|&v| v != SHARED_VNI)
            && let Some(first) = vnis.insert(vni, index)
        {
            errors.fail(
                format!("overlays[{index}].vni ({})", overlay.name),
                vni,
                format!(
                    "duplicate VNI (also overlays[{first}], {}): a network's own VNI is its \
                     alone (leave `vni` out to share {SHARED_VNI})",
                    config.overlays[first].name
                ),
            );
        }
        if let Some(id) = overlay.id
            && let Some(first) = ids.insert(id, index)
        {
            errors.fail(
                format!("overlays[{index}].id ({})", overlay.name),
                id,
                format!(
                    "duplicate network id (also overlays[{first}], {})",
                    config.overlays[first].name
                ),
            );
        }
    }
    validate_overlaps(config, &mut errors);
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(errors.0))
    }
}

fn validate_vtep(config: &NetworkConfig, errors: &mut Collector) {
    let subnet = config.vtep_subnet;
    if subnet.prefix() < MIN_VTEP_PREFIX {
        errors.fail(
            "vtep_subnet",
            subnet,
            format!("must not be shorter than /{MIN_VTEP_PREFIX}"),
        );
    } else if subnet.prefix() > 30 {
        errors.fail(
            "vtep_subnet",
            subnet,
            "must be /30 or shorter to hold any VTEP address",
        );
    }
    if subnet.network() != subnet.ip() {
        errors.fail(
            "vtep_subnet",
            subnet,
            format!("host bits set (network is {})", subnet.network()),
        );
    }
    if let Some(subnet6) = config.vtep_subnet6 {
        if subnet6.prefix() < MIN_VTEP_PREFIX {
            errors.fail(
                "vtep_subnet6",
                subnet6,
                format!("must not be shorter than /{MIN_VTEP_PREFIX}"),
            );
        } else if subnet6.prefix() > 127 {
            errors.fail(
                "vtep_subnet6",
                subnet6,
                "must be /127 or shorter to hold any VTEP address",
            );
        }
        if subnet6.network() != subnet6.ip() {
            errors.fail(
                "vtep_subnet6",
                subnet6,
                format!("host bits set (network is {})", subnet6.network()),
            );
        }
    }
    let oui = config.vtep_mac_oui.mac().0;
    if oui[3..] != [0, 0, 0] {
        errors.fail(
            "vtep_mac_oui",
            &config.vtep_mac_oui,
            "the lower three bytes must be zero",
        );
    }
    if oui[0] & 1 != 0 {
        errors.fail(
            "vtep_mac_oui",
            &config.vtep_mac_oui,
            "must be a unicast OUI (lowest bit of the first byte clear)",
        );
    }
    if let Some(mtu) = config.vtep_mtu
        && !(MIN_MTU..=MAX_MTU).contains(&mtu)
    {
        errors.fail(
            "vtep_mtu",
            mtu,
            format!("must be between {MIN_MTU} and {MAX_MTU}"),
        );
    }
    if config.vxlan_port == 0 {
        errors.fail("vxlan_port", 0, "must be a UDP port (1-65535)");
    }
}

/// A name usable inside a Linux device name (`m-<name>`): no '/', ':', whitespace or NUL.
fn is_device_name_safe(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Checks one network on its own (the rules that do not involve other networks).
pub fn validate_overlay_alone(index: usize, overlay: &OverlayInfo) -> Result<(), ConfigError> {
    let mut errors = Collector(Vec::new());
    validate_overlay(index, overlay, &mut errors);
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(errors.0))
    }
}

fn validate_overlay(index: usize, overlay: &OverlayInfo, errors: &mut Collector) {
    // The network's name beside its place: an API caller never sees the list's indices.
    let field = |name: &str| format!("overlays[{index}].{name} ({})", overlay.name);
    let name = &overlay.name;
    if name.is_empty() {
        errors.fail(field("name"), "\"\"", "must not be empty");
    } else if name.len() > MAX_NAME_LEN {
        errors.fail(
            field("name"),
            name,
            format!("longer than {MAX_NAME_LEN} characters"),
        );
    } else if !is_device_name_safe(name) {
        errors.fail(field("name"), name, "only letters, digits, '-', '_' and '.' are allowed (it becomes part of a Linux device name)");
    }
    if RESERVED_NAMES.contains(&name.as_str()) {
        errors.fail(
            field("name"),
            name,
            format!("reserved name (reserved: {})", RESERVED_NAMES.join(", ")),
        );
    }
    if overlay.subnet.is_none() && overlay.subnet6.is_none() {
        errors.fail(
            field("subnet"),
            "null",
            "a network needs `subnet` and/or `subnet6`",
        );
    }
    match (overlay.subnet, overlay.prefix) {
        (Some(subnet), Some(prefix)) => {
            if subnet.network() != subnet.ip() {
                errors.fail(
                    field("subnet"),
                    subnet,
                    format!("host bits set (network is {})", subnet.network()),
                );
            }
            if prefix < subnet.prefix() || prefix > 32 {
                errors.fail(
                    field("prefix"),
                    prefix,
                    format!(
                        "does not fit subnet {subnet} (must be /{} to /32)",
                        subnet.prefix()
                    ),
                );
            } else if prefix > MAX_AGENT_PREFIX4 {
                // Each half (/prefix+1) needs a gateway and at least one container address
                // besides its network and broadcast addresses.
                errors.fail(field("prefix"), prefix, format!("each half (/prefix+1) would have no usable container address; use /{MAX_AGENT_PREFIX4} or shorter"));
            }
        }
        (Some(_), None) => errors.fail(field("prefix"), "null", "required with `subnet`"),
        (None, Some(prefix)) => errors.fail(field("prefix"), prefix, "given without `subnet`"),
        (None, None) => {}
    }
    match (overlay.subnet6, overlay.prefix6) {
        (Some(subnet6), Some(prefix6)) => {
            if subnet6.network() != subnet6.ip() {
                errors.fail(
                    field("subnet6"),
                    subnet6,
                    format!("host bits set (network is {})", subnet6.network()),
                );
            }
            if prefix6 < subnet6.prefix() || prefix6 > 128 {
                errors.fail(
                    field("prefix6"),
                    prefix6,
                    format!(
                        "does not fit subnet6 {subnet6} (must be /{} to /128)",
                        subnet6.prefix()
                    ),
                );
            } else if prefix6 > MAX_AGENT_PREFIX6 {
                errors.fail(field("prefix6"), prefix6, format!("each half (/prefix6+1) would have no usable container address; use /{MAX_AGENT_PREFIX6} or shorter"));
            }
        }
        (Some(_), None) => errors.fail(field("prefix6"), "null", "required with `subnet6`"),
        (None, Some(prefix6)) => errors.fail(field("prefix6"), prefix6, "given without `subnet6`"),
        (None, None) => {}
    }
    if let Some(id) = overlay.id
        && !(1..=MAX_NETWORK_ID).contains(&id)
    {
        errors.fail(
            field("id"),
            id,
            format!("must be between 1 and {MAX_NETWORK_ID}"),
        );
    }
    if let Some(vni) = overlay.vni
        && !(1..=MAX_VNI).contains(&vni)
    {
        errors.fail(
            field("vni"),
            vni,
            format!("must be between 1 and {MAX_VNI} (24 bits)"),
        );
    }
}

fn overlaps4(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

fn overlaps6(a: Ipv6Network, b: Ipv6Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

fn validate_overlaps(config: &NetworkConfig, errors: &mut Collector) {
    let mut v4: Vec<(String, Ipv4Network)> = vec![("vtep_subnet".into(), config.vtep_subnet)];
    let mut v6: Vec<(String, Ipv6Network)> = Vec::new();
    if let Some(subnet6) = config.vtep_subnet6 {
        v6.push(("vtep_subnet6".into(), subnet6));
    }
    for (index, overlay) in config.overlays.iter().enumerate() {
        if let Some(subnet) = overlay.subnet {
            v4.push((
                format!("overlays[{index}].subnet ({})", overlay.name),
                subnet,
            ));
        }
        if let Some(subnet6) = overlay.subnet6 {
            v6.push((
                format!("overlays[{index}].subnet6 ({})", overlay.name),
                subnet6,
            ));
        }
    }
    // A handful of networks: the pairwise check is cheap.
    for (i, (field, subnet)) in v4.iter().enumerate() {
        for (other_field, other) in &v4[..i] {
            if overlaps4(*subnet, *other) {
                errors.fail(field, subnet, format!("overlaps {other_field} = {other}"));
            }
        }
    }
    for (i, (field, subnet)) in v6.iter().enumerate() {
        for (other_field, other) in &v6[..i] {
            if overlaps6(*subnet, *other) {
                errors.fail(field, subnet, format!("overlaps {other_field} = {other}"));
            }
        }
    }
}

/// An address the overlay must never contain: an agent's underlay address or the master's.
/// A network holding one would make agents route that host into the overlay (and put the
/// master's address on their host link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedAddress {
    pub ip: IpAddr,
    /// Whose it is, for the error ("agent 10.0.0.1's underlay address").
    pub owner: String,
}

/// The address subnets of a configuration, as (field, subnet): the VTEP subnets (with
/// `vtep`) and every network's `subnet`/`subnet6`, restricted to the networks `only` names
/// (all when `None`).
fn address_fields(
    config: &NetworkConfig,
    only: Option<&std::collections::BTreeSet<String>>,
    vtep: bool,
) -> Vec<(String, IpNetwork)> {
    let mut fields = Vec::new();
    if vtep {
        fields.push(("vtep_subnet".to_owned(), IpNetwork::V4(config.vtep_subnet)));
        if let Some(subnet6) = config.vtep_subnet6 {
            fields.push(("vtep_subnet6".into(), IpNetwork::V6(subnet6)));
        }
    }
    for (index, overlay) in config.overlays.iter().enumerate() {
        if only.is_some_and(|names| !names.contains(&overlay.name)) {
            continue;
        }
        if let Some(subnet) = overlay.subnet {
            fields.push((
                format!("overlays[{index}].subnet ({})", overlay.name),
                IpNetwork::V4(subnet),
            ));
        }
        if let Some(subnet6) = overlay.subnet6 {
            fields.push((
                format!("overlays[{index}].subnet6 ({})", overlay.name),
                IpNetwork::V6(subnet6),
            ));
        }
    }
    fields
}

/// Refuses a configuration whose networks (those named in `only`, or all) or, with `vtep`,
/// VTEP subnets contain a reserved address; every clash is named (field, subnet, address,
/// owner).
pub fn check_reserved_addresses(
    config: &NetworkConfig,
    only: Option<&std::collections::BTreeSet<String>>,
    vtep: bool,
    reserved: &[ReservedAddress],
) -> Result<(), ConfigError> {
    let mut errors = Collector(Vec::new());
    for (field, subnet) in address_fields(config, only, vtep) {
        for address in reserved.iter().filter(|r| subnet.contains(r.ip)) {
            errors.fail(
                &field,
                subnet,
                format!(
                    "contains {} {}: an overlay must not overlap the underlay",
                    address.owner, address.ip
                ),
            );
        }
    }
    if errors.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigError(errors.0))
    }
}

/// Why `ip` cannot be an agent's underlay address under this configuration: the field whose
/// subnet contains it.
pub fn check_agent_address(config: &NetworkConfig, ip: IpAddr) -> Result<(), ConfigError> {
    match address_fields(config, None, true)
        .into_iter()
        .find(|(_, subnet)| subnet.contains(ip))
    {
        Some((field, subnet)) => Err(ConfigError::single(
            "ip",
            ip,
            format!(
                "inside {field} = {subnet}: an agent's underlay address must not be an overlay \
                 or VTEP address"
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{assign_network_ids, dcos_default};

    fn default_config() -> NetworkConfig {
        let mut config = dcos_default();
        assign_network_ids(&mut config.overlays);
        config
    }

    /// Asserts that validation fails with an error on `field` whose text mentions `value`.
    fn assert_rejected(config: &NetworkConfig, field: &str, value: &str) {
        let err = validate(config).expect_err("configuration should be rejected");
        let text = err.to_string();
        assert!(
            err.0.iter().any(
                |e| (e.field == field || e.field.starts_with(&format!("{field} (")))
                    && e.value.contains(value)
            ),
            "expected an error on {field} = {value}, got: {text}"
        );
        assert!(text.contains(field) && text.contains(value), "{text}");
    }

    #[test]
    fn dcos_default_is_valid() {
        validate(&default_config()).unwrap();
    }

    #[test]
    fn rejects_bad_names() {
        let mut config = default_config();
        config.overlays[0].name = "fourteen-chars".into();
        assert_rejected(&config, "overlays[0].name", "fourteen-chars");
        config.overlays[0].name = "a/b".into();
        assert_rejected(&config, "overlays[0].name", "a/b");
        config.overlays[0].name = "with space".into();
        assert_rejected(&config, "overlays[0].name", "with space");
        config.overlays[0].name = "".into();
        assert_rejected(&config, "overlays[0].name", "\"\"");
        for reserved in RESERVED_NAMES {
            config.overlays[0].name = reserved.into();
            assert_rejected(&config, "overlays[0].name", reserved);
        }
        config.overlays[0].name = "thirteen-char".into();
        validate(&config).unwrap();
    }

    #[test]
    fn rejects_duplicate_names_and_vnis() {
        let mut config = default_config();
        let mut copy = config.overlays[0].clone();
        copy.subnet = Some("10.0.0.0/8".parse().unwrap());
        copy.vni = Some(5000);
        config.overlays.push(copy);
        assert_rejected(&config, "overlays[2].name", "dcos");

        // Sharing 1024 is the default, saying so is allowed; a network's own VNI is its alone.
        let mut config = default_config();
        config.overlays[1].vni = Some(1024);
        validate(&config).unwrap();
        config.overlays[0].vni = Some(5000);
        config.overlays[1].vni = Some(5000);
        assert_rejected(&config, "overlays[1].vni", "5000");

        // Network ids (the master's own) never repeat.
        let mut config = default_config();
        config.overlays[1].id = config.overlays[0].id;
        assert_rejected(&config, "overlays[1].id", "1024");
    }

    #[test]
    fn rejects_vni_outside_24_bits() {
        let mut config = default_config();
        config.overlays[0].vni = Some(1 << 24);
        assert_rejected(&config, "overlays[0].vni", "16777216");
        config.overlays[0].vni = Some(0);
        assert_rejected(&config, "overlays[0].vni", "0");
    }

    #[test]
    fn rejects_overlapping_subnets() {
        let mut config = default_config();
        config.overlays[0].subnet = Some("44.0.0.0/8".parse().unwrap());
        assert_rejected(&config, "overlays[0].subnet", "44.0.0.0/8");

        let mut config = default_config();
        config.overlays[1].subnet6 = Some("fd01:a::/48".parse().unwrap());
        assert_rejected(&config, "overlays[1].subnet6", "fd01:a::/48");

        let mut config = default_config();
        let mut other = config.overlays[0].clone();
        other.name = "other".into();
        other.id = None;
        other.subnet = Some("9.1.0.0/16".parse().unwrap());
        config.overlays.push(other);
        assign_network_ids(&mut config.overlays);
        assert_rejected(&config, "overlays[2].subnet", "9.1.0.0/16");
    }

    #[test]
    fn rejects_prefixes_that_do_not_fit() {
        let mut config = default_config();
        config.overlays[0].prefix = Some(7);
        assert_rejected(&config, "overlays[0].prefix", "7");
        config.overlays[0].prefix = Some(30);
        assert_rejected(&config, "overlays[0].prefix", "30");
        config.overlays[0].prefix = Some(29);
        validate(&config).unwrap();
        config.overlays[0].prefix = None;
        assert_rejected(&config, "overlays[0].prefix", "null");

        let mut config = default_config();
        config.overlays[1].prefix6 = Some(63);
        assert_rejected(&config, "overlays[1].prefix6", "63");
        config.overlays[1].prefix6 = Some(126);
        assert_rejected(&config, "overlays[1].prefix6", "126");
    }

    #[test]
    fn rejects_bad_vtep_settings() {
        let mut config = default_config();
        config.vtep_mac_oui = "70:b3:d5:00:00:01".parse().unwrap();
        assert_rejected(&config, "vtep_mac_oui", "70:b3:d5:00:00:01");

        let mut config = default_config();
        config.vtep_subnet = "44.0.0.0/7".parse().unwrap();
        assert_rejected(&config, "vtep_subnet", "44.0.0.0/7");

        let mut config = default_config();
        config.vtep_mtu = Some(551);
        assert_rejected(&config, "vtep_mtu", "551");
        config.vtep_mtu = Some(552);
        validate(&config).unwrap();
    }

    proptest::proptest! {
        /// A network is refused exactly when it contains a reserved address, and the error
        /// names that address; an agent address is refused exactly when some subnet holds it.
        #[test]
        fn reserved_addresses_are_refused_exactly_when_contained(
            base in 0u32..=u32::MAX, prefix in 8u8..=30, probes in proptest::collection::vec(0u32..=u32::MAX, 1..8)
        ) {
            let subnet = Ipv4Network::new(std::net::Ipv4Addr::from(base), prefix).unwrap();
            let subnet = Ipv4Network::new(subnet.network(), prefix).unwrap();
            let mut config = default_config();
            config.overlays[0].subnet = Some(subnet);
            config.overlays[0].prefix = Some(prefix.max(24).min(30));
            // Probes inside and outside the subnet.
            let mut reserved: Vec<ReservedAddress> = probes
                .iter()
                .map(|p| ReservedAddress { ip: IpAddr::V4((*p).into()), owner: "agent".into() })
                .collect();
            reserved.push(ReservedAddress {
                ip: IpAddr::V4(subnet.nth(1).unwrap_or(subnet.network())),
                owner: "agent".into(),
            });
            let only: std::collections::BTreeSet<String> = ["dcos".to_owned()].into();
            let inside: Vec<&ReservedAddress> = reserved
                .iter()
                .filter(|r| IpNetwork::V4(subnet).contains(r.ip))
                .collect();
            match check_reserved_addresses(&config, Some(&only), false, &reserved) {
                Ok(()) => proptest::prop_assert!(inside.is_empty()),
                Err(e) => {
                    proptest::prop_assert_eq!(e.0.len(), inside.len());
                    for r in inside {
                        proptest::prop_assert!(e.to_string().contains(&r.ip.to_string()));
                    }
                }
            }
            for r in &reserved {
                let held = IpNetwork::V4(subnet).contains(r.ip)
                    || IpNetwork::V4(config.vtep_subnet).contains(r.ip);
                proptest::prop_assert_eq!(check_agent_address(&config, r.ip).is_err(), held);
            }
        }
    }

    #[test]
    fn rejects_network_without_subnet_and_empty_overlays() {
        let mut config = default_config();
        config.overlays[0].subnet = None;
        config.overlays[0].prefix = None;
        assert_rejected(&config, "overlays[0].subnet", "null");

        let mut config = default_config();
        config.overlays.clear();
        assert_rejected(&config, "overlays", "[]");
    }
}
