"""The binhost role in the node: it takes in every binary package the swarm builds, answers
members' catalog queries and serves the directory to Portage clients over HTTP.

The logic is in swarmnode/portage/binhost.py. Here: a finished job's packages are fetched by
digest, pinned (`binhost`, so members can fetch them from here) and ingested one at a time,
retention runs after each; `binhost.query` (members only, bounded) is answered from the
catalog; a read-only HTTP listener (`binhost_listen`) serves `Packages` and the packages.

The listener never answers 304 and sends no Last-Modified: a Portage client keeps its cached
index when told "not modified", and once kept a stale one that way; it compares the index's
TIMESTAMP itself (bintree_tool.py makes every rewrite's TIMESTAMP larger).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgpack

from net.addresses import split_hostport
from net.httpd import Request, Response, Server
from net.transport import Inbound
from net.wire import DropCounter
from swarmnode.artifact_service import ArtifactError
from swarmnode.portage.binhost import (
    BINARY_PACKAGES,
    MAX_QUERY_KEYS,
    Binhost,
    BinhostError,
    Catalog,
    Signing,
    binhost_url,
    package_key,
    parse_found,
    parse_keys,
    served_file,
    valid_key,
)
from swarmnode.tasks import TaskSet
from swarmnode.worker import unpack_map

if TYPE_CHECKING:
    from swarmnode.ledger import Job
    from swarmnode.node import Node

log = logging.getLogger(__name__)

BINHOST_QUERY, BINHOST_REPLY = "binhost.query", "binhost.query_reply"
#: The artifact-store pin that keeps the packages this binhost holds.
PIN = "binhost"
#: The record fact that names a binhost's URL (what clients set as PORTAGE_BINHOST).
FACT = "binhost"
CATALOG_FILE = "binhost.db"
#: Bytes read from disk per write to an HTTP client.
CHUNK = 256 * 1024


class BinhostService:
    def __init__(self, node: Node) -> None:
        self.node = node
        config = node.node_config
        self.enabled = "binhost" in config.roles
        self.root = Path(config.binhost_dir) if config.binhost_dir else node.home / "binhost"
        self.binhost: Binhost | None = None
        if self.enabled:
            signing = (Signing(Path(config.binhost_gpg_home), config.binhost_gpg_key)
                       if config.binhost_gpg_home and config.binhost_gpg_key else None)
            self.binhost = Binhost(self.root, node.portage, Catalog(node.home / CATALOG_FILE),
                                   keep=config.binhost_keep, signing=signing)
        self.http = BinhostHttp(self.root, node.drops)
        self._tasks = TaskSet()

    @property
    def url(self) -> str | None:
        """PORTAGE_BINHOST for this node's listener (None: no binhost, or no listener)."""
        listen = self.node.node_config.binhost_listen
        return binhost_url(listen, self.node.addresses) if self.enabled and listen else None

    def facts(self) -> dict[str, str]:
        return {FACT: self.url} if self.url else {}

    def status(self) -> dict[str, Any]:
        return {"binhost_url": self.url if self.http.serving else None} if self.enabled else {}

    async def start(self) -> None:
        """Serve `binhost_listen` (a failure is logged and an event: the node runs on)."""
        listen = self.node.node_config.binhost_listen
        if not (self.enabled and listen):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            await self.http.start(listen)
        except OSError as exc:
            log.error("cannot serve the binhost on %s: %s", listen, exc)
            self.node.event("binhost_listen_failed", {"listen": listen, "error": str(exc)})
            return
        log.info("binhost at %s (PORTAGE_BINHOST)", self.url)
        if self.node.portage is None:
            self.node.event("binhost_unindexed", {
                "reason": "no Portage on this node: packages are kept but no Packages index "
                          "can be written (set `emerge` in config.toml)"})

    async def close(self) -> None:
        await self._tasks.close()
        await self.http.stop()
        if self.binhost is not None:
            self.binhost.catalog.close()

    # -- ingest ---------------------------------------------------------------------------

    def on_job_done(self, job: Job) -> None:
        """A job finished: on a binhost, its binary packages go in (one at a time)."""
        if self.binhost is not None and any(p.endswith(BINARY_PACKAGES)
                                            for p, _d in job.artifacts):
            self._tasks.spawn(self._collect(job))

    async def _collect(self, job: Job) -> None:
        assert self.binhost is not None
        key = package_key(await self.node.builds.job_env(job))
        store = self.node.artifacts.store
        for path, digest in job.artifacts:
            if not path.endswith(BINARY_PACKAGES):
                continue
            store.pin(digest, PIN)  # before the fetch: gc cannot slip between
            try:
                await self.node.artifacts.fetch(digest, [job.node] if job.node else [])
                got = await self.binhost.ingest(store.path(digest), digest=digest, key=key,
                                                name=path.removeprefix("binpkgs/"))
            except ArtifactError as exc:
                self.node.event("artifact_missing", {"job": job.key, "digest": digest,
                                                     "error": str(exc)[:200]})
                continue
            except BinhostError as exc:
                self.node.event("binhost_ingest_failed", {"job": job.key, "path": path,
                                                          "error": str(exc)[:400]})
                continue
            self.node.event("binhost_ingested", {"job": job.key, "cpv": got.cpv,
                                                 "build_id": got.build_id, "path": got.path})
            await self._prune()

    async def _prune(self) -> None:
        assert self.binhost is not None
        try:
            pruned = await self.binhost.prune()
        except BinhostError as exc:
            self.node.event("binhost_prune_failed", {"error": str(exc)[:400]})
            return
        for digest in pruned.unused:
            self.node.artifacts.store.unpin(digest, PIN)
        if pruned.removed or pruned.refused:
            self.node.event("binhost_pruned", {"removed": list(pruned.removed),
                                               "refused": list(pruned.refused)})

    # -- the catalog query ----------------------------------------------------------------

    def handles(self, msg_type: str) -> bool:
        return msg_type == BINHOST_QUERY

    def on_message(self, inbound: Inbound) -> None:
        """A member's `binhost.query` {keys}: answered with `found` {key: [path, digest]} for
        the keys the catalog knows. Bad keys are dropped and counted; a body that is not a
        map with a list of at most MAX_QUERY_KEYS is dropped whole, unanswered."""
        try:
            body = unpack_map(inbound.envelope.body)
            keys, bad = parse_keys(body.get("keys"))
        except (ValueError, BinhostError):
            self.node.drops.drop("malformed_binhost_query")
            return
        if bad:
            self.node.drops["binhost_bad_key"] += bad
        found = self.binhost.catalog.lookup(keys) if self.binhost is not None else {}
        inbound.reply(BINHOST_REPLY, msgpack.packb({
            "rid": body.get("rid"), "binhost": self.binhost is not None,
            "found": {k: list(v) for k, v in found.items()}}))


async def query_binhost(node: Node, binhost_id: str, keys: list[str],
                        timeout: float) -> dict[str, tuple[str, str]]:
    """Ask the binhost `binhost_id` (a member id) which of `keys` it holds: key -> (path
    below its binhost directory, sha256 of the package as its job produced it, fetchable
    from that member by digest), the newest build kept for each. Invalid keys are left out;
    MAX_QUERY_KEYS per request. Raises BinhostError when it does not answer within
    `timeout` in all, or answers that it is no binhost."""
    wanted = list(dict.fromkeys(k for k in keys if valid_key(k)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: dict[str, tuple[str, str]] = {}
    for i in range(0, len(wanted), MAX_QUERY_KEYS):
        chunk = wanted[i:i + MAX_QUERY_KEYS]
        reply = await node.builds._request(binhost_id, BINHOST_QUERY, {"keys": chunk},
                                           max(0.0, deadline - loop.time()))
        if reply is None:
            raise BinhostError(f"{node.member_name(binhost_id)} did not answer the binhost "
                               f"query in {timeout:g} s")
        if reply.get("binhost") is False:
            raise BinhostError(f"{node.member_name(binhost_id)} is not a binhost")
        found.update(parse_found(reply.get("found"), set(chunk)))
    return found


class BinhostHttp:
    """GET and HEAD of `served_file`s under the binhost directory; nothing else."""

    def __init__(self, root: Path, drops: DropCounter | None = None) -> None:
        self.root = root
        self.bound: tuple[str, int] | None = None
        self._server: Server | None = None
        self._drops = drops

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self, listen: str) -> tuple[str, int]:
        """Listen on `listen` (HOST:PORT; port 0: any free one); (host, port) bound. Raises
        OSError when it cannot."""
        host, port = split_hostport(listen, 0, any_port=True)
        server = Server(self._serve, self._drops)
        self.bound = await server.start(host, port)
        self._server = server
        return self.bound

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    async def _serve(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response.text("GET or HEAD only", 405, headers={"Allow": "GET, HEAD"})
        path = await asyncio.to_thread(served_file, self.root, request.raw_path)
        if path is None:
            return Response.text("not found", 404)
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except OSError:
            return Response.text("not found", 404)
        size = os.fstat(f.fileno()).st_size  # the file opened (Portage replaces by rename)
        headers = {"Content-Type": "text/plain; charset=utf-8" if path.name == "Packages"
                   else "application/octet-stream", "Cache-Control": "no-cache"}
        return Response(headers=headers, stream=_chunks(f), length=size)


async def _chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    """The file's bytes, read off the loop; the file is closed however the reading ends."""
    try:
        while data := await asyncio.to_thread(f.read, CHUNK):
            yield data
    finally:
        f.close()
