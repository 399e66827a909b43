"""Finding peers on the local link with multicast DNS (python-zeroconf, asyncio flavour).

Each node registers one `_swarmnode._tcp.local.` service instance, named by a prefix of its node
id, with its listening port, the IP addresses it reports, and TXT properties:

    id       the full 52-character node id (the instance name is only a prefix of it)
    cluster  the cluster id it belongs to, empty while it has none
    name     its human-readable name
    v        the discovery protocol version, "1"

and browses for everyone else's. A sighting is only a hint of where a node id might be
reached: mDNS is unauthenticated, so anybody on the link can claim any id, and the transport's
CURVE handshake (server key derived from the id) is what proves it. That is why sightings
carry the id and the link-local nature of mDNS is not trusted for anything else. Malformed
announcements are dropped and counted, never raised into the node.

mDNS does not cross routed hops; seeds (configured, Tailscale) cover that.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from net.addresses import join_hostport, split_hostport
from swarmnode.identity import is_node_id

log = logging.getLogger(__name__)

SERVICE_TYPE = "_swarmnode._tcp.local."
PROTOCOL_VERSION = 1
INSTANCE_PREFIX_LEN = 16  # 80 bits of the key: unique among the nodes of any real link
MAX_NAME_BYTES = 63
MAX_CLUSTER_BYTES = 64
RESOLVE_TIMEOUT_MS = 3000
#: Resolutions in flight at once: a real link has a handful of swarmnodes, so a flood of fake
#: service records beyond this is dropped (counted as `busy`) instead of growing tasks.
MAX_RESOLVING = 32

Interfaces = InterfaceChoice | Sequence[str | int]
OnFound = Callable[["Sighting"], object]


class TxtError(ValueError):
    """A TXT record that is not a swarmnode announcement this version understands."""


@dataclass(frozen=True)
class Sighting:
    """A peer announced on the link: who it claims to be and where it says it listens."""

    id: str
    cluster: str
    name: str
    addresses: tuple[str, ...]  # "host:port", IPv6 bracketed


def _check_text(label: str, value: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TxtError(f"{label} must be text")
    if len(value.encode("utf-8")) > limit:
        raise TxtError(f"{label} longer than {limit} bytes")
    if not value.isprintable():
        raise TxtError(f"{label} holds control characters")
    return value


def encode_txt(node_id: str, cluster: str = "", name: str = "") -> dict[str, str]:
    """The TXT properties announcing a node; TxtError for values a peer would reject."""
    if node_id != node_id.lower() or not is_node_id(node_id):
        raise TxtError(f"not a node id: {node_id!r}")
    return {
        "id": node_id,
        "cluster": _check_text("cluster", cluster, MAX_CLUSTER_BYTES),
        "name": _check_text("name", name, MAX_NAME_BYTES),
        "v": str(PROTOCOL_VERSION),
    }


def _text(properties: Mapping[bytes | str, bytes | str | None], key: str) -> str | None:
    raw = properties.get(key.encode(), properties.get(key))
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TxtError(f"{key} is not UTF-8") from exc


def decode_txt(properties: Mapping[bytes | str, bytes | str | None]) -> tuple[str, str, str]:
    """(id, cluster, name) from TXT properties; TxtError if they are not a v1 announcement.

    `id` and `v` are required; `cluster` and `name` default to empty; unknown keys are ignored
    so later versions can add some.
    """
    version = _text(properties, "v")
    if version != str(PROTOCOL_VERSION):
        raise TxtError(f"unsupported protocol version {version!r}")
    node_id = _text(properties, "id")
    # ids are compared as strings everywhere, so only the canonical lower-case spelling counts
    if node_id is None or node_id != node_id.lower() or not is_node_id(node_id):
        raise TxtError(f"not a node id: {node_id!r}")
    cluster = _check_text("cluster", _text(properties, "cluster") or "", MAX_CLUSTER_BYTES)
    name = _check_text("name", _text(properties, "name") or "", MAX_NAME_BYTES)
    return node_id, cluster, name


def _dialable(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if a peer on the link could dial it (no loopback, link-local, ...)."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if parsed.is_loopback or parsed.is_link_local or parsed.is_unspecified or parsed.is_multicast:
        return None
    return parsed


def parse_sighting(
    properties: Mapping[bytes | str, bytes | str | None], ips: Iterable[str], port: int | None
) -> Sighting:
    """A Sighting from a resolved service; TxtError when it cannot be one.

    Addresses a peer cannot dial (loopback, link-local) are left out; a service left without
    any address, or without a valid port, is rejected.
    """
    node_id, cluster, name = decode_txt(properties)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise TxtError(f"bad port {port!r}")
    addresses: list[str] = []
    for ip in ips:
        parsed = _dialable(ip)
        if parsed is not None:
            entry = join_hostport(str(parsed), port)
            if entry not in addresses:
                addresses.append(entry)
    if not addresses:
        raise TxtError("no usable address")
    return Sighting(node_id, cluster, name, tuple(addresses))


def instance_name(node_id: str) -> str:
    """The service instance's full name: the id prefix under the swarmnode service type."""
    return f"{node_id[:INSTANCE_PREFIX_LEN]}.{SERVICE_TYPE}"


def advertised_ips(addresses: Iterable[str]) -> list[str]:
    """The IP literals among "host:port" / "ADDR" entries that are worth announcing on a link."""
    out: list[str] = []
    for entry in addresses:
        try:
            host, _ = split_hostport(entry, default_port=1)
        except ValueError:
            continue
        parsed = _dialable(host)
        if parsed is not None and str(parsed) not in out:
            out.append(str(parsed))
    return out


class Mdns:
    """Advertise this node and report every other swarmnode on the link to `on_found`.

    `addresses` are the node's reported addresses ("host:port" or bare IPs); their IP literals
    go into the A/AAAA records, the port announced is `port` (the listening port). With no
    usable IP the node only browses. `interfaces` is passed to zeroconf: InterfaceChoice.All
    or a list of local IPs (e.g. the veth address in a network-namespace test). `on_found` runs
    in the event loop for each peer found or updated, never for this node; it may be a
    coroutine function.
    """

    def __init__(
        self,
        node_id: str,
        port: int,
        addresses: Iterable[str],
        on_found: OnFound,
        *,
        cluster: str = "",
        name: str = "",
        interfaces: Interfaces = InterfaceChoice.All,
        ip_version: IPVersion | None = None,
    ) -> None:
        self.node_id = node_id
        self.port = port
        self._txt = encode_txt(node_id, cluster, name)
        self._ips = advertised_ips(addresses)
        self._on_found = on_found
        self._interfaces = interfaces
        self._ip_version = ip_version
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.drops: Counter[str] = Counter()

    @property
    def malformed(self) -> int:
        """Announcements ignored because their TXT record, port or addresses were unusable."""
        return self.drops["malformed"]

    def _service_info(self) -> AsyncServiceInfo:
        prefix = self.node_id[:INSTANCE_PREFIX_LEN]
        return AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(self.node_id),
            port=self.port,
            properties=self._txt,
            server=f"swarmnode-{prefix}.local.",
            parsed_addresses=list(self._ips),
        )

    async def start(self) -> None:
        """Open the mDNS sockets, start browsing, and announce this node.

        Raises what zeroconf raises when the sockets cannot be opened, or
        NonUniqueNameException when another host already announces this node id.
        """
        if self._azc is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._azc = AsyncZeroconf(interfaces=self._interfaces, ip_version=self._ip_version)
        try:
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
            if self._ips:
                self._info = self._service_info()
                announced = await self._azc.async_register_service(self._info)
                await announced
            else:
                log.warning("mDNS: no IP address to announce; only looking for peers")
        except BaseException:
            await self.close()
            raise

    async def update(
        self,
        *,
        cluster: str | None = None,
        name: str | None = None,
        addresses: Iterable[str] | None = None,
    ) -> None:
        """Re-announce with a new cluster id, name or address list (e.g. after joining)."""
        self._txt = encode_txt(
            self.node_id,
            self._txt["cluster"] if cluster is None else cluster,
            self._txt["name"] if name is None else name,
        )
        if addresses is not None:
            self._ips = advertised_ips(addresses)
        if self._azc is None:
            return
        if self._info is not None and not self._ips:
            await (await self._azc.async_unregister_service(self._info))
            self._info = None
        elif self._info is not None:
            self._info = self._service_info()
            await (await self._azc.async_update_service(self._info))
        elif self._ips:
            self._info = self._service_info()
            await (await self._azc.async_register_service(self._info))

    async def close(self) -> None:
        """Stop browsing, send goodbyes for this node's service and close the sockets."""
        azc, self._azc = self._azc, None
        if azc is None:
            return
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._again.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        try:
            if self._info is not None:
                await azc.async_unregister_all_services()
        finally:
            self._info = None
            await azc.async_close()

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser callback: resolve added or updated instances (other than our own)."""
        if state_change is ServiceStateChange.Removed:
            return
        if name.lower() == instance_name(self.node_id).lower() or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._schedule_resolve, name)

    def _schedule_resolve(self, name: str) -> None:
        """One resolution per instance at a time; a change during it triggers one more."""
        if self._azc is None:
            return
        if name in self._tasks:
            self._again.add(name)
            return
        if len(self._tasks) >= MAX_RESOLVING:
            self.drops["busy"] += 1
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._forget(name, done))

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if name in self._again:
            self._again.discard(name)
            self._schedule_resolve(name)

    async def _resolve(self, name: str) -> None:
        azc = self._azc
        if azc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(azc.zeroconf, RESOLVE_TIMEOUT_MS):
            self.drops["unresolved"] += 1
            log.debug("mDNS: %s did not resolve", name)
            return
        try:
            sighting = parse_sighting(info.properties, info.parsed_addresses(), info.port)
        except TxtError as exc:
            self.drops["malformed"] += 1
            log.info("mDNS: ignoring %s: %s", name, exc)
            return
        if sighting.id == self.node_id:
            self.drops["self"] += 1
            return
        try:
            result = self._on_found(sighting)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("mDNS: on_found failed for %s", sighting.id)

    async def __aenter__(self) -> Mdns:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "INSTANCE_PREFIX_LEN",
    "MAX_RESOLVING",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "InterfaceChoice",
    "Mdns",
    "Sighting",
    "TxtError",
    "advertised_ips",
    "decode_txt",
    "encode_txt",
    "instance_name",
    "parse_sighting",
]
