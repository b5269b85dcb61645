//! Drops in the last minute, by network and reason, for `overlayctl status`: the datapath's
//! drop counters (`OVL_STATS`) sampled every few seconds, and the difference between now and
//! the sample a minute ago. Counter deltas, not the monitor's events: those are rate-limited
//! and only exist while someone follows, the counters count every drop.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use overlay_api::monitor::{RecentDrop, RecentDrops};
use overlay_common::counters::{Counter, NO_NETWORK};

use crate::{datapath::OverlayMaps, runtime::Handle};

/// The window reported.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How often the counters are sampled (the window's start is this precise).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Packets dropped so far, by (network, reason).
type Drops = BTreeMap<(u32, u32), u64>;

/// Samples of the drop counters, oldest first; cheap to clone.
#[derive(Clone)]
pub struct RecentDropsWindow {
    samples: Arc<Mutex<VecDeque<(Instant, Drops)>>>,
    view: Arc<OverlayMaps>,
    agent: Handle,
}

fn read_drops(view: &OverlayMaps) -> anyhow::Result<Drops> {
    Ok(view
        .stats()?
        .into_iter()
        .filter(|r| r.counter.is_drop())
        .map(|r| ((r.network, r.counter as u32), r.packets))
        .collect())
}

/// Keeps, of samples ordered by time, the newest one at least `window` old and those after it.
fn prune<T>(samples: &mut VecDeque<(Instant, T)>, now: Instant, window: Duration) {
    while samples.len() >= 2 && now.duration_since(samples[1].0) >= window {
        samples.pop_front();
    }
}

/// What grew between `then` and `now` (a counter that went back, a recreated map, counts from
/// zero).
fn deltas(then: &Drops, now: &Drops) -> Vec<((u32, u32), u64)> {
    now.iter()
        .filter_map(|(key, &packets)| {
            let before = then.get(key).copied().unwrap_or(0);
            let grown = if packets >= before {
                packets - before
            } else {
                packets
            };
            (grown > 0).then_some((*key, grown))
        })
        .collect()
}

impl RecentDropsWindow {
    /// Starts sampling the counters the agent's maps hold.
    pub fn start(agent: Handle) -> RecentDropsWindow {
        let window = RecentDropsWindow {
            samples: Arc::new(Mutex::new(VecDeque::new())),
            view: agent.view(),
            agent,
        };
        let sampler = window.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let view = sampler.view.clone();
                match tokio::task::spawn_blocking(move || read_drops(&view)).await {
                    Ok(Ok(drops)) => {
                        let now = Instant::now();
                        let mut samples = sampler.samples.lock().unwrap();
                        samples.push_back((now, drops));
                        prune(&mut samples, now, WINDOW);
                    }
                    Ok(Err(e)) => tracing::warn!("sampling the drop counters: {e:#}"),
                    Err(e) => tracing::warn!("sampling the drop counters: {e}"),
                }
            }
        });
        window
    }

    /// The drops since the sample a minute ago (or the first sample, while the agent is
    /// younger), read now.
    pub async fn report(&self) -> anyhow::Result<RecentDrops> {
        let view = self.view.clone();
        let current = tokio::task::spawn_blocking(move || read_drops(&view)).await??;
        let now = Instant::now();
        let (since, base) = {
            let mut samples = self.samples.lock().unwrap();
            prune(&mut samples, now, WINDOW);
            match samples.front() {
                Some((t, d)) => (*t, d.clone()),
                None => (now, current.clone()),
            }
        };
        let names: BTreeMap<u32, String> = self
            .agent
            .me()
            .await?
            .map(|me| {
                me.overlays
                    .iter()
                    .filter_map(|o| Some((o.info.network_id()?, o.info.name.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let drops = deltas(&base, &current)
            .into_iter()
            .map(|((network, reason), packets)| RecentDrop {
                network: (network != NO_NETWORK).then(|| {
                    names
                        .get(&network)
                        .cloned()
                        .unwrap_or_else(|| format!("id {network}"))
                }),
                network_id: network,
                reason: Counter::from_u32(reason)
                    .map(|c| c.name().to_owned())
                    .unwrap_or_else(|| format!("reason {reason}")),
                packets,
            })
            .collect();
        Ok(RecentDrops {
            window_seconds: now.duration_since(since).as_secs().min(WINDOW.as_secs()),
            source: "counter deltas".into(),
            drops,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_sample_kept_is_the_newest_a_window_old() {
        let t0 = Instant::now();
        let mut s: VecDeque<(Instant, u32)> = (0..20)
            .map(|i| (t0 + Duration::from_secs(5 * i), i as u32))
            .collect();
        // At t0 + 95 s: samples at 0..95 s; the newest >= 60 s old is the one at 35 s.
        prune(&mut s, t0 + Duration::from_secs(95), WINDOW);
        assert_eq!(s.front().unwrap().1, 7);
        // A young agent keeps its first sample.
        let mut young: VecDeque<(Instant, u32)> =
            [(t0, 0), (t0 + Duration::from_secs(5), 1)].into();
        prune(&mut young, t0 + Duration::from_secs(10), WINDOW);
        assert_eq!(young.len(), 2);
    }

    #[test]
    fn deltas_are_what_grew() {
        let then: Drops = [((1, 17), 10), ((0, 19), 5)].into();
        let now: Drops = [((1, 17), 14), ((0, 19), 5), ((2, 18), 3)].into();
        assert_eq!(deltas(&then, &now), [((1, 17), 4), ((2, 18), 3)]);
        // A counter that restarted from zero counts from zero.
        let reset: Drops = [((1, 17), 2)].into();
        assert_eq!(deltas(&then, &reset), [((1, 17), 2)]);
    }
}
