"""The local control socket: how the CLI talks to the node running in the same home.

A Unix socket in the home dir (mode 0600: only the owner may steer the node), one JSON
request line in, one JSON response line out. Failures come back as `{"ok": false, "error": ...}`
and never take the node down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_FILE = "control.sock"
#: A request is a short command; a larger line is a mistake or an attack.
MAX_REQUEST = 64 * 1024
#: Responses can hold the whole member list of a large cluster.
MAX_RESPONSE = 64 * 1024 * 1024

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlError(RuntimeError):
    """The node refused a command, or no node is running in the home."""


#: sun_path holds 108 bytes on Linux; longer homes are reached through /proc/self/fd.
MAX_SUN_PATH = 100


def socket_path(home: Path) -> Path:
    return home / SOCKET_FILE


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for `path` short enough for a Unix socket address.

    A home deep in a file system (as test runners and some distributions make them) is
    reached through an open descriptor of its directory, so the socket always lives in the
    home itself.
    """
    if len(os.fsencode(path)) <= MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def serve(home: Path, handler: Handler) -> asyncio.AbstractServer:
    path = socket_path(home)
    if path.exists():
        if _alive(path):
            raise ControlError(f"a node is already running in {home}")
        path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            response = await _dispatch(line, handler)
            writer.write(json.dumps(response, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    old = os.umask(0o177)
    try:
        with _reachable(path) as name:
            server = await asyncio.start_unix_server(on_client, path=name, limit=MAX_REQUEST)
    finally:
        os.umask(old)
    return server


async def _dispatch(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        request = json.loads(line)
        cmd = request["cmd"]
        args = request.get("args", {})
        if not isinstance(cmd, str) or not isinstance(args, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return {"ok": False, "error": "malformed request"}
    try:
        return {"ok": True, "result": await handler(cmd, args)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # report, never crash the node
        log.exception("control command %s failed", cmd)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, _reachable(path) as name:
        try:
            sock.connect(name)
        except OSError:
            return False
    return True


def call(home: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Run `cmd` on the node running in `home` (blocking; for the CLI)."""
    path = socket_path(home)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _reachable(path) as name:
                sock.connect(name)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(
                f"no swarmnode is running in {home} (start one with `swarmnode join`)"
            ) from exc
        sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise ControlError("response from the node is too large")
    try:
        response = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlError("the node sent a malformed response") from exc
    if not response.get("ok"):
        raise ControlError(response.get("error", "unknown error"))
    return response.get("result")
