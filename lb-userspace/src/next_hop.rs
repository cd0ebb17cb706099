//! Next hops: which of lb's interfaces reaches each target, and the MAC its frames carry (the
//! target's own, or that of the gateway towards it). Learnt from the kernel over netlink: the
//! routes at each start and reload, the MACs from its neighbour table and then from its events,
//! so that a target replaced by a host with another MAC gets traffic again as soon as the
//! kernel learns the new MAC, without a reload. A target whose MAC is not known takes no flows,
//! and `lb status` says so.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr as IpSocketAddr, UdpSocket},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    constants::{RTMGRP_LINK, RTMGRP_NEIGH},
    new_connection,
    packet_core::NetlinkPayload,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute},
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::mpsc;

use crate::{
    config::{Config, Forwarding},
    maps::NextHop,
    net::{Interface, position_of, set_socket_option},
};

/// IPv6's minimum MTU, and what an outer IPv6 header takes of it.
const MIN_IPV6_MTU: u32 = 1280;
const IPV6_HEADER: u32 = 40;

/// Per target address: the interface that reaches it (an index into lb's) and the neighbour
/// whose MAC its frames carry.
pub type Routes = HashMap<IpAddr, (usize, IpAddr)>;

/// A change the kernel announced that matters to lb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Neighbour `addr` on interface `ifindex` has this MAC now, or none: its entry is gone or
    /// not resolved yet, or resolution `failed` (no answer).
    Neighbour {
        ifindex: u32,
        addr: IpAddr,
        mac: Option<[u8; 6]>,
        failed: bool,
    },
    /// Interface `ifindex` is up and has a carrier, or not.
    Link { ifindex: u32, up: bool },
    /// Interface `ifindex` is gone.
    LinkRemoved { ifindex: u32 },
    /// The kernel had more to say than lb's socket could hold: some events were lost, and the
    /// neighbour table is to be read again.
    Lost,
}

pub struct NextHops {
    handle: Handle,
    routes: Routes,
    /// The MAC of each neighbour lb sends to, as the kernel last said.
    macs: HashMap<(usize, IpAddr), [u8; 6]>,
    /// Neighbours whose entry lb had the kernel drop to ask for their MAC afresh: they keep
    /// their MAC until the kernel has an answer, so that a target that merely failed a check
    /// (still serving a group that fails open) never loses it for the time of an ARP.
    rechecking: HashSet<(usize, IpAddr)>,
}

impl NextHops {
    /// Asks the kernel through `handle`, and opens a second netlink socket (within a tokio
    /// runtime) that hears neighbour and link changes, which arrive on the returned channel.
    pub fn connect(handle: Handle) -> Result<(Self, mpsc::UnboundedReceiver<Event>)> {
        let (mut connection, _, mut messages) =
            new_connection().context("opening a netlink socket")?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_NEIGH | RTMGRP_LINK))
            .context("subscribing to the kernel's neighbour and link changes")?;
        tokio::spawn(connection);
        let (events, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((message, _)) = messages.next().await {
                let event = match message.payload {
                    NetlinkPayload::InnerMessage(message) => event_of(message),
                    NetlinkPayload::Overrun(_) => Some(Event::Lost),
                    _ => None,
                };
                if let Some(event) = event
                    && events.send(event).is_err()
                {
                    break;
                }
            }
        });
        let hops = NextHops {
            handle,
            routes: HashMap::new(),
            macs: HashMap::new(),
            rechecking: HashSet::new(),
        };
        Ok((hops, received))
    }

    /// The routes to every target of `config`, and to the `draining` ones that it no longer
    /// has: which of `ifaces` reaches each, and through which neighbour. A target of `config`
    /// that lb cannot reach as its group forwards is an error of the config; a draining one
    /// without a route is left out (its flows then move).
    pub async fn route(
        &self,
        config: &Config,
        draining: &[IpAddr],
        ifaces: &[Interface],
    ) -> Result<Routes> {
        let mut routes = Routes::new();
        for group in &config.target_groups {
            for target in &group.targets {
                let addr = target.address;
                let (ifindex, gateway) = self.route_to(addr).await?;
                let Some(interface) = position_of(ifaces, ifindex) else {
                    let names: Vec<&str> = ifaces.iter().map(|i| i.name.as_str()).collect();
                    let dev = interface_name(ifindex);
                    bail!(
                        "target {addr} of group {} is reached through {dev}, which is not one of lb's interfaces ({}): run lb on it too (-i {dev}), or route the target through one of them",
                        group.name,
                        names.join(", "),
                    );
                };
                let out = &ifaces[interface];
                if group.forwarding == Forwarding::Ipip && addr.is_ipv6() {
                    if out.global_ipv6().is_none() {
                        bail!(
                            "target {addr} of group {} is named by an IPv6 address, and {}, which reaches it, has no global IPv6 address to send ipip from: give {} one, or name the target by its IPv4 address",
                            group.name,
                            out.name,
                            out.name
                        );
                    }
                    // An IPv6 client told "packet too big" never goes below 1280 bytes.
                    if out.mtu < MIN_IPV6_MTU + IPV6_HEADER && config.serves_ipv6(&group.name) {
                        bail!(
                            "group {} carries IPv6 in IPv6 out of {}, whose MTU {} leaves less than IPv6's minimum of {MIN_IPV6_MTU} bytes inside: give {} an MTU of at least {}",
                            group.name,
                            out.name,
                            out.mtu,
                            out.name,
                            MIN_IPV6_MTU + IPV6_HEADER
                        );
                    }
                }
                if group.forwarding == Forwarding::Dsr
                    && let Some(gw) = gateway
                {
                    bail!(
                        "target {addr} of group {} is behind gateway {gw}: dsr needs targets on the same layer-2 segment as {}; use `forwarding: ipip` for routed targets",
                        group.name,
                        ifaces[interface].name
                    );
                }
                routes.insert(addr, (interface, gateway.unwrap_or(addr)));
            }
        }
        for &addr in draining {
            if let Ok((ifindex, gateway)) = self.route_to(addr).await
                && let Some(interface) = position_of(ifaces, ifindex)
            {
                routes.insert(addr, (interface, gateway.unwrap_or(addr)));
            }
        }
        Ok(routes)
    }

    /// Uses `routes` (of the config now in force) from now on; forgets neighbours no route
    /// goes through any more.
    pub fn use_routes(&mut self, routes: Routes) {
        self.routes = routes;
        let needed: HashSet<(usize, IpAddr)> = self.routes.values().copied().collect();
        self.macs.retain(|hop, _| needed.contains(hop));
        self.rechecking.retain(|hop| needed.contains(hop));
    }

    /// The kernel's route to `dst`: the interface index and the gateway, if any.
    async fn route_to(&self, dst: IpAddr) -> Result<(u32, Option<IpAddr>)> {
        let question = match dst {
            IpAddr::V4(dst) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, 32)
                .build(),
            IpAddr::V6(dst) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst, 128)
                .build(),
        };
        let route = self
            .handle
            .route()
            .get(question)
            .execute()
            .try_next()
            .await
            .map_err(|e| anyhow!("no route to {dst}: {e}"))?
            .ok_or_else(|| anyhow!("no route to {dst}"))?;
        let mut found = (None, None);
        for attribute in route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => found.0 = Some(index),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => found.1 = Some(gw.into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => found.1 = Some(gw.into()),
                _ => {}
            }
        }
        let ifindex = found
            .0
            .ok_or_else(|| anyhow!("the route to {dst} leaves through no interface"))?;
        Ok((ifindex, found.1))
    }

    /// Learns the MACs not known yet from the kernel's neighbour table, and asks the kernel to
    /// resolve those it does not have (see [`NextHops::probe_unknown`]).
    pub async fn learn(&mut self, ifaces: &[Interface]) -> Result<()> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut table = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(entry) = table
                .try_next()
                .await
                .context("reading the neighbour table")?
            {
                if let Some(event) = neighbour_event(entry, false) {
                    self.on_event(ifaces, &event);
                }
            }
        }
        self.probe_unknown(ifaces);
        Ok(())
    }

    /// Has the kernel resolve every neighbour whose MAC lb needs and does not know, by sending
    /// it an empty UDP datagram (to the discard port): the kernel answers with its neighbour
    /// table's event once it knows.
    pub fn probe_unknown(&self, ifaces: &[Interface]) {
        for (interface, neighbour) in self.unknown() {
            probe(&ifaces[interface].name, neighbour);
        }
    }

    /// Has the kernel resolve `target`'s MAC afresh, when the target stopped answering: it may
    /// have been replaced by a host with the same address and another MAC, which the kernel's
    /// neighbour table would otherwise notice only after its reachable time (up to 45 s) and
    /// its probes. Its entry is deleted, if it still holds the MAC lb uses (the kernel may have
    /// learnt the new one meanwhile), and the kernel asked for the MAC again at once. Only for
    /// a target that is its own next hop: a gateway serves other targets too.
    pub fn recheck(&mut self, target: &IpAddr, ifaces: &[Interface]) {
        let Some(&(interface, neighbour)) = self.routes.get(target) else {
            return;
        };
        let Some(&used) = self.macs.get(&(interface, neighbour)) else {
            return;
        };
        if neighbour != *target {
            return;
        }
        self.rechecking.insert((interface, neighbour));
        let (handle, iface) = (self.handle.clone(), ifaces[interface].clone());
        tokio::spawn(async move {
            match forget_if_still(&handle, iface.index, neighbour, used).await {
                Ok(()) => probe(&iface.name, neighbour),
                Err(e) => tracing::debug!("deleting the neighbour entry of {neighbour}: {e}"),
            }
        });
    }

    /// The neighbours lb needs whose MAC it does not know.
    pub fn unknown(&self) -> Vec<(usize, IpAddr)> {
        let mut unknown: Vec<(usize, IpAddr)> = self
            .routes
            .values()
            .filter(|hop| !self.macs.contains_key(hop))
            .copied()
            .collect();
        unknown.sort();
        unknown.dedup();
        unknown
    }

    /// The next hop of a target, if its MAC is known.
    pub fn get(&self, target: &IpAddr) -> Option<NextHop> {
        let &(interface, neighbour) = self.routes.get(target)?;
        let mac = *self.macs.get(&(interface, neighbour))?;
        Some(NextHop { interface, mac })
    }

    /// Records a neighbour event; whether it changed the MAC of a neighbour lb needs.
    pub fn on_event(&mut self, ifaces: &[Interface], event: &Event) -> bool {
        let Event::Neighbour {
            ifindex,
            addr,
            mac,
            failed,
        } = *event
        else {
            return false;
        };
        let Some(interface) = position_of(ifaces, ifindex) else {
            return false;
        };
        let key = (interface, addr);
        if !self.routes.values().any(|hop| *hop == key) {
            return false;
        }
        match mac {
            Some(mac) => {
                self.rechecking.remove(&key);
                self.macs.insert(key, mac) != Some(mac)
            }
            // Deleted by lb's recheck, and being resolved again: the old MAC holds meanwhile.
            None if !failed && self.rechecking.contains(&key) => false,
            None => {
                self.rechecking.remove(&key);
                self.macs.remove(&key).is_some()
            }
        }
    }
}

/// Has the kernel resolve `neighbour`'s MAC on `dev` (by ARP or neighbour discovery) by
/// sending it an empty UDP datagram (to the discard port).
fn probe(dev: &str, neighbour: IpAddr) {
    let any: IpAddr = match neighbour {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    if let Ok(socket) = UdpSocket::bind(IpSocketAddr::new(any, 0)) {
        let _ = set_socket_option(&socket, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev);
        let _ = socket.send_to(&[], IpSocketAddr::new(neighbour, 9));
    }
}

/// Deletes the kernel's neighbour entry for `addr` on `ifindex` if it still holds `mac`.
async fn forget_if_still(
    handle: &Handle,
    ifindex: u32,
    addr: IpAddr,
    mac: [u8; 6],
) -> Result<(), rtnetlink::Error> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let mut table = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute();
    while let Some(entry) = table.try_next().await? {
        let holds = neighbour_event(entry.clone(), false)
            == Some(Event::Neighbour {
                ifindex,
                addr,
                mac: Some(mac),
                failed: false,
            });
        if holds {
            return handle.neighbours().del(entry).execute().await;
        }
    }
    Ok(())
}

/// The name of interface `index`, or the index if it has none.
fn interface_name(index: u32) -> String {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL-terminated, into `name`.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return format!("interface {index}");
    }
    // SAFETY: filled and NUL-terminated just above.
    unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// What a message of the kernel's means to lb, if anything.
fn event_of(message: RouteNetlinkMessage) -> Option<Event> {
    match message {
        RouteNetlinkMessage::NewNeighbour(n) => neighbour_event(n, false),
        RouteNetlinkMessage::DelNeighbour(n) => neighbour_event(n, true),
        RouteNetlinkMessage::NewLink(LinkMessage { header, .. }) => Some(Event::Link {
            ifindex: header.index,
            up: header.flags.contains(LinkFlags::Up | LinkFlags::LowerUp),
        }),
        RouteNetlinkMessage::DelLink(LinkMessage { header, .. }) => Some(Event::LinkRemoved {
            ifindex: header.index,
        }),
        _ => None,
    }
}

/// A neighbour entry (ARP's or neighbour discovery's) as an event: its MAC while the kernel
/// holds one it trusts (a stale entry still carries the last MAC that answered), none once
/// resolution failed or the entry went.
fn neighbour_event(n: NeighbourMessage, deleted: bool) -> Option<Event> {
    let (mut addr, mut lladdr) = (None, None);
    for attribute in n.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(a.into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => addr = Some(a.into()),
            NeighbourAttribute::LinkLayerAddress(bytes) => lladdr = <[u8; 6]>::try_from(bytes).ok(),
            _ => {}
        }
    }
    let usable = matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    );
    Some(Event::Neighbour {
        ifindex: n.header.ifindex,
        addr: addr?,
        mac: lladdr.filter(|_| usable && !deleted),
        failed: !deleted && n.header.state == NeighbourState::Failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: NeighbourState, mac: Option<[u8; 6]>) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        n.header.ifindex = 2;
        n.header.state = state;
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                Ipv4Addr::new(198, 51, 100, 11),
            )));
        if let Some(mac) = mac {
            n.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        n
    }

    /// A stale entry still carries the MAC that last answered; a failed or incomplete one, or
    /// one that went, carries none.
    #[test]
    fn a_neighbour_entry_gives_a_mac_only_while_the_kernel_trusts_it() {
        let mac = [2, 0, 0, 0, 0, 0x11];
        let event = |n, deleted| match neighbour_event(n, deleted) {
            Some(Event::Neighbour { mac, .. }) => mac,
            other => panic!("{other:?}"),
        };
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
        ] {
            assert_eq!(
                event(entry(state, Some(mac)), false),
                Some(mac),
                "{state:?}"
            );
        }
        assert_eq!(
            event(entry(NeighbourState::Reachable, Some(mac)), true),
            None
        );
        assert_eq!(event(entry(NeighbourState::Failed, Some(mac)), false), None);
        assert_eq!(event(entry(NeighbourState::Incomplete, None), false), None);
        // Neighbour discovery's entries alike.
        let mut v6 = entry(NeighbourState::Reachable, Some(mac));
        v6.header.family = AddressFamily::Inet6;
        let addr6: Ipv6Addr = "2001:db8:1::11".parse().unwrap();
        v6.attributes[0] = NeighbourAttribute::Destination(NeighbourAddress::Inet6(addr6));
        assert_eq!(
            neighbour_event(v6, false),
            Some(Event::Neighbour {
                ifindex: 2,
                addr: addr6.into(),
                mac: Some(mac),
                failed: false
            })
        );
    }
}
