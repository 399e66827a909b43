"""Cluster settings kept in a node's home: which cluster it belongs to and how it listens."""

from __future__ import annotations

import time
from pathlib import Path

from net.addresses import reported_addresses, split_hostport
from swarmnode import token as tokens
from swarmnode.identity import load_or_create
from swarmnode.options import DEFAULT_LISTEN, DEFAULT_PORT
from swarmnode.store import Store


class ClusterError(RuntimeError):
    """The home is not in the state a command needs."""


def addresses_for(listen: str, advertise: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    host, port = split_hostport(listen, DEFAULT_PORT)
    return reported_addresses(host, port, list(advertise))


def init(home: Path, name: str, listen: str, advertise: list[str], ttl: int) -> str:
    """Make a new cluster with this home's node as founder; returns a join token."""
    if not name or len(name) > 64:
        raise ClusterError("the cluster name must be 1 to 64 characters")
    split_hostport(listen, DEFAULT_PORT)  # validate before touching the store
    identity = load_or_create(home)
    store = Store(home)
    try:
        if store.get("cluster_id"):
            raise ClusterError(
                f"{home} already belongs to cluster {store.get('cluster_name')!r}; "
                "use another --home for a new cluster"
            )
        cluster_id = tokens.new_cluster_id(identity.id)
        store.put(
            cluster_id=cluster_id,
            cluster_name=name,
            founder=True,
            admitted=True,
            listen=listen,
            advertise=list(advertise),
        )
        store.add_event("cluster_created", {"cluster": name, "by": identity.id})
        return _issue(store, identity, ttl)
    finally:
        store.close()


def _issue(store: Store, identity, ttl: int, addresses: tuple[str, ...] | None = None) -> str:
    if addresses is None:
        addresses = addresses_for(
            store.get("listen", DEFAULT_LISTEN), store.get("advertise", [])
        )
    made = tokens.issue(
        identity,
        store.get("cluster_id"),
        store.get("cluster_name"),
        addresses,
        ttl,
        int(time.time()),
    )
    return made.encode()


def offline_token(home: Path, ttl: int) -> str:
    """A token made without a running node (from the stored listen/advertise settings)."""
    store = Store(home)
    try:
        if not store.get("cluster_id"):
            raise ClusterError(f"{home} is not in a cluster: run `swarmnode init` first")
        if not store.get("admitted"):
            raise ClusterError("this node is not an admitted member; only members issue tokens")
        if not tokens.is_founder(store.get("cluster_id"), load_or_create(home).id):
            # Whether another member holds the operate right is known only to a running node.
            raise ClusterError("only operators issue join tokens, and a stopped node cannot "
                               "check that it is one: start it (`swarmnode join`) and ask again")
        return _issue(store, load_or_create(home), ttl)
    finally:
        store.close()
