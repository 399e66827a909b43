"""The signed envelope every swarmnode message travels in, and replay protection for it.

An envelope is the msgpack array ``[version, type, sender_id, epoch, seq, body, signature]``.
``signature`` is the sender's Ed25519 signature over ``DOMAIN + msgpack([version, type,
sender_id, epoch, seq, body])``. The domain prefix keeps an envelope signature from ever being
valid as a signature over anything else the same key signs (join tokens, member records).

Everything arriving from the network is hostile until proven otherwise, so `open_envelope`:

* checks the frame size before doing any work on it;
* decodes with hard msgpack limits (no maps, no extension types, short strings, at most
  seven array items), so a small frame can never make the decoder allocate much;
* requires the exact shape and types, *and* the canonical encoding: re-encoding the decoded
  array must give back the frame byte for byte. One envelope therefore has exactly one wire
  form, so frames can be deduplicated or logged by hash without a second, differently-encoded
  copy of the same signed message slipping past;
* checks the signature last, because it is the expensive step;
* raises nothing but `WireError`, whatever the input.

`ReplayGuard` then drops signed frames that were already accepted once (``epoch`` is the
sender's start time in ms, ``seq`` counts frames within that epoch).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from swarmnode import identity as _identity
from swarmnode.identity import Identity

__all__ = [
    "DOMAIN",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "REASONS",
    "DropCounter",
    "Envelope",
    "ReplayGuard",
    "Sealer",
    "WireError",
    "open_envelope",
    "seal",
]

PROTOCOL_VERSION = 1
DOMAIN = b"swarmnode-envelope-v1"

# 1 MiB. Membership gossip, heartbeats and scheduler messages are a few KiB at most; the
# largest legitimate bodies are batched member lists and job descriptions, which stay well
# below this. Build artefacts never travel inside envelopes. The cap bounds the memory and the
# signature-checking work one frame can cost a receiver before anything about it is trusted.
MAX_FRAME = 1 << 20

SIGNATURE_LEN = 64
MAX_TYPE_LEN = 32
INT_LIMIT = 1 << 63  # epoch and seq must fit a signed 64-bit integer on every implementation
_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# The longest string an envelope holds is the 52-character sender id.
_MAX_STR = 64
_FIELDS = 7

REASONS = frozenset({"oversized", "malformed", "version", "unsigned", "bad_signature", "replay"})


class WireError(ValueError):
    """A frame that must be dropped; `reason` is one of `REASONS` (use it for drop counters)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Envelope:
    """An authenticated envelope: `sender` really signed every other field."""

    version: int
    type: str
    sender: str
    epoch: int
    seq: int
    body: bytes


def _is_type(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_TYPE_LEN
        and value.isascii()
        and _TYPE_RE.fullmatch(value) is not None
    )


def _is_counter(value: object) -> bool:
    # `type(...) is int` because bool is an int subclass and msgpack decodes true/false to bool.
    return type(value) is int and 0 <= value < INT_LIMIT


def _signed_bytes(
    version: int, type_: str, sender: str, epoch: int, seq: int, body: bytes
) -> bytes:
    return DOMAIN + msgpack.packb([version, type_, sender, epoch, seq, body], use_bin_type=True)


def seal(identity: Identity, type: str, body: bytes, epoch: int, seq: int) -> bytes:
    """A signed envelope frame from `identity`.

    Refuses (with `WireError("malformed")` / `WireError("oversized")`) to produce a frame that
    `open_envelope` would reject, so a bug shows up at the sender rather than as silent drops.
    """
    if not _is_type(type):
        raise WireError("malformed", f"bad message type {type!r}")
    if not isinstance(body, bytes | bytearray | memoryview):
        raise WireError("malformed", "body must be bytes")
    if not _is_counter(epoch) or not _is_counter(seq):
        raise WireError("malformed", "epoch and seq must be ints in [0, 2**63)")
    body = bytes(body)
    sender = identity.id
    signature = identity.sign(_signed_bytes(PROTOCOL_VERSION, type, sender, epoch, seq, body))
    frame = msgpack.packb(
        [PROTOCOL_VERSION, type, sender, epoch, seq, body, signature], use_bin_type=True
    )
    if len(frame) > MAX_FRAME:
        raise WireError("oversized", f"{len(frame)} bytes > {MAX_FRAME}")
    return frame


class Sealer:
    """Seals a node's outgoing frames with its epoch and a per-epoch sequence number.

    The epoch is the wall-clock start time in ms, so it grows across restarts and peers' replay
    guards reset their window for the new incarnation. (If the clock is stepped back by more
    than the downtime, peers drop the new incarnation's frames until they evict or forget the
    old epoch; restarts are rare and NTP steps that large rarer.) Use one Sealer per identity
    per process. Thread-safe.
    """

    def __init__(self, identity: Identity, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.epoch = int(clock() * 1000)
        if not _is_counter(self.epoch):
            raise ValueError(f"clock gave an unusable epoch {self.epoch}")
        self._next_seq = 0
        self._lock = threading.Lock()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def seal(self, type: str, body: bytes) -> bytes:
        with self._lock:
            seq = self._next_seq
            if seq >= INT_LIMIT:
                raise WireError("malformed", "sequence numbers exhausted for this epoch")
            frame = seal(self.identity, type, body, self.epoch, seq)
            # Only consume the number once the frame exists, so a rejected body leaves no gap.
            self._next_seq = seq + 1
        return frame


def _decode(frame: bytes, max_size: int) -> Any:
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=_MAX_STR,
            max_bin_len=max_size,
            max_array_len=_FIELDS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:
        # msgpack signals bad input with ValueError, its own exception classes, TypeError and
        # others depending on version; any failure to decode is the sender's fault.
        raise WireError("malformed", f"not a msgpack envelope ({type(exc).__name__})") from None


def open_envelope(frame: bytes, max_size: int = MAX_FRAME) -> Envelope:
    """Authenticate and decode one frame; raises only `WireError`, for any input whatsoever.

    Order of checks: size (`oversized`), decode and shape (`malformed`), protocol version
    (`version`), signature (`unsigned` when empty, `bad_signature` otherwise). The version is
    looked at as soon as the frame is known to be an array starting with an integer, so a peer
    speaking a future protocol (possibly with a different array shape) is reported as `version`
    rather than `malformed`.
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise WireError("malformed", "frame must be bytes")
    frame = bytes(frame)
    if len(frame) > max_size:
        raise WireError("oversized", f"{len(frame)} bytes > {max_size}")
    items = _decode(frame, max_size)
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        raise WireError("malformed", "not an envelope array")
    if items[0] != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {items[0]} (want {PROTOCOL_VERSION})")
    if len(items) != _FIELDS:
        raise WireError("malformed", f"{len(items)} fields (want {_FIELDS})")
    version, type_, sender, epoch, seq, body, signature = items
    if not _is_type(type_):
        raise WireError("malformed", "bad message type")
    if not _identity.is_node_id(sender):
        raise WireError("malformed", "bad sender id")
    if not _is_counter(epoch) or not _is_counter(seq):
        raise WireError("malformed", "bad epoch or seq")
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise WireError("malformed", "body and signature must be bytes")
    if len(signature) not in (0, SIGNATURE_LEN):
        raise WireError("malformed", f"signature of {len(signature)} bytes")
    if msgpack.packb(items, use_bin_type=True) != frame:
        raise WireError("malformed", "non-canonical encoding")
    if not signature:
        raise WireError("unsigned")
    if not _identity.verify(
        sender, _signed_bytes(version, type_, sender, epoch, seq, body), signature
    ):
        raise WireError("bad_signature")
    return Envelope(version, type_, sender, epoch, seq, body)


@dataclass(slots=True)
class _Window:
    epoch: int
    top: int  # highest seq accepted in this epoch
    seen: int  # bit i set: seq top - i was accepted


class ReplayGuard:
    """Accepts each (sender, epoch, seq) at most once, like the IPsec / DTLS sliding window.

    Per sender it keeps the newest epoch, the highest seq accepted in it and a bitmap of the
    `window` seqs below that. A seq is refused when already accepted or when it has fallen out
    of the window (too old to tell); frames reordered by less than `window` are all accepted.
    A newer epoch means the sender restarted: its window starts afresh. An older epoch is a
    replay of a previous incarnation.

    Memory is bounded by evicting the least recently active sender beyond `max_senders`. An
    evicted sender is forgotten, so frames of its current epoch could be replayed once more
    after eviction: keep `max_senders` well above the number of peers, and call `accept` only
    for frames whose signature checked out and whose sender may talk to us (members, plus the
    few guest messages of the admission handshake), so strangers cannot flush the table.
    Not thread-safe: use it from the thread (or event loop) that receives frames.
    """

    def __init__(self, max_senders: int = 4096, window: int = 1024) -> None:
        if max_senders < 1 or window < 1:
            raise ValueError("max_senders and window must be positive")
        self.max_senders = max_senders
        self.window = window
        self._mask = (1 << window) - 1
        self._senders: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._senders)

    def __contains__(self, sender: object) -> bool:
        return sender in self._senders

    def accept(self, sender: str, epoch: int, seq: int) -> None:
        """Record (sender, epoch, seq); raises `WireError("replay")` (recording nothing) if it
        was already accepted, is too old for the window, or belongs to an older epoch."""
        if not _is_counter(epoch) or not _is_counter(seq):
            raise WireError("malformed", "bad epoch or seq")
        state = self._senders.get(sender)
        if state is None:
            self._senders[sender] = _Window(epoch, seq, 1)
            while len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
            return
        if epoch < state.epoch:
            raise WireError("replay", "older epoch")
        if epoch > state.epoch:
            state.epoch, state.top, state.seen = epoch, seq, 1
        elif seq > state.top:
            shift = seq - state.top
            state.seen = ((state.seen << shift) | 1) & self._mask if shift < self.window else 1
            state.top = seq
        else:
            age = state.top - seq
            if age >= self.window:
                raise WireError("replay", "older than the window")
            bit = 1 << age
            if state.seen & bit:
                raise WireError("replay", "duplicate")
            state.seen |= bit
        self._senders.move_to_end(sender)

    # The module contract names this `check`; it records as well (a `check` that did not
    # record would silently let every replay through if used alone).
    check = accept

    def forget(self, sender: str) -> None:
        """Drop a sender's state (e.g. when it leaves the cluster)."""
        self._senders.pop(sender, None)


class DropCounter(Counter[str]):
    """Counts dropped frames by reason, for metrics and `status` output."""

    def drop(self, reason: str | WireError) -> None:
        self[reason.reason if isinstance(reason, WireError) else reason] += 1
