"""Election messages: frozen dataclasses and a strict codec.

`encode` gives a msgpack-friendly plain dict (with its kind under "k") and `decode` turns any
object back into a fully validated message or raises `MessageError` -- never another exception,
whatever the input -- so the state machine can trust field types and bounds. `pack`/`unpack`
wrap the same forms for the signed envelope (type string "election.<kind>", msgpack body).

A field named `term` always carries the sender's current term, so the receiver can apply Raft's
"a higher term wins" rule uniformly. `PreVote` has no `term` on purpose: it asks about a term
nobody holds yet and must not move anyone's term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

MAX_U63 = (1 << 63) - 1
MAX_ID = 64
"""Node ids are opaque strings; 64 is the envelope's longest string (the 52-char id fits)."""
MAX_BODY = 1024
"""Every election message is a few dozen bytes; anything bigger is not one of ours."""
TYPE_PREFIX = "election."


class MessageError(ValueError):
    """An object or body that is not a valid election message."""


@dataclass(frozen=True, slots=True)
class PreVote:
    """Asks "would you vote for me in `next_term`?" (the sender's term + 1); changes nothing."""

    next_term: int
    candidate: str


@dataclass(frozen=True, slots=True)
class PreVoteReply:
    """`next_term` echoes the question; `term` is the replier's own, so a laggard catches up."""

    next_term: int
    granted: bool
    term: int


@dataclass(frozen=True, slots=True)
class RequestVote:
    term: int
    candidate: str


@dataclass(frozen=True, slots=True)
class VoteReply:
    term: int
    granted: bool


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """`seq` grows with every heartbeat round of one leadership: a reply names the round it
    answers, so the leader knows when that round was sent (its lease starts then)."""

    term: int
    leader: str
    seq: int


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """Acknowledges round `seq` when `term` equals the leader's; a higher `term` deposes it."""

    term: int
    seq: int


Message = PreVote | PreVoteReply | RequestVote | VoteReply | Heartbeat | HeartbeatReply

_KINDS: dict[type, str] = {
    PreVote: "pre_vote",
    PreVoteReply: "pre_vote_reply",
    RequestVote: "request_vote",
    VoteReply: "vote_reply",
    Heartbeat: "heartbeat",
    HeartbeatReply: "heartbeat_reply",
}
_CLASSES = {kind: cls for cls, kind in _KINDS.items()}
MESSAGE_TYPES = frozenset(TYPE_PREFIX + kind for kind in _CLASSES)
"""Envelope type strings of election messages (for the shell's dispatch)."""

# Field name -> validator; the dataclass field order is the constructor order.
_INT = "int"
_BOOL = "bool"
_ID = "id"
_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {
    PreVote: (("next_term", _INT), ("candidate", _ID)),
    PreVoteReply: (("next_term", _INT), ("granted", _BOOL), ("term", _INT)),
    RequestVote: (("term", _INT), ("candidate", _ID)),
    VoteReply: (("term", _INT), ("granted", _BOOL)),
    Heartbeat: (("term", _INT), ("leader", _ID), ("seq", _INT)),
    HeartbeatReply: (("term", _INT), ("seq", _INT)),
}
_KEYS = {cls: frozenset({"k", *(name for name, _ in spec)}) for cls, spec in _FIELDS.items()}


def _check(value: object, how: str, what: str) -> Any:
    # `type(...) is` because bool is an int subclass and must not pass as a term.
    if how == _INT:
        ok = type(value) is int and 0 <= value <= MAX_U63
    elif how == _BOOL:
        ok = type(value) is bool
    else:
        ok = type(value) is str and 1 <= len(value) <= MAX_ID
    if not ok:
        raise MessageError(f"{what}: expected {how}")
    return value


def encode(msg: Message) -> dict[str, Any]:
    """The plain (msgpack-able) form: {"k": kind, field: value, ...}."""
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise TypeError(f"not an election message: {msg!r}")
    plain: dict[str, Any] = {"k": kind}
    for name, _ in _FIELDS[type(msg)]:
        plain[name] = getattr(msg, name)
    return plain


def decode(obj: object) -> Message:
    """Strictly rebuild a message from its plain form; raises MessageError (only)."""
    if type(obj) is not dict:
        raise MessageError("message: expected a map")
    kind = obj.get("k")
    cls = _CLASSES.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageError(f"message: unknown kind {kind!r}")
    if obj.keys() != _KEYS[cls]:
        raise MessageError(f"{kind}: expected keys {sorted(_KEYS[cls])}")
    args = [_check(obj[name], how, f"{kind}.{name}") for name, how in _FIELDS[cls]]
    return cls(*args)


def pack(msg: Message) -> tuple[str, bytes]:
    """(envelope type string, msgpack body)."""
    plain = encode(msg)
    return TYPE_PREFIX + plain["k"], msgpack.packb(plain)


def unpack(type_str: str, body: bytes) -> Message:
    """Decode an envelope body; the type string must agree with the body's kind."""
    if type(type_str) is not str or type_str not in MESSAGE_TYPES:
        raise MessageError(f"unknown message type {type_str!r}")
    if not isinstance(body, bytes | bytearray | memoryview) or len(body) > MAX_BODY:
        raise MessageError("body: expected bytes of at most MAX_BODY")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_ID,
            max_bin_len=0,
            max_array_len=0,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for hostile input; all mean malformed.
        raise MessageError(f"body: malformed msgpack ({type(exc).__name__})") from None
    msg = decode(obj)
    if TYPE_PREFIX + obj["k"] != type_str:
        raise MessageError("body: kind does not match the envelope type")
    return msg
