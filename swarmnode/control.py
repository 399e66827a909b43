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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
            result = response.get("result")
            if isinstance(result, AsyncIterator):
                response = await _stream(result, writer)
            writer.write(_line(response))
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


def _line(value: Any) -> bytes:
    return json.dumps(value, default=str).encode() + b"\n"


async def _stream(items: AsyncIterator[Any], writer: asyncio.StreamWriter) -> dict[str, Any]:
    """Send each item of a streaming command as its own line (`exec` output as it comes);
    the closing line says how the command ended."""
    try:
        async for item in items:
            writer.write(_line({"item": item}))
            await writer.drain()
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:  # report, never crash the node
        log.exception("streaming command failed")
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        with contextlib.suppress(Exception):
            await items.aclose()  # type: ignore[attr-defined]
    return {"ok": True, "result": None}


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


def _connect(home: Path, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _reachable(socket_path(home)) as name:
            sock.connect(name)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise ControlError(
            f"no swarmnode is running in {home} (start one with `swarmnode join`)"
        ) from exc
    return sock


def stream(home: Path, cmd: str, **args: Any) -> Iterator[Any]:
    """Run a streaming command (`exec`): yields each item as the node sends it, then ends, or
    raises ControlError with the node's reason. No read timeout: a remote command may be
    silent for as long as it likes."""
    with _connect(home, None) as sock, sock.makefile("rb") as lines:
        sock.sendall(_line({"cmd": cmd, "args": args}))
        for raw in lines:
            try:
                msg = json.loads(raw)
            except ValueError as exc:
                raise ControlError("the node sent a malformed response") from exc
            if "item" in msg:
                yield msg["item"]
                continue
            if not msg.get("ok"):
                raise ControlError(msg.get("error", "unknown error"))
            return
    raise ControlError("the node closed the connection mid-command")


def call(home: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Run `cmd` on the node running in `home` (blocking; for the CLI)."""
    with _connect(home, timeout) as sock:
        sock.sendall(_line({"cmd": cmd, "args": args}))
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
