"""Ready-made topologies, starting with the one from the original incident.

Why: the incident was a node behind a NAT being recorded under the gateway's address, plus a
routed subnet that mDNS cannot reach. Building it in one call keeps every test that reproduces
it on the same, reviewed network.

    far 172.30.0.9 --- (172.30.0.1) gw (192.168.10.1) --- tarn 192.168.10.25  [masqueraded]
                              (10.42.0.1)
                                   |
                          switch `lan` (bridge)
                           |               |
                   lan1 10.42.0.50   lan2 10.42.0.51   (lan3 .52, ...)

The addresses are fixed (they match the incident report); they exist only inside this lab's
namespaces, so they never collide with the machine's network or with another run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .netns import Lab

__all__ = ["IncidentTopology", "incident_topology", "lan_addr"]

LAN_CIDR = "10.42.0.0/24"
VLAN_CIDR = "192.168.10.0/24"
FAR_CIDR = "172.30.0.0/24"
GW_LAN = "10.42.0.1"
GW_VLAN = "192.168.10.1"
GW_FAR = "172.30.0.1"
TARN = "192.168.10.25"
FAR = "172.30.0.9"
_FIRST_LAN_HOST = 50
_MAX_LAN_HOSTS = 200


@dataclass(frozen=True)
class IncidentTopology:
    """Names and addresses of the incident network (host names are `Lab` node names)."""

    gw: str
    switch: str
    lan_hosts: tuple[str, ...]
    tarn: str | None
    far: str | None
    addrs: dict[str, str] = field(default_factory=dict)  # host -> its address (no prefix)
    gw_lan_if: str = ""  # gw's interface on the LAN: where masquerading happens
    lan_cidr: str = LAN_CIDR
    vlan_cidr: str = VLAN_CIDR
    far_cidr: str = FAR_CIDR
    gw_lan_addr: str = GW_LAN
    gw_vlan_addr: str = GW_VLAN
    gw_far_addr: str = GW_FAR

    def addr(self, host: str) -> str:
        """A host's address (for `gw`, its LAN-side address)."""
        return self.addrs[host]

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every end host (not the gateway, not the switch)."""
        extra = tuple(h for h in (self.tarn, self.far) if h is not None)
        return self.lan_hosts + extra


def lan_addr(index: int) -> str:
    """Address of LAN host number `index` (1-based): lan1 is 10.42.0.50."""
    return f"10.42.0.{_FIRST_LAN_HOST + index - 1}"


def incident_topology(
    lab: Lab,
    *,
    lan_hosts: int = 2,
    tarn: bool = True,
    far: bool = True,
    tarn_subnet_route: bool = False,
) -> IncidentTopology:
    """Build the incident network in `lab`; ask for fewer hosts to make a test cheaper.

    `lan_hosts` LAN hosts `lan1..lanN` (with a multicast route for mDNS and a route to the far
    subnet via gw), `tarn` on the masqueraded VLAN, `far` on the routed (not NATed) subnet.
    `tarn_subnet_route=True` also gives LAN hosts a route to the VLAN (a Tailscale-style subnet
    router): tarn's real address becomes reachable, while its outgoing traffic stays NATed.
    """
    if not 0 <= lan_hosts <= _MAX_LAN_HOSTS:
        raise ValueError(f"lan_hosts must be 0..{_MAX_LAN_HOSTS}, got {lan_hosts}")
    addrs: dict[str, str] = {"gw": GW_LAN}

    lab.host("gw")
    lab.switch("lan")
    gw_lan_if = lab.connect("gw", "lan", f"{GW_LAN}/24")
    lab.forwarding("gw")

    names: list[str] = []
    for i in range(1, lan_hosts + 1):
        name = f"lan{i}"
        addr = lan_addr(i)
        lab.host(name)
        ifname = lab.connect(name, "lan", f"{addr}/24")
        lab.multicast_route(name, ifname)
        if far:
            lab.route(name, FAR_CIDR, GW_LAN)
        if tarn and tarn_subnet_route:
            lab.route(name, VLAN_CIDR, GW_LAN)
        names.append(name)
        addrs[name] = addr

    if tarn:
        lab.host("tarn")
        lab.link("gw", "tarn", f"{GW_VLAN}/24", f"{TARN}/24")
        lab.default_route("tarn", GW_VLAN)
        lab.masquerade("gw", VLAN_CIDR, gw_lan_if)
        addrs["tarn"] = TARN

    if far:
        lab.host("far")
        lab.link("gw", "far", f"{GW_FAR}/24", f"{FAR}/24")
        lab.default_route("far", GW_FAR)
        addrs["far"] = FAR

    return IncidentTopology(
        gw="gw",
        switch="lan",
        lan_hosts=tuple(names),
        tarn="tarn" if tarn else None,
        far="far" if far else None,
        addrs=addrs,
        gw_lan_if=gw_lan_if,
    )
