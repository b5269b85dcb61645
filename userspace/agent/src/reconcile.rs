//! Reconciliation by difference: compare what the datapath should hold with what its maps hold
//! and touch only the entries that differ. Never flush-and-refill: traffic to unchanged
//! destinations is never interrupted.

use std::{collections::BTreeMap, net::IpAddr};

use ipnetwork::IpNetwork;
use overlay_common::maps::{Network, OverlaySubnet, RemoteRoute, Vtep};

use crate::{datapath::OverlayMaps, desired::DesiredDatapath};

/// One change to one map entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<K, V> {
    Put(K, V),
    Remove(K),
}

/// The changes that take `current` to `desired` for one map.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
) -> Vec<Change<K, V>> {
    let puts = desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| Change::Put(k.clone(), v.clone()));
    let removes = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .map(|k| Change::Remove(k.clone()));
    puts.chain(removes).collect()
}

/// Every change for every master-driven map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub networks: Vec<Change<u32, Network>>,
    pub subnets: Vec<Change<IpNetwork, OverlaySubnet>>,
    pub routes: Vec<Change<IpNetwork, RemoteRoute>>,
    pub vteps: Vec<Change<IpAddr, Vtep>>,
}

impl Plan {
    pub fn between(desired: &DesiredDatapath, current: &DesiredDatapath) -> Plan {
        Plan {
            networks: diff(&desired.networks, &current.networks),
            subnets: diff(&desired.subnets, &current.subnets),
            routes: diff(&desired.routes, &current.routes),
            vteps: diff(&desired.vteps, &current.vteps),
        }
    }

    pub fn len(&self) -> usize {
        self.networks.len() + self.subnets.len() + self.routes.len() + self.vteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the plan. Additions go in dependency order (a VTEP and network before the routes
    /// that use them), removals in the reverse order, so no packet meets a half-built path.
    pub fn apply(&self, maps: &mut OverlayMaps) -> anyhow::Result<usize> {
        for c in &self.vteps {
            if let Change::Put(k, v) = c {
                maps.put_vtep(*k, *v)?;
            }
        }
        for c in &self.networks {
            if let Change::Put(k, v) = c {
                maps.put_network(*k, *v)?;
            }
        }
        for c in &self.subnets {
            if let Change::Put(k, v) = c {
                maps.put_subnet(*k, *v)?;
            }
        }
        for c in &self.routes {
            match c {
                Change::Put(k, v) => maps.put_route(*k, *v)?,
                Change::Remove(k) => maps.remove_route(*k)?,
            }
        }
        for c in &self.subnets {
            if let Change::Remove(k) = c {
                maps.remove_subnet(*k)?;
            }
        }
        for c in &self.networks {
            if let Change::Remove(k) = c {
                maps.remove_network(*k)?;
            }
        }
        for c in &self.vteps {
            if let Change::Remove(k) = c {
                maps.remove_vtep(*k)?;
            }
        }
        Ok(self.len())
    }
}

/// What the maps hold now, in the same shape as [`DesiredDatapath`].
pub fn current(maps: &OverlayMaps) -> anyhow::Result<DesiredDatapath> {
    Ok(DesiredDatapath {
        networks: maps.networks()?,
        subnets: maps.subnets()?,
        routes: maps.routes()?,
        vteps: maps.vteps()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_touches_only_what_differs() {
        let current = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let desired = BTreeMap::from([(1, "a"), (2, "B"), (4, "d")]);
        let changes = diff(&desired, &current);
        assert_eq!(
            changes,
            vec![Change::Put(2, "B"), Change::Put(4, "d"), Change::Remove(3)]
        );
        assert!(diff(&desired, &desired).is_empty());
    }

    #[test]
    fn plan_of_identical_state_is_empty() {
        let mut d = DesiredDatapath::default();
        d.networks.insert(1024, Network::default());
        d.vteps.insert("10.0.0.2".parse().unwrap(), Vtep::default());
        assert!(Plan::between(&d, &d).is_empty());
        let empty = DesiredDatapath::default();
        assert_eq!(Plan::between(&d, &empty).len(), 2);
        assert_eq!(Plan::between(&empty, &d).len(), 2);
    }
}
