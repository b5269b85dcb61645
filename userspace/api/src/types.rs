//! The DC/OS overlay `State` and its parts, serialised field for field as DC/OS's
//! `GET /overlay-master/state` does (optional fields are omitted when absent), plus this
//! project's extra fields (`vxlan_port`, per-network `id`, `vni` and `masquerade`), which DC/OS
//! clients ignore. Every network's backend says VNI 1024 and `vtep1024`, as DC/OS's master does,
//! unless the network has its own `vni` (an option for clusters with no kernel agents).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// UDP port of the VXLAN underlay (DC/OS's choice, not IANA's 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 64000;
/// Name of the agent's VTEP device, as in DC/OS.
pub const VTEP_NAME: &str = "vtep1024";
/// The VNI every network shares on the wire unless it has its own (DC/OS's `vtep1024`).
pub const SHARED_VNI: u32 = 1024;

/// The name DC/OS gives the VTEP device of VNI `vni` (`vtep1024` for the shared one).
pub fn vtep_name(vni: u32) -> String {
    format!("vtep{vni}")
}

/// Everything the master knows: the network configuration and every agent's allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub network: NetworkConfig,
    /// In registration order (as DC/OS's master keeps them); left out when empty, as stout
    /// prints an empty repeated field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentInfo>,
}

/// The cluster-wide overlay configuration (DC/OS's `dcos_overlay_network`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub vtep_subnet: Ipv4Network,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_subnet6: Option<Ipv6Network>,
    /// Echoed as configured (DC/OS stores the configuration's text).
    pub vtep_mac_oui: MacOui,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<OverlayInfo>,
    /// Extra: UDP port of the VXLAN underlay.
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
}

fn default_vxlan_port() -> u16 {
    DEFAULT_VXLAN_PORT
}

/// One virtual network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Network>,
    /// Prefix length of each agent's IPv4 share of `subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Network>,
    /// Prefix length of each agent's IPv6 share of `subnet6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Extra: the network's id inside ebpf-overlay: what the datapath's maps, isolation and
    /// counters key on (the VNI does not say the network: networks share one). The master
    /// always fills it in and keeps it for the network's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Extra, optional: the VXLAN network identifier this network's frames carry (24 bits).
    /// Absent: [`SHARED_VNI`], shared by every network as in DC/OS, the only choice a cluster with
    /// DC/OS kernel agents can make (they send and accept VNI 1024 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// Extra: whether traffic from this network to outside every overlay is masqueraded to the
    /// agent's address (absent: yes, as in DC/OS). `false` leaves it to the host's routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<bool>,
}

impl OverlayInfo {
    /// Absent `enabled` means enabled, as in DC/OS.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }

    /// The id the datapath knows this network by. A master from before network ids sends none:
    /// its VNI was the network's identity then.
    pub fn network_id(&self) -> Option<u32> {
        self.id.or(self.vni)
    }

    /// The VNI this network's frames carry on the wire.
    pub fn wire_vni(&self) -> u32 {
        self.vni.unwrap_or(SHARED_VNI)
    }

    /// Absent `masquerade` means masquerade, as DC/OS always did.
    pub fn masquerades(&self) -> bool {
        self.masquerade.unwrap_or(true)
    }
}

/// One agent and its share of every network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<AgentOverlayInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_attempts: Option<u32>,
}

impl AgentInfo {
    /// The agent's VTEP address and MAC as text (every network of an agent shares one VTEP, so
    /// the first overlay's backend says it), for listings.
    pub fn vtep_text(&self) -> (Option<String>, Option<String>) {
        let vxlan = self.overlays.first().map(|o| &o.backend.vxlan);
        (
            vxlan.and_then(|v| v.vtep_ip).map(|v| v.to_string()),
            vxlan.and_then(|v| v.vtep_mac).map(|m| m.to_string()),
        )
    }
}

/// One agent's share of one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOverlayInfo {
    pub info: OverlayInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Network>,
    /// First half of the agent's subnet(s): Mesos (CNI) containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesos_bridge: Option<BridgeInfo>,
    /// Second half of the agent's subnet(s): Docker containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_bridge: Option<BridgeInfo>,
    pub backend: BackendInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<OverlayState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Network>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub vxlan: VxLANInfo,
}

/// The agent's VTEP as seen by one network. `vtep_ip`/`vtep_ip6` carry the VTEP subnet's
/// prefix length (`44.128.0.2/20`), as in DC/OS.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxLANInfo {
    pub vni: u32,
    pub vtep_name: String,
    /// Absent only when the agent has no VTEP (its state then says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_ip: Option<Ipv4Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_ip6: Option<Ipv6Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayState {
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    #[serde(rename = "STATUS_INVALID")]
    Invalid,
    #[serde(rename = "STATUS_OK")]
    Ok,
    #[serde(rename = "STATUS_FAILED")]
    Failed,
    #[serde(rename = "STATUS_CONFIGURING")]
    Configuring,
}

/// Body of `GET /overlay-master/watch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watched {
    pub revision: u64,
    pub state: State,
}

/// Body of `GET /overlay-master/watch?delta=true`: what changed after the caller's revision.
/// When `full` is true (the caller was too far behind, the network configuration changed, or
/// the master restarted) `state` is complete; otherwise `state.agents` holds only the agents
/// added or changed since then and `deleted` the agents removed. `state.network` is always
/// complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedDelta {
    pub revision: u64,
    pub full: bool,
    pub state: State,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<IpAddr>,
}

impl WatchedDelta {
    /// Brings `state` (the caller's copy at the revision it asked after) up to this revision.
    pub fn apply_to(self, state: &mut State) {
        if self.full {
            *state = self.state;
            return;
        }
        state.network = self.state.network;
        state
            .agents
            .retain(|agent| !self.deleted.contains(&agent.ip));
        // Registration order, as the master lists them: a changed agent keeps its place,
        // a new one comes last.
        let mut places: std::collections::HashMap<IpAddr, usize> = state
            .agents
            .iter()
            .enumerate()
            .map(|(place, agent)| (agent.ip, place))
            .collect();
        for changed in self.state.agents {
            match places.get(&changed.ip) {
                Some(&place) => state.agents[place] = changed,
                None => {
                    places.insert(changed.ip, state.agents.len());
                    state.agents.push(changed);
                }
            }
        }
    }
}

/// Body of `POST /overlay-master/agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub ip: IpAddr,
    /// Extra: the agent's local endpoints per network name (absent: not reported, as from
    /// DC/OS agents). The master refuses, without force, to remove or disable a network that
    /// holds some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<std::collections::BTreeMap<String, u32>>,
    /// Extra: the agent's containers, one entry per address (absent: not reported). The master
    /// keeps them in memory for `/overlay-master/endpoints` and its Networks page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_list: Option<Vec<ReportedEndpoint>>,
    /// Extra: packets the agent's datapath dropped since it was loaded, by network name and
    /// reason (absent: not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>>,
    /// What the agent asks for, as DC/OS agents say it in their registration (absent: both
    /// bridges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<AgentNetworkConfig>,
}

/// One container address an agent reports with its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReportedEndpoint {
    pub ip: IpAddr,
    pub network: String,
    /// The runtime's container id (CNI `CNI_CONTAINERID`, Docker endpoint), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The host side of the container's veth.
    pub interface: String,
    pub mac: MacAddr,
}

/// One entry of `GET /overlay-master/endpoints`: a reported endpoint and its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEndpoint {
    pub agent: IpAddr,
    #[serde(flatten)]
    pub endpoint: ReportedEndpoint,
}

/// DC/OS's `AgentNetworkConfig`, as a registration carries it. The master acts on the
/// bridges; `allocate_subnet: false` is refused; the rest is the DC/OS agent's own business
/// and accepted as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentNetworkConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_subnet: Option<bool>,
    /// `false`: no Mesos bridge (`m-<network>`) is given (DC/OS master nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesos_bridge: Option<bool>,
    /// `false`: no Docker bridge (`d-<network>`) is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_bridge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_ipv6: Option<bool>,
}

/// Body of `POST /overlay-master/agents/delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteAgentsRequest {
    pub agents: Vec<IpAddr>,
}

/// `POST /overlay-master/agents/delete` answers with the whole `State` (as DC/OS does); this
/// header lists the agents that existed and were removed (comma-separated, may be empty).
pub const DELETED_AGENTS_HEADER: &str = "x-overlay-deleted-agents";

/// Body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A 48-bit MAC address, written `70:b3:d5:80:00:01` (parsing accepts either case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The VTEP MAC of DC/OS: the OUI's upper three bytes and the VTEP IP's lower 24 bits.
    pub fn vtep(oui: MacAddr, vtep_ip: Ipv4Addr) -> MacAddr {
        let ip = vtep_ip.octets();
        MacAddr([oui.0[0], oui.0[1], oui.0[2], ip[1], ip[2], ip[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes separated by ':'")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(MacAddr(bytes))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The VTEP MAC OUI of the configuration: used by value, printed as it was written
/// (`70:B3:D5:00:00:00` in DC/OS's configs; DC/OS echoes the configured text).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MacOui {
    mac: MacAddr,
    written: String,
}

impl MacOui {
    pub fn mac(&self) -> MacAddr {
        self.mac
    }
}

impl From<MacAddr> for MacOui {
    /// Written in upper case, as DC/OS's configurations write it.
    fn from(mac: MacAddr) -> Self {
        MacOui {
            mac,
            written: mac.to_string().to_uppercase(),
        }
    }
}

impl fmt::Display for MacOui {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

impl FromStr for MacOui {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let written = s.trim();
        Ok(MacOui {
            mac: written.parse()?,
            written: written.to_owned(),
        })
    }
}

impl Serialize for MacOui {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.written)
    }
}

impl<'de> Deserialize<'de> for MacOui {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_optional_fields_serialise_as_dcos() {
        let state = OverlayState {
            status: Status::Failed,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            r#"{"status":"STATUS_FAILED"}"#
        );
        for (status, text) in [
            (Status::Invalid, "\"STATUS_INVALID\""),
            (Status::Ok, "\"STATUS_OK\""),
            (Status::Configuring, "\"STATUS_CONFIGURING\""),
        ] {
            assert_eq!(serde_json::to_string(&status).unwrap(), text);
            assert_eq!(serde_json::from_str::<Status>(text).unwrap(), status);
        }
        let bridge = BridgeInfo {
            name: "m-dcos".into(),
            ip: Some("9.0.1.0/25".parse().unwrap()),
            ip6: None,
        };
        assert_eq!(
            serde_json::to_string(&bridge).unwrap(),
            r#"{"name":"m-dcos","ip":"9.0.1.0/25"}"#
        );
    }

    #[test]
    fn mac_addresses_parse_either_case_and_print_lowercase() {
        let oui: MacAddr = "70:B3:D5:00:00:00".parse().unwrap();
        let mac = MacAddr::vtep(oui, "44.128.0.1".parse().unwrap());
        assert_eq!(mac.to_string(), "70:b3:d5:80:00:01");
        for bad in [
            "70:B3:D5:00:00",
            "70:B3:D5:00:00:00:00",
            "70-B3-D5-00-00-00",
            "zz:b3:d5:00:00:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn network_config_defaults_vxlan_port_when_absent() {
        let config: NetworkConfig = serde_json::from_str(
            r#"{"vtep_subnet":"44.128.0.0/20","vtep_mac_oui":"70:B3:D5:00:00:00","overlays":[]}"#,
        )
        .unwrap();
        assert_eq!(config.vxlan_port, DEFAULT_VXLAN_PORT);
        assert_eq!(config.vtep_subnet6, None);
    }

    #[test]
    fn the_oui_prints_as_written_and_empty_lists_are_left_out() {
        let network: NetworkConfig = serde_json::from_str(
            r#"{"vtep_subnet":"44.128.0.0/20","vtep_mac_oui":"70:B3:d5:00:00:00"}"#,
        )
        .unwrap();
        assert_eq!(
            network.vtep_mac_oui.mac(),
            MacAddr([0x70, 0xb3, 0xd5, 0, 0, 0])
        );
        let state = State {
            network,
            agents: vec![agent("10.0.0.1")],
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(
            text.contains(r#""vtep_mac_oui":"70:B3:d5:00:00:00""#),
            "{text}"
        );
        assert!(
            !text.contains("overlays"),
            "empty repeated fields are left out: {text}"
        );
        let empty = State {
            agents: vec![],
            ..state
        };
        assert!(!serde_json::to_string(&empty).unwrap().contains("agents"));
        assert_eq!(
            MacOui::from(MacAddr([0x70, 0xb3, 0xd5, 0, 0, 0])).to_string(),
            "70:B3:D5:00:00:00"
        );
    }

    fn agent(ip: &str) -> AgentInfo {
        AgentInfo {
            ip: ip.parse().unwrap(),
            overlays: Vec::new(),
            configuration_attempts: None,
        }
    }

    #[test]
    fn delta_applies_upserts_and_deletions() {
        let network: NetworkConfig = serde_json::from_str(
            r#"{"vtep_subnet":"44.128.0.0/20","vtep_mac_oui":"70:b3:d5:00:00:00"}"#,
        )
        .unwrap();
        let mut state = State {
            network: network.clone(),
            agents: vec![agent("10.0.0.1"), agent("10.0.0.2")],
        };
        let mut changed = agent("10.0.0.1");
        changed.configuration_attempts = Some(3);
        WatchedDelta {
            revision: 7,
            full: false,
            state: State {
                network: network.clone(),
                agents: vec![agent("10.0.0.3"), changed.clone()],
            },
            deleted: vec!["10.0.0.2".parse().unwrap()],
        }
        .apply_to(&mut state);
        assert_eq!(state.agents, vec![changed, agent("10.0.0.3")]);

        // Registration order, not address order: a changed agent keeps its place.
        let mut ordered = State {
            network: network.clone(),
            agents: vec![agent("10.0.0.9"), agent("10.0.0.2")],
        };
        let mut nine = agent("10.0.0.9");
        nine.configuration_attempts = Some(1);
        WatchedDelta {
            revision: 3,
            full: false,
            state: State {
                network: network.clone(),
                agents: vec![nine.clone(), agent("10.0.0.1")],
            },
            deleted: vec![],
        }
        .apply_to(&mut ordered);
        assert_eq!(
            ordered.agents,
            vec![nine, agent("10.0.0.2"), agent("10.0.0.1")]
        );

        WatchedDelta {
            revision: 8,
            full: true,
            state: State {
                network,
                agents: vec![agent("10.0.0.9")],
            },
            deleted: Vec::new(),
        }
        .apply_to(&mut state);
        assert_eq!(state.agents, vec![agent("10.0.0.9")]);
    }
}

/// One agent as `GET /overlay-master/agents/liveness` reports it: when the master last heard
/// from it and what that makes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentLiveness {
    pub ip: IpAddr,
    /// `live`, `stale` (no heartbeat for `--stale-after-secs`) or `unknown` (not heard from
    /// since this master started).
    pub status: String,
    /// Seconds since the last heartbeat this master received (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_seconds_ago: Option<f64>,
}
