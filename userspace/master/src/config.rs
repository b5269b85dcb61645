//! The master's configuration: DC/OS's `dcos_overlay_network` object (YAML or JSON, at top level
//! or nested under a `dcos_overlay_network` key), DC/OS's defaults, and default VNIs.

use std::collections::BTreeSet;
use std::path::Path;

use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_api::{DEFAULT_VXLAN_PORT, MacAddr, MacOui, NetworkConfig, OverlayInfo};
use serde::Deserialize;

/// Network id of the network named `dcos` (the number its VNI used to be, so that counters and
/// pinned endpoints read the same).
pub const DCOS_NETWORK_ID: u32 = 1024;
/// Network ids of other networks are derived from their names within [FIRST, MAX_NETWORK_ID].
const HASHED_ID_FIRST: u32 = 4096;
pub const MAX_NETWORK_ID: u32 = (1 << 24) - 1;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Key under which a DC/OS `config.yaml` nests the object.
const NESTING_KEY: &str = "dcos_overlay_network";

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
}

/// The object as written in a file: every field optional so DC/OS's defaults can fill gaps;
/// unknown fields are refused so typos do not pass silently.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    // Addresses are read as text and parsed here, so errors can name the field.
    vtep_subnet: Option<String>,
    vtep_subnet6: Option<String>,
    vtep_mac_oui: Option<String>,
    #[serde(default, deserialize_with = "lenient::vtep_mtu")]
    vtep_mtu: Option<u32>,
    #[serde(default, deserialize_with = "lenient::vxlan_port")]
    vxlan_port: Option<u16>,
    overlays: Option<Vec<OverlaySpec>>,
}

/// DC/OS's overlay master module configuration (`master.json`, a `MasterConfig`): the
/// network is read; the replicated-log settings belong to DC/OS's own store and are
/// ignored here (this master's store is `--data-dir` or `--store`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterConfigFile {
    network: serde_norway::Value,
    #[serde(default)]
    zk: Option<serde_norway::Value>,
    #[serde(default)]
    replicated_log_dir: Option<String>,
    #[serde(default)]
    replicated_log_timeout: Option<String>,
}

/// Numbers and booleans as stout's protobuf parser takes them: JSON numbers or strings
/// (`"prefix": "24"`, `"enabled": "false"`), which DC/OS's templates produce.
mod lenient {
    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrText {
        Bool(bool),
        Text(String),
    }

    /// Field-named readers (serde's path stops at the enclosing object).
    macro_rules! named {
        ($($name:ident: $kind:ident -> $ty:ty;)*) => {$(
            pub fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
                $kind(d, stringify!($name))
            }
        )*};
    }
    named! {
        vtep_mtu: number -> u32;
        vxlan_port: number -> u16;
        prefix: number -> u8;
        prefix6: number -> u8;
        vni: number -> u32;
        enabled: boolean -> bool;
        masquerade: boolean -> bool;
    }

    fn number<'de, D, T>(deserializer: D, field: &str) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let value = match Option::<NumberOrText>::deserialize(deserializer)? {
            None => return Ok(None),
            Some(NumberOrText::Number(n)) => n,
            Some(NumberOrText::Text(text)) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| D::Error::custom(format!("{field} = {text:?}: not a number")))?,
        };
        T::try_from(value)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{field} = {value}: out of range")))
    }

    fn boolean<'de, D>(deserializer: D, field: &str) -> Result<Option<bool>, D::Error>
    where
        D: Deserializer<'de>,
    {
        match Option::<BoolOrText>::deserialize(deserializer)? {
            None => Ok(None),
            Some(BoolOrText::Bool(b)) => Ok(Some(b)),
            Some(BoolOrText::Text(text)) => match text.trim() {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                _ => Err(D::Error::custom(format!(
                    "{field} = {text:?}: not true or false"
                ))),
            },
        }
    }
}

/// One network as written by a user (config file or `POST /overlay-master/networks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    pub name: String,
    pub subnet: Option<String>,
    #[serde(default, deserialize_with = "lenient::prefix")]
    pub prefix: Option<u8>,
    pub subnet6: Option<String>,
    #[serde(default, deserialize_with = "lenient::prefix6")]
    pub prefix6: Option<u8>,
    #[serde(default, deserialize_with = "lenient::enabled")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "lenient::vni")]
    pub vni: Option<u32>,
    #[serde(default, deserialize_with = "lenient::masquerade")]
    pub masquerade: Option<bool>,
}

/// Parses an optional address field, naming it in the error.
fn parse_field<T: std::str::FromStr>(
    field: &str,
    value: Option<&str>,
    what: &str,
) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    value
        .map(|text| {
            text.trim()
                .parse()
                .map_err(|e| format!("{field} = {text:?}: not a valid {what} ({e})"))
        })
        .transpose()
}

impl OverlaySpec {
    /// Converts to the wire type; `field` prefixes error messages (`overlays[2]`).
    pub fn into_overlay(self, field: &str) -> Result<OverlayInfo, String> {
        let dot = if field.is_empty() { "" } else { "." };
        Ok(OverlayInfo {
            subnet: parse_field(
                &format!("{field}{dot}subnet"),
                self.subnet.as_deref(),
                "IPv4 network",
            )?,
            subnet6: parse_field(
                &format!("{field}{dot}subnet6"),
                self.subnet6.as_deref(),
                "IPv6 network",
            )?,
            name: self.name,
            prefix: self.prefix,
            prefix6: self.prefix6,
            enabled: self.enabled,
            id: None,
            vni: self.vni,
            masquerade: self.masquerade,
        })
    }
}

#[derive(Debug, Deserialize)]
struct Nested {
    dcos_overlay_network: serde_norway::Value,
}

/// DC/OS's default `dcos_overlay_network` (before default VNIs are assigned).
pub fn dcos_default() -> NetworkConfig {
    NetworkConfig {
        vtep_subnet: "44.128.0.0/20".parse().expect("valid literal"),
        vtep_subnet6: Some("fd01:a::/64".parse().expect("valid literal")),
        vtep_mac_oui: MacAddr([0x70, 0xb3, 0xd5, 0, 0, 0]).into(),
        vtep_mtu: None,
        overlays: vec![
            OverlayInfo {
                name: "dcos".into(),
                subnet: Some("9.0.0.0/8".parse().expect("valid literal")),
                prefix: Some(24),
                subnet6: None,
                prefix6: None,
                enabled: None,
                id: None,
                vni: None,
                masquerade: None,
            },
            OverlayInfo {
                name: "dcos6".into(),
                subnet: None,
                prefix: None,
                subnet6: Some("fd01:b::/64".parse().expect("valid literal")),
                prefix6: Some(80),
                enabled: None,
                id: None,
                vni: None,
                masquerade: None,
            },
        ],
        vxlan_port: DEFAULT_VXLAN_PORT,
    }
}

/// Reads and parses a config file (no validation, no default VNIs yet).
pub fn load_file(path: &Path) -> Result<NetworkConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigFileError::Parse {
        path: path.display().to_string(),
        message,
    })
}

/// Parses the object from YAML or JSON text; the error names the offending field. Also
/// takes DC/OS's `master.json` (`{"replicated_log_dir": ..., "network": {...}}`).
pub fn parse(text: &str) -> Result<NetworkConfig, String> {
    let document: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let file: FileConfig = match (document.get(NESTING_KEY), document.get("network")) {
        (None, Some(_)) => {
            let master: MasterConfigFile = serde_norway::from_value(document.clone())
                .map_err(|e| format!("DC/OS master.json: {e}"))?;
            if master.replicated_log_dir.is_some()
                || master.zk.is_some()
                || master.replicated_log_timeout.is_some()
            {
                tracing::info!(
                    "DC/OS master.json: replicated_log_dir, zk and replicated_log_timeout are \
                     DC/OS's own store settings and are ignored (import DC/OS's state with \
                     --import-dcos-state)"
                );
            }
            serde_norway::from_value(master.network).map_err(|e| format!("network: {e}"))?
        }
        (None, None) => serde_norway::from_str(text).map_err(|e| e.to_string())?,
        (Some(_), _) => {
            let nested: Nested = serde_norway::from_str(text).map_err(|e| e.to_string())?;
            match nested.dcos_overlay_network {
                // DC/OS configs often carry the object as a JSON string.
                serde_norway::Value::String(inner) => serde_norway::from_str(&inner)
                    .map_err(|e| format!("{NESTING_KEY} (string value): {e}"))?,
                value => {
                    serde_norway::from_value(value).map_err(|e| format!("{NESTING_KEY}: {e}"))?
                }
            }
        }
    };
    let defaults = dcos_default();
    let overlays = file
        .overlays
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, spec)| spec.into_overlay(&format!("overlays[{index}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NetworkConfig {
        vtep_subnet: parse_field::<Ipv4Network>(
            "vtep_subnet",
            file.vtep_subnet.as_deref(),
            "IPv4 network",
        )?
        .unwrap_or(defaults.vtep_subnet),
        // An explicit object without `vtep_subnet6` means no IPv6 VTEPs (as in DC/OS).
        vtep_subnet6: parse_field::<Ipv6Network>(
            "vtep_subnet6",
            file.vtep_subnet6.as_deref(),
            "IPv6 network",
        )?,
        vtep_mac_oui: parse_field::<MacOui>(
            "vtep_mac_oui",
            file.vtep_mac_oui.as_deref(),
            "MAC address",
        )?
        .unwrap_or(defaults.vtep_mac_oui),
        vtep_mtu: file.vtep_mtu,
        overlays,
        vxlan_port: file.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT),
    })
}

/// Fills in the network id of every network that has none, deterministically from the names:
/// `dcos` gets 1024, others a hash of their name in [4096, 2^24), probing upwards on clashes
/// (in name order, so the result depends only on the set of networks). The VNI on the wire is
/// another matter ([`OverlayInfo::wire_vni`]): ids are never configured, VNIs may be.
pub fn assign_network_ids(overlays: &mut [OverlayInfo]) {
    let mut taken: BTreeSet<u32> = overlays.iter().filter_map(|o| o.id).collect();
    let mut missing: Vec<usize> = (0..overlays.len())
        .filter(|&i| overlays[i].id.is_none())
        .collect();
    missing.sort_by(|&a, &b| overlays[a].name.cmp(&overlays[b].name));
    for index in missing {
        let name = &overlays[index].name;
        let mut id = if name == "dcos" {
            DCOS_NETWORK_ID
        } else {
            hashed_id(name)
        };
        while taken.contains(&id) {
            id = if id >= MAX_NETWORK_ID {
                HASHED_ID_FIRST
            } else {
                id + 1
            };
        }
        taken.insert(id);
        overlays[index].id = Some(id);
    }
}

/// FNV-1a of the name, folded into [4096, 2^24).
fn hashed_id(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    HASHED_ID_FIRST + hash % (MAX_NETWORK_ID - HASHED_ID_FIRST + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_at_top_level() {
        let config = parse(
            "vtep_subnet: 44.128.0.0/16\nvtep_mac_oui: 70:B3:D5:00:00:00\nvtep_mtu: 1500\n\
             vxlan_port: 4789\noverlays:\n  - name: dev\n    subnet: 10.1.0.0/16\n    prefix: 24\n    vni: 77\n",
        )
        .unwrap();
        assert_eq!(config.vtep_subnet, "44.128.0.0/16".parse().unwrap());
        assert_eq!(config.vtep_subnet6, None);
        assert_eq!(config.vtep_mtu, Some(1500));
        assert_eq!(config.vxlan_port, 4789);
        assert_eq!(config.overlays.len(), 1);
        assert_eq!(config.overlays[0].vni, Some(77));
        assert_eq!(config.overlays[0].prefix, Some(24));
    }

    #[test]
    fn parses_json_nested_and_string_nested() {
        let json = r#"{"dcos_overlay_enable": true, "dcos_overlay_network": {"vtep_subnet": "44.128.0.0/20",
            "vtep_subnet6": "fd01:a::/64", "vtep_mac_oui": "70:B3:D5:00:00:00",
            "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24},
                         {"name": "dcos6", "subnet6": "fd01:b::/64", "prefix6": 80, "enabled": false}]}}"#;
        let config = parse(json).unwrap();
        assert_eq!(config.overlays.len(), 2);
        assert_eq!(config.overlays[1].enabled, Some(false));
        assert_eq!(config.vtep_subnet6, Some("fd01:a::/64".parse().unwrap()));
        assert_eq!(config.vxlan_port, DEFAULT_VXLAN_PORT);

        let yaml = "dcos_overlay_network: '{\"vtep_subnet\": \"44.128.0.0/20\", \"overlays\": [{\"name\": \"x\", \"subnet\": \"10.0.0.0/8\", \"prefix\": 24}]}'\nother_key: 1\n";
        let config = parse(yaml).unwrap();
        assert_eq!(config.overlays[0].name, "x");
    }

    #[test]
    fn parse_errors_name_the_field() {
        let err =
            parse("vtep_subnet: 44.128.0.0/20\noverlays:\n  - name: a\n    subnet: 10.0.0.300/8\n")
                .unwrap_err();
        assert!(err.contains("overlays[0].subnet"), "{err}");
        let err = parse("vtep_subnett: 44.128.0.0/20\n").unwrap_err();
        assert!(err.contains("vtep_subnett"), "{err}");
        let err = parse("vtep_mac_oui: 70:B3:D5:00:00\n").unwrap_err();
        assert!(err.contains("vtep_mac_oui"), "{err}");
    }

    #[test]
    fn numbers_and_booleans_may_be_strings_as_stout_takes_them() {
        let config = parse(
            r#"{"vtep_subnet": "44.128.0.0/20", "vtep_mtu": "1500", "vxlan_port": "64000",
                "overlays": [{"name": "a", "subnet": "10.0.0.0/8", "prefix": "24",
                              "enabled": "false", "vni": "77", "masquerade": "true"}]}"#,
        )
        .unwrap();
        assert_eq!(config.vtep_mtu, Some(1500));
        assert_eq!(config.vxlan_port, 64000);
        let a = &config.overlays[0];
        assert_eq!(
            (a.prefix, a.enabled, a.vni, a.masquerade),
            (Some(24), Some(false), Some(77), Some(true))
        );
        for (bad, field) in [
            (r#""prefix": "twenty""#, "prefix"),
            (r#""prefix": "300""#, "prefix"),
            (r#""enabled": "yes""#, "enabled"),
        ] {
            let text =
                format!(r#"{{"overlays": [{{"name": "a", "subnet": "10.0.0.0/8", {bad}}}]}}"#);
            let err = parse(&text).unwrap_err();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn dcos_master_json_gives_its_network() {
        let config = parse(
            r#"{"replicated_log_dir": "/var/lib/dcos/mesos/master",
                "zk": {"url": "zk://127.0.0.1:2181/mesos", "quorum": 1},
                "network": {"vtep_subnet": "44.128.0.0/16", "vtep_mac_oui": "70:B3:D5:00:00:00",
                            "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24}]}}"#,
        )
        .unwrap();
        assert_eq!(config.vtep_subnet, "44.128.0.0/16".parse().unwrap());
        assert_eq!(config.vtep_mac_oui.to_string(), "70:B3:D5:00:00:00");
        assert_eq!(config.overlays[0].name, "dcos");
        let err = parse(r#"{"replicated_log": "/x", "network": {}}"#).unwrap_err();
        assert!(err.contains("replicated_log"), "{err}");
        let err = parse(r#"{"network": {"vtep_subnett": "44.128.0.0/20"}}"#).unwrap_err();
        assert!(
            err.contains("network") && err.contains("vtep_subnett"),
            "{err}"
        );
    }

    #[test]
    fn network_ids_are_deterministic_and_distinct_and_vnis_shared_by_default() {
        let mut config = dcos_default();
        assign_network_ids(&mut config.overlays);
        assert_eq!(config.overlays[0].id, Some(DCOS_NETWORK_ID));
        let dcos6 = config.overlays[1].id.unwrap();
        assert!((HASHED_ID_FIRST..=MAX_NETWORK_ID).contains(&dcos6));
        // DC/OS's scheme: every network on VNI 1024 unless it says otherwise.
        for o in &config.overlays {
            assert_eq!((o.vni, o.wire_vni()), (None, 1024), "{}", o.name);
        }

        // Same names in another order give the same ids; an existing id is kept.
        let mut reversed = dcos_default().overlays;
        reversed.reverse();
        assign_network_ids(&mut reversed);
        assert_eq!(reversed[0].id, Some(dcos6));
        assert_eq!(reversed[1].id, Some(DCOS_NETWORK_ID));

        // A clash with an existing id moves the new one along.
        let mut clash = dcos_default().overlays;
        clash[1].id = Some(DCOS_NETWORK_ID);
        assign_network_ids(&mut clash);
        assert_eq!(clash[1].id, Some(DCOS_NETWORK_ID));
        assert_eq!(clash[0].id, Some(DCOS_NETWORK_ID + 1));
    }
}
