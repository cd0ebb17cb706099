//! Target lifecycle: which targets exist, under which ids, in which state.
//!
//! The registry gives listeners, groups and targets ids that stay the same across reloads, so a
//! reload rewrites only what changed and flows keep their target. It follows every target
//! through NLB's states (initial, healthy, unhealthy, draining, unused) and decides who takes
//! new flows: the healthy targets of a group, or all its registered targets when none is
//! healthy (fail open, as NLB does). Time is passed in, never read, so tests drive it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    health::{TargetState, Tracker},
};

/// A target is identified by its group and its address and port.
///
/// Ordered by address first: the registry's lookup of every probe result (10,000 a second at
/// 10,000 targets) then mostly compares integers rather than group names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub addr: SocketAddr,
    pub group: String,
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in {}", self.addr, self.group)
    }
}

#[derive(Clone, Debug)]
pub struct TargetEntry {
    pub id: u32,
    pub weight: u32,
    pub health: Tracker,
    /// Set while draining: when the deregistration delay ends.
    pub drain_until: Option<Instant>,
}

impl TargetEntry {
    pub fn state(&self) -> TargetState {
        if self.drain_until.is_some() {
            TargetState::Draining
        } else {
            self.health.state()
        }
    }
}

/// Ids handed out in order and, once freed, reused oldest first, so that a freed id (which
/// stale flows may still name) is reused as late as possible.
#[derive(Debug)]
struct Ids {
    next: u32,
    limit: u32,
    free: VecDeque<u32>,
}

impl Ids {
    fn new(limit: u32) -> Self {
        Ids {
            next: 0,
            limit,
            free: VecDeque::new(),
        }
    }

    fn take(&mut self) -> Option<u32> {
        if self.next < self.limit {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.free.pop_front()
        }
    }

    fn give_back(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// A change worth a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub target: TargetKey,
    pub from: TargetState,
    pub to: TargetState,
}

#[derive(Debug)]
pub struct Registry {
    listener_ids: BTreeMap<String, u32>,
    listener_pool: Ids,
    group_ids: BTreeMap<String, u32>,
    group_pool: Ids,
    targets: BTreeMap<TargetKey, TargetEntry>,
    target_pool: Ids,
}

impl Registry {
    pub fn new(max_listeners: u32, max_groups: u32, max_targets: u32) -> Self {
        Registry {
            listener_ids: BTreeMap::new(),
            listener_pool: Ids::new(max_listeners),
            group_ids: BTreeMap::new(),
            group_pool: Ids::new(max_groups),
            targets: BTreeMap::new(),
            target_pool: Ids::new(max_targets),
        }
    }

    pub fn listener_id(&self, name: &str) -> Option<u32> {
        self.listener_ids.get(name).copied()
    }

    pub fn group_id(&self, name: &str) -> Option<u32> {
        self.group_ids.get(name).copied()
    }

    pub fn targets(&self) -> impl Iterator<Item = (&TargetKey, &TargetEntry)> {
        self.targets.iter()
    }

    pub fn target(&self, key: &TargetKey) -> Option<&TargetEntry> {
        self.targets.get(key)
    }

    /// Brings the registry in line with `config`: new names get ids, new targets start
    /// `initial`, removed targets start draining (or go at once with a zero delay), re-added
    /// draining targets are registered again (and judged afresh, as NLB does).
    pub fn sync(&mut self, config: &Config, now: Instant) -> Result<Vec<Transition>, String> {
        sync_ids(
            &mut self.listener_ids,
            &mut self.listener_pool,
            config.listeners.iter().map(|l| &l.name),
            "listeners",
        )?;
        sync_ids(
            &mut self.group_ids,
            &mut self.group_pool,
            config.target_groups.iter().map(|g| &g.name),
            "target groups",
        )?;
        let mut transitions = Vec::new();
        let mut wanted = HashMap::new();
        for group in &config.target_groups {
            for t in &group.targets {
                let key = TargetKey {
                    group: group.name.clone(),
                    addr: t.endpoint(),
                };
                wanted.insert(key, (t.weight, group.deregistration_delay));
            }
        }
        for (key, entry) in self.targets.iter_mut() {
            match wanted.get(key) {
                Some(&(weight, _)) => {
                    entry.weight = weight;
                    if entry.drain_until.take().is_some() {
                        entry.health = Tracker::default();
                        transitions.push(Transition {
                            target: key.clone(),
                            from: TargetState::Draining,
                            to: TargetState::Initial,
                        });
                    }
                }
                None if entry.drain_until.is_none() => {
                    // The group may be gone from the config: then its delay is unknown, use 0.
                    let delay = config
                        .target_group(&key.group)
                        .map_or(Duration::ZERO, |g| g.deregistration_delay);
                    transitions.push(Transition {
                        target: key.clone(),
                        from: entry.state(),
                        to: TargetState::Draining,
                    });
                    entry.drain_until = Some(now + delay);
                }
                None => {}
            }
        }
        for (key, (weight, _)) in wanted {
            if self.targets.contains_key(&key) {
                continue;
            }
            let id = self
                .target_pool
                .take()
                .ok_or_else(|| format!("more than {} targets", self.target_pool.limit))?;
            self.targets.insert(
                key,
                TargetEntry {
                    id,
                    weight,
                    health: Tracker::default(),
                    drain_until: None,
                },
            );
        }
        transitions.extend(self.expire(now));
        Ok(transitions)
    }

    /// Ends the draining of targets whose delay has passed: they become unused and are dropped.
    pub fn expire(&mut self, now: Instant) -> Vec<Transition> {
        let done: Vec<TargetKey> = self
            .targets
            .iter()
            .filter(|(_, e)| e.drain_until.is_some_and(|until| until <= now))
            .map(|(k, _)| k.clone())
            .collect();
        done.into_iter()
            .map(|key| {
                let entry = self.targets.remove(&key).expect("listed above");
                self.target_pool.give_back(entry.id);
                Transition {
                    target: key,
                    from: TargetState::Draining,
                    to: TargetState::Unused,
                }
            })
            .collect()
    }

    /// Records a probe result; returns the transition it caused, if any.
    pub fn record(
        &mut self,
        key: &TargetKey,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<Transition> {
        let entry = self.targets.get_mut(key)?;
        if entry.drain_until.is_some() {
            return None;
        }
        let from = entry.health.state();
        entry
            .health
            .record(ok, healthy_threshold, unhealthy_threshold)
            .map(|to| Transition {
                target: key.clone(),
                from,
                to,
            })
    }

    /// Whether a group fails open: it has registered targets and none of them is healthy.
    pub fn fails_open(&self, group: &str) -> bool {
        let mut registered = self.registered(group).peekable();
        registered.peek().is_some() && registered.all(|(_, e)| e.state() != TargetState::Healthy)
    }

    /// The targets of `group` that take new flows.
    pub fn usable<'a>(
        &'a self,
        group: &'a str,
    ) -> impl Iterator<Item = (&'a TargetKey, &'a TargetEntry)> + 'a {
        let fail_open = self.fails_open(group);
        self.registered(group)
            .filter(move |(_, e)| fail_open || e.state() == TargetState::Healthy)
    }

    /// The targets of `group` that are not draining.
    fn registered<'a>(
        &'a self,
        group: &'a str,
    ) -> impl Iterator<Item = (&'a TargetKey, &'a TargetEntry)> + 'a {
        self.targets
            .iter()
            .filter(move |(k, e)| k.group == group && e.drain_until.is_none())
    }
}

/// What a successor needs to carry on where this controller stopped: the ids the maps use and
/// what is known of every target. Written by [`Registry::snapshot`] after every change.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub listeners: BTreeMap<String, u32>,
    pub groups: BTreeMap<String, u32>,
    pub targets: Vec<TargetSnapshot>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TargetSnapshot {
    pub group: String,
    pub addr: SocketAddr,
    pub id: u32,
    pub weight: u32,
    /// `initial`, `healthy`, `unhealthy` or `draining`.
    pub state: String,
    /// While draining: milliseconds of the delay left.
    pub drain_left_ms: Option<u64>,
}

impl Registry {
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            listeners: self.listener_ids.clone(),
            groups: self.group_ids.clone(),
            targets: self
                .targets
                .iter()
                .map(|(k, e)| TargetSnapshot {
                    group: k.group.clone(),
                    addr: k.addr,
                    id: e.id,
                    weight: e.weight,
                    state: e.state().name().to_owned(),
                    drain_left_ms: e
                        .drain_until
                        .map(|until| until.saturating_duration_since(now).as_millis() as u64),
                })
                .collect(),
        }
    }

    /// A registry that carries on from `snapshot`: same ids, same states, same drain deadlines.
    pub fn restore(
        snapshot: &Snapshot,
        max_listeners: u32,
        max_groups: u32,
        max_targets: u32,
        now: Instant,
    ) -> Result<Self, String> {
        let mut registry = Registry::new(max_listeners, max_groups, max_targets);
        registry.listener_ids = snapshot.listeners.clone();
        registry.group_ids = snapshot.groups.clone();
        for t in &snapshot.targets {
            let state = TargetState::ALL
                .into_iter()
                .find(|s| s.name() == t.state)
                .ok_or_else(|| format!("unknown target state `{}`", t.state))?;
            let health = match state {
                TargetState::Healthy | TargetState::Unhealthy => Tracker::starting_at(state),
                _ => Tracker::default(),
            };
            registry.targets.insert(
                TargetKey {
                    group: t.group.clone(),
                    addr: t.addr,
                },
                TargetEntry {
                    id: t.id,
                    weight: t.weight,
                    health,
                    drain_until: t.drain_left_ms.map(|ms| now + Duration::from_millis(ms)),
                },
            );
        }
        let used = |ids: &mut dyn Iterator<Item = u32>, pool: &mut Ids| -> Result<(), String> {
            let taken: std::collections::BTreeSet<u32> = ids.collect();
            if taken.iter().any(|&id| id >= pool.limit) {
                return Err(format!("an id is beyond the limit of {}", pool.limit));
            }
            pool.next = taken.last().map_or(0, |last| last + 1);
            pool.free = (0..pool.next).filter(|id| !taken.contains(id)).collect();
            Ok(())
        };
        used(
            &mut registry.listener_ids.values().copied(),
            &mut registry.listener_pool,
        )?;
        used(
            &mut registry.group_ids.values().copied(),
            &mut registry.group_pool,
        )?;
        used(
            &mut registry.targets.values().map(|e| e.id),
            &mut registry.target_pool,
        )?;
        Ok(registry)
    }
}

fn sync_ids<'a>(
    ids: &mut BTreeMap<String, u32>,
    pool: &mut Ids,
    names: impl Iterator<Item = &'a String>,
    what: &str,
) -> Result<(), String> {
    let names: Vec<&String> = names.collect();
    ids.retain(|name, id| {
        let keep = names.contains(&name);
        if !keep {
            pool.give_back(*id);
        }
        keep
    });
    for name in names {
        if !ids.contains_key(name) {
            let id = pool
                .take()
                .ok_or_else(|| format!("more than {} {what}", pool.limit))?;
            ids.insert(name.clone(), id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    fn config(targets: &[(u8, u32)], delay: &str) -> Config {
        let list: String = targets
            .iter()
            .map(|(host, weight)| {
                format!("      - {{address: 198.51.100.{host}, port: 80, weight: {weight}}}\n")
            })
            .collect();
        let text = format!(
            "listeners:\n  - {{name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}}\n\
             target_groups:\n  - name: web\n    deregistration_delay: {delay}\n    targets:\n{list}"
        );
        config::parse(Path::new("t.yaml"), &text).unwrap()
    }

    fn key(host: u8) -> TargetKey {
        TargetKey {
            group: "web".into(),
            addr: SocketAddr::new([198, 51, 100, host].into(), 80),
        }
    }

    /// The last byte of a test target's address: 198.51.100.`host`.
    fn host_of(key: &TargetKey) -> u8 {
        match key.addr.ip() {
            std::net::IpAddr::V4(a) => a.octets()[3],
            std::net::IpAddr::V6(a) => a.octets()[15],
        }
    }

    fn states(r: &Registry) -> Vec<(u8, TargetState)> {
        r.targets().map(|(k, e)| (host_of(k), e.state())).collect()
    }

    fn usable(r: &Registry) -> Vec<u8> {
        r.usable("web").map(|(k, _)| host_of(k)).collect()
    }

    #[test]
    fn new_targets_start_initial_and_the_group_fails_open() {
        let mut r = Registry::new(8, 8, 8);
        let now = Instant::now();
        r.sync(&config(&[(11, 1), (12, 1)], "300s"), now).unwrap();
        assert_eq!(
            states(&r),
            vec![(11, TargetState::Initial), (12, TargetState::Initial)]
        );
        assert!(r.fails_open("web"));
        assert_eq!(usable(&r), vec![11, 12]);
    }

    #[test]
    fn only_healthy_targets_take_flows_until_none_is_left() {
        let mut r = Registry::new(8, 8, 8);
        let now = Instant::now();
        r.sync(&config(&[(11, 1), (12, 1)], "300s"), now).unwrap();
        for _ in 0..2 {
            r.record(&key(11), true, 2, 2);
        }
        assert_eq!(r.target(&key(11)).unwrap().state(), TargetState::Healthy);
        assert!(!r.fails_open("web"));
        assert_eq!(usable(&r), vec![11]);
        let t = (0..2)
            .filter_map(|_| r.record(&key(11), false, 2, 2))
            .collect::<Vec<_>>();
        assert_eq!(
            t,
            vec![Transition {
                target: key(11),
                from: TargetState::Healthy,
                to: TargetState::Unhealthy
            }]
        );
        // Nobody healthy: fail open to every registered target.
        assert_eq!(usable(&r), vec![11, 12]);
        for _ in 0..2 {
            r.record(&key(12), true, 2, 2);
        }
        assert_eq!(usable(&r), vec![12]);
    }

    #[test]
    fn removed_targets_drain_then_become_unused() {
        let mut r = Registry::new(8, 8, 8);
        let t0 = Instant::now();
        r.sync(&config(&[(11, 1), (12, 1)], "10s"), t0).unwrap();
        let id12 = r.target(&key(12)).unwrap().id;
        let t = r.sync(&config(&[(11, 1)], "10s"), t0).unwrap();
        assert_eq!(
            t,
            vec![Transition {
                target: key(12),
                from: TargetState::Initial,
                to: TargetState::Draining
            }]
        );
        assert_eq!(r.target(&key(12)).unwrap().state(), TargetState::Draining);
        assert_eq!(usable(&r), vec![11], "a draining target takes no new flows");
        assert!(
            r.record(&key(12), true, 2, 2).is_none(),
            "draining targets are not judged"
        );
        assert!(r.expire(t0 + Duration::from_secs(9)).is_empty());
        let t = r.expire(t0 + Duration::from_secs(10));
        assert_eq!(
            t,
            vec![Transition {
                target: key(12),
                from: TargetState::Draining,
                to: TargetState::Unused
            }]
        );
        assert!(r.target(&key(12)).is_none());
        // Its id is reused only after every fresh id.
        r.sync(&config(&[(11, 1), (13, 1)], "10s"), t0).unwrap();
        assert_ne!(r.target(&key(13)).unwrap().id, id12);
    }

    #[test]
    fn re_registering_a_draining_target_starts_it_afresh() {
        let mut r = Registry::new(8, 8, 8);
        let t0 = Instant::now();
        r.sync(&config(&[(11, 1)], "10s"), t0).unwrap();
        let id = r.target(&key(11)).unwrap().id;
        r.sync(&config(&[(12, 1)], "10s"), t0).unwrap();
        r.sync(
            &config(&[(11, 1), (12, 1)], "10s"),
            t0 + Duration::from_secs(1),
        )
        .unwrap();
        let e = r.target(&key(11)).unwrap();
        assert_eq!((e.id, e.state()), (id, TargetState::Initial));
    }

    #[test]
    fn zero_delay_removes_at_once_and_weights_follow_the_config() {
        let mut r = Registry::new(8, 8, 8);
        let t0 = Instant::now();
        r.sync(&config(&[(11, 1), (12, 1)], "0s"), t0).unwrap();
        r.sync(&config(&[(11, 5)], "0s"), t0).unwrap();
        assert!(r.target(&key(12)).is_none());
        assert_eq!(r.target(&key(11)).unwrap().weight, 5);
    }

    #[test]
    fn a_snapshot_restores_ids_states_and_deadlines() {
        let mut r = Registry::new(8, 8, 8);
        let t0 = Instant::now();
        r.sync(&config(&[(11, 1), (12, 2), (13, 1)], "10s"), t0)
            .unwrap();
        for _ in 0..2 {
            r.record(&key(11), true, 2, 2);
            r.record(&key(12), false, 2, 2);
        }
        r.sync(&config(&[(11, 1), (12, 2)], "10s"), t0).unwrap();
        let json = serde_json::to_string(&r.snapshot(t0 + Duration::from_secs(4))).unwrap();
        let t1 = Instant::now();
        let restored =
            Registry::restore(&serde_json::from_str(&json).unwrap(), 8, 8, 8, t1).unwrap();
        assert_eq!(states(&restored), states(&r));
        for host in [11, 12, 13] {
            assert_eq!(
                restored.target(&key(host)).unwrap().id,
                r.target(&key(host)).unwrap().id
            );
        }
        assert_eq!(restored.target(&key(12)).unwrap().weight, 2);
        // 6 s of the 10 s delay were left.
        let mut restored = restored;
        assert!(restored.expire(t1 + Duration::from_millis(5900)).is_empty());
        assert_eq!(restored.expire(t1 + Duration::from_secs(6)).len(), 1);
        // A new target gets an id no one uses.
        restored
            .sync(&config(&[(11, 1), (12, 2), (14, 1)], "10s"), t1)
            .unwrap();
        let ids: Vec<u32> = restored.targets().map(|(_, e)| e.id).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(ids.len(), unique.len());
    }

    #[test]
    fn ids_are_stable_across_syncs() {
        let mut r = Registry::new(8, 8, 8);
        let t0 = Instant::now();
        r.sync(&config(&[(11, 1), (12, 1)], "0s"), t0).unwrap();
        let before: Vec<u32> = r.targets().map(|(_, e)| e.id).collect();
        r.sync(&config(&[(12, 1), (11, 1), (13, 1)], "0s"), t0)
            .unwrap();
        assert_eq!(r.target(&key(11)).unwrap().id, before[0]);
        assert_eq!(r.target(&key(12)).unwrap().id, before[1]);
        assert_eq!(r.group_id("web"), Some(0));
        assert_eq!(r.listener_id("web"), Some(0));
    }
}
