"""The node's own settings, `<home>/config.toml`: what it does and how it reaches others.

Everything here is local to one node (never gossiped): how *this* node reaches a member it
cannot reach at the member's reported addresses (`overrides`, `jumps`, `[ssh]`), what it runs
when a member asks it to restart or reboot, and facts the probes get wrong (`kind`). A missing
file means every default; a bad file is refused with the key and the reason, never half-read.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from net.addresses import split_hostport
from net.sshkeys import parse_hop
from swarmnode.facts import KINDS
from swarmnode.identity import is_node_id

CONFIG_FILE = "config.toml"

#: Default commands. The issue's defaults: a node under systemd restarts its own unit and
#: reboots through systemd (which shuts services down cleanly first).
DEFAULT_REBOOT = "systemctl reboot"
DEFAULT_RESTART = "systemctl restart swarmnode"
#: Longest a remote `exec` may run before it is killed: long enough for a build step, short
#: enough that a forgotten `exec NODE -- sleep infinity` does not live for ever.
DEFAULT_EXEC_TIMEOUT_S = 3600.0
#: Where this host's sshd keys are read to publish their fingerprints in the signed record;
#: other nodes accept an SSH connection to this host only with one of these keys.
DEFAULT_HOST_KEYS = ("/etc/ssh/ssh_host_ed25519_key.pub", "/etc/ssh/ssh_host_ecdsa_key.pub",
                     "/etc/ssh/ssh_host_rsa_key.pub")

#: The dashboard's read paths an operator may open to requests without the token
#: (`http_open_paths`); `/api/action` is never among them.
HTTP_READ_PATHS = ("/", "/metrics", "/api/status", "/api/state", "/api/stream", "/api/logs")

#: Roles a node can take on besides building: a binhost keeps every binary package.
ROLES = ("binhost",)
#: Builds a binhost keeps per package (CAT/PN:SLOT): the newest for today, the one before for
#: a machine not yet updated, one more for a second USE variant; more is disk for rare rollbacks.
DEFAULT_BINHOST_KEEP = 3
MAX_BINHOST_KEEP = 1000
_GPG_KEY = re.compile(r"[0-9A-Fa-f]{8,40}")

#: Finished builds and their history (the leader's values count for the ledger: only it
#: proposes `forget` entries). A finished build stays in the ledger (every node's memory and
#: snapshot) BUILD_RETENTION_S: long enough for a re-attaching `build wait`, `jobs`, the
#: submitter's artifact copies (fetched as each job is done, in seconds) and the emerge
#: service's record of build times (read at the end); after it, `build wait`, `jobs --build`
#: and `jobs --history` answer from the history. The soak's load (a 20-job build every 5 s,
#: ~1.5 KB a job) then holds ~3.6 MB of finished builds, flat.
DEFAULT_BUILD_RETENTION_S = 600.0
#: At most this many finished builds are held, the oldest forgotten first even within the
#: retention: memory stays bounded under a burst of small builds (500 x 20 jobs ~ 15 MB).
DEFAULT_BUILD_KEEP_MAX = 500
#: Attempt rows in history.db (~200 bytes each: ~40 MB): the soak's 4 jobs a second for
#: 14 hours, a 1,000-package world build 200 times. The oldest go first.
DEFAULT_HISTORY_ATTEMPTS = 200_000
#: Build rows in history.db (a dashboard's months of builds; ~150 bytes each).
DEFAULT_HISTORY_BUILDS = 20_000
#: A done job whose outputs only its worker held is built again once that worker has been dead
#: this long (at once when it left or was banned). A node killed or crashed is back in seconds
#: (systemd restarts it) and a rebooted machine in a minute or two, with the outputs on its
#: disk; building again sooner wastes the work, later only delays a build whose worker is
#: really gone. The leader's value counts.
DEFAULT_REDO_AFTER_S = 120.0
#: Disk (`[disk]`, swarmnode/disk.py). A node stops taking jobs while the file system of its
#: jobs or artifacts has less free than min_free bytes or min_free_percent of its size (the
#: larger): a big package's build directory alone takes gigabytes, so below 2 GiB a job started
#: here would likely die of ENOSPC half-way; 5% is ext4's root reserve, the usual "full".
DEFAULT_DISK_MIN_FREE = 2 << 30
DEFAULT_DISK_MIN_FREE_PERCENT = 5.0
#: statvfs is cheap and a build fills a disk in minutes, not seconds.
DEFAULT_DISK_CHECK_EVERY = 10.0
#: A GC pass stats every object: every 5 minutes keeps up with a busy swarm (a worker's store
#: grew ~14 MiB/h in the soak) at no cost worth measuring.
DEFAULT_GC_EVERY = 300.0
#: Failed jobs' directories kept for inspection (`logs`, a look at what it left): the newest
#: 50, at most 3 days (a weekend) and 10 GiB together (a failed compile can leave gigabytes).
DEFAULT_JOBS_KEEP = 50
DEFAULT_JOBS_KEEP_DAYS = 3.0
DEFAULT_JOBS_MAX_BYTES = 10 << 30
#: Artifacts of finished builds kept: the last 20 builds' and those finished in the last hour
#: (a re-attached `build wait --out`, a rebuild reusing them), while the store stays under
#: 20 GiB (a Gentoo world's binary packages); what unfinished builds need is always kept.
DEFAULT_ARTIFACTS_KEEP_BUILDS = 20
DEFAULT_ARTIFACTS_KEEP_HOURS = 1.0
DEFAULT_ARTIFACTS_MAX_BYTES = 20 << 30
#: An object younger than this is never collected: it may be mid-transfer or stored and not
#: yet pinned (the store's own default).
DEFAULT_ARTIFACTS_MIN_AGE = 600.0

#: Upper bounds that make a typo fail loudly rather than allocate or wait for ever.
MAX_HOPS = 8
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
MAX_COMMAND = 4096


#: Notifications (`[notify]`, swarmnode/notify.py). What comes within this many seconds of the
#: first notice goes out as one message: a node dying takes its jobs' requeues and a failed
#: build's dependants with it, and one message saying so beats five.
DEFAULT_NOTIFY_GROUP_S = 10.0
#: Messages a channel gets an hour at most; beyond, notices wait (the oldest are dropped past
#: a hundred, and counted in the next message): a flapping member must not page all night.
DEFAULT_NOTIFY_PER_HOUR = 20
#: What the notifications can be about (`events` narrows them).
NOTIFY_KINDS = ("pending", "member_dead", "member_back", "build_finished", "build_failed",
                "push_rolled_back", "disk_low", "energy_budget")


class ConfigError(ValueError):
    """The config file is unreadable or has a bad key; the message names the key."""


@dataclass(frozen=True)
class SshSettings:
    user: str | None = None  # login for hops and targets without `user@` (default: current user)
    port: int = 22  # where members' sshd listens unless their record says otherwise
    identity_file: str | None = None  # private key; default: the SSH agent, then ~/.ssh/id_*
    known_hosts: tuple[str, ...] = ()  # for plain SSH hops; default ~/.ssh/known_hosts
    config: str = "~/.ssh/config"  # read for ProxyJump when `jumps` names no chain
    host_keys: tuple[str, ...] = DEFAULT_HOST_KEYS  # this host's public keys, published


@dataclass(frozen=True)
class DiskSettings:
    min_free: int = DEFAULT_DISK_MIN_FREE  # bytes free below which the node takes no jobs
    min_free_percent: float = DEFAULT_DISK_MIN_FREE_PERCENT  # or this % of the size: the larger
    check_every: float = DEFAULT_DISK_CHECK_EVERY  # seconds between looks at the free space
    gc_every: float = DEFAULT_GC_EVERY  # seconds between artifact GC and job-directory sweeps
    jobs_keep: int = DEFAULT_JOBS_KEEP  # kept (failed) job directories, newest first
    jobs_keep_days: float = DEFAULT_JOBS_KEEP_DAYS
    jobs_max_bytes: int = DEFAULT_JOBS_MAX_BYTES
    artifacts_keep_builds: int = DEFAULT_ARTIFACTS_KEEP_BUILDS  # the last N finished builds'
    artifacts_keep_hours: float = DEFAULT_ARTIFACTS_KEEP_HOURS  # and those finished since
    artifacts_max_bytes: int = DEFAULT_ARTIFACTS_MAX_BYTES
    artifacts_min_age: float = DEFAULT_ARTIFACTS_MIN_AGE  # seconds


_DISK_INTS = ("min_free", "jobs_keep", "jobs_max_bytes", "artifacts_keep_builds",
              "artifacts_max_bytes")
_DISK_FLOATS = ("min_free_percent", "jobs_keep_days", "artifacts_keep_hours",
                "artifacts_min_age")
_DISK_PERIODS = ("check_every", "gc_every")


def _disk(raw: Any) -> DiskSettings:
    """The `[disk]` table: counts and bytes as non-negative integers, days, hours, seconds and
    the percent as non-negative numbers (the percent at most 100), periods positive."""
    if not isinstance(raw, dict):
        raise ConfigError("disk: must be a table")
    _known(raw, {*_DISK_INTS, *_DISK_FLOATS, *_DISK_PERIODS}, "disk.")
    got: dict[str, Any] = {}
    for key in _DISK_INTS:
        value = raw.get(key, getattr(DiskSettings, key))
        if type(value) is not int or value < 0:
            raise ConfigError(f"disk.{key}: must be a non-negative integer, got {value!r}")
        got[key] = value
    for key in _DISK_FLOATS + _DISK_PERIODS:
        value = raw.get(key, getattr(DiskSettings, key))
        top = 100 if key == "min_free_percent" else float("inf")
        least = "positive" if key in _DISK_PERIODS else "non-negative"
        if (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= top
                or (key in _DISK_PERIODS and value == 0)):
            raise ConfigError(f"disk.{key}: must be a {least} number"
                              + (" up to 100" if top == 100 else "") + f", got {value!r}")
        got[key] = float(value)
    return DiskSettings(**got)


@dataclass(frozen=True)
class NotifySettings:
    """Where the leader sends what needs a person (none set: nothing is sent)."""

    webhook: str | None = None  # a URL that gets each message as JSON (POST)
    ntfy: str | None = None  # an ntfy topic's URL (POST, Title/Priority/Tags headers)
    email_to: tuple[str, ...] = ()  # recipients, over SMTP
    email_from: str = "swarmnode@localhost"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_starttls: bool = False  # upgrade to TLS (a submission port, 587)
    smtp_user: str | None = None
    smtp_password_file: str | None = None  # the password in a file (0600), never in config
    events: tuple[str, ...] = NOTIFY_KINDS  # the kinds sent
    group_s: float = DEFAULT_NOTIFY_GROUP_S
    per_hour: int = DEFAULT_NOTIFY_PER_HOUR
    energy_budget_kwh: float | None = None  # a day's swarm energy past which it tells once

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(c for c, on in (("webhook", self.webhook), ("ntfy", self.ntfy),
                                     ("email", self.email_to)) if on)


@dataclass(frozen=True)
class NodeConfig:
    kind: str | None = None
    cores: int | None = None  # cores offered to builds (default: those this process may use)
    roles: tuple[str, ...] = ()  # "binhost": collect every binary package built by the swarm
    binhost_dir: str | None = None  # where the binhost keeps them (default <home>/binhost)
    # HOST:PORT of the binhost's read-only HTTP listener for Portage clients (none: not served)
    binhost_listen: str | None = None
    binhost_keep: int = DEFAULT_BINHOST_KEEP
    # the swarm's GPG key (a GnuPG home holding its secret key, and the key's id or
    # fingerprint): the binhost signs every gpkg with it before indexing; both or neither
    binhost_gpg_home: str | None = None
    binhost_gpg_key: str | None = None
    # the Portage this node builds with: its `emerge` (default: the one on the node's PATH
    # at start, so a plain Gentoo host needs nothing; name a Gentoo Prefix's here)
    emerge: str | None = None
    reboot_command: str = DEFAULT_REBOOT
    restart_command: str = DEFAULT_RESTART
    # run exec/restart/reboot asked by operators (holders of the signed `operate` right; the
    # founder, and whom it granted): on by default so the founder can fix a hung node, and
    # the right, not this switch, is the boundary. false refuses every action.
    accept_actions: bool = True
    # narrows further: only these operator ids (empty: every operator). An id listed here
    # that does not hold the operate right is still refused: this never widens the right.
    accept_actions_from: tuple[str, ...] = ()
    exec_timeout: float = DEFAULT_EXEC_TIMEOUT_S
    # finished builds: seconds kept in the ledger, most held, history rows kept (see above)
    build_retention: float = DEFAULT_BUILD_RETENTION_S
    build_keep_max: int = DEFAULT_BUILD_KEEP_MAX
    history_attempts: int = DEFAULT_HISTORY_ATTEMPTS
    history_builds: int = DEFAULT_HISTORY_BUILDS
    # seconds a worker is dead before the outputs only it held are lost (see above)
    redo_after: float = DEFAULT_REDO_AFTER_S
    # this machine's draw idle and at full load (a wall meter's figures): the power estimate
    # where RAPL counters cannot be read (swarmnode/power.py has defaults per core)
    watts_idle: float | None = None
    watts_max: float | None = None
    price_per_kwh: float | None = None  # for the energy cost the dashboard shows
    # HTTP reads answered without the dashboard token (e.g. ["/metrics"] for a Prometheus
    # that sends no bearer token); none by default: job output and the member list are not
    # for every local user
    http_open_paths: tuple[str, ...] = ()
    # names besides the bound address that the Host header may carry (a DNS or MagicDNS name
    # the dashboard is reached by); none by default: an unknown name is a DNS rebinding
    http_hosts: tuple[str, ...] = ()
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> addresses
    jumps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> ["user@host:port"]
    ssh: SshSettings = field(default_factory=SshSettings)
    disk: DiskSettings = field(default_factory=DiskSettings)  # retention, a nearly full disk
    notify: NotifySettings = field(default_factory=NotifySettings)  # what needs a person

    def override_for(self, node_id: str, name: str) -> tuple[str, ...]:
        return self.overrides.get(node_id) or self.overrides.get(name) or ()

    def jumps_for(self, node_id: str, name: str) -> tuple[str, ...]:
        return self.jumps.get(node_id) or self.jumps.get(name) or ()


def load(home: Path) -> NodeConfig:
    """The config of the node in `home` (defaults when there is no file)."""
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return NodeConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse(text, str(path))


def parse(text: str, where: str = CONFIG_FILE) -> NodeConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    try:
        return _node_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


_TOP = {"kind", "cores", "roles", "binhost_dir", "binhost_listen", "binhost_keep",
        "binhost_gpg_home", "binhost_gpg_key", "emerge", "reboot_command", "restart_command",
        "accept_actions", "accept_actions_from", "exec_timeout", "watts_idle", "watts_max",
        "price_per_kwh", "overrides", "jumps", "ssh", "http_open_paths", "http_hosts",
        "build_retention", "build_keep_max", "history_attempts", "history_builds", "disk",
        "notify", "redo_after"}
_SSH = {"user", "port", "identity_file", "known_hosts", "config", "host_keys"}


def _node_config(raw: dict[str, Any]) -> NodeConfig:
    _known(raw, _TOP, "")
    kind = raw.get("kind")
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    cores = raw.get("cores")
    if cores is not None and (type(cores) is not int or not 1 <= cores <= 4096):
        raise ConfigError(f"cores: must be an integer from 1 to 4096, got {cores!r}")
    roles = _strings(raw.get("roles", []), "roles")
    open_paths = _strings(raw.get("http_open_paths", []), "http_open_paths")
    for path in open_paths:
        if path not in HTTP_READ_PATHS:
            raise ConfigError(f"http_open_paths: {path!r} is not a read path (one of "
                              f"{', '.join(HTTP_READ_PATHS)})")
    for role in roles:
        if role not in ROLES:
            raise ConfigError(f"roles: unknown role {role!r} (known: {', '.join(ROLES)})")
    return NodeConfig(
        kind=kind,
        cores=cores,
        roles=roles,
        binhost_dir=_opt_str(raw, "binhost_dir", ""),
        **_binhost(raw),
        emerge=_opt_str(raw, "emerge", ""),
        reboot_command=_command(raw, "reboot_command", DEFAULT_REBOOT),
        restart_command=_command(raw, "restart_command", DEFAULT_RESTART),
        accept_actions=_bool(raw, "accept_actions", True),
        accept_actions_from=_ids(raw.get("accept_actions_from", []), "accept_actions_from"),
        exec_timeout=_positive(raw, "exec_timeout", DEFAULT_EXEC_TIMEOUT_S),
        **_history(raw),
        redo_after=_positive(raw, "redo_after", DEFAULT_REDO_AFTER_S),
        **_watts(raw),
        http_open_paths=open_paths,
        http_hosts=_host_names(raw.get("http_hosts", [])),
        overrides=_node_map(raw.get("overrides", {}), "overrides", _address),
        jumps=_node_map(raw.get("jumps", {}), "jumps", _hop, MAX_HOPS),
        ssh=_ssh(raw.get("ssh", {})),
        disk=_disk(raw.get("disk", {})),
        notify=_notify(raw.get("notify", {})),
    )


def _notify(raw: Any) -> NotifySettings:
    """The `[notify]` table: http(s) URLs, addresses, a port, kinds, positive periods."""
    if not isinstance(raw, dict):
        raise ConfigError("notify: must be a table")
    _known(raw, set(NotifySettings.__dataclass_fields__), "notify.")
    got: dict[str, Any] = {}
    for key in ("webhook", "ntfy"):
        url = _opt_str(raw, key, "notify.")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"notify.{key}: must be an http:// or https:// URL, got {url!r}")
        got[key] = url
    got["email_to"] = _strings(raw.get("email_to", []), "notify.email_to")
    for key in ("email_from", "smtp_host"):
        if key in raw:
            got[key] = _opt_str(raw, key, "notify.")
    for addr in (*got["email_to"], got.get("email_from", "x@y")):
        if "@" not in addr or any(c in addr for c in "\r\n<>, "):
            raise ConfigError(f"notify: {addr!r} is not an e-mail address")
    port = raw.get("smtp_port", 25)
    if type(port) is not int or not 1 <= port <= 65535:
        raise ConfigError(f"notify.smtp_port: must be a port number, got {port!r}")
    got["smtp_port"] = port
    got["smtp_starttls"] = _bool(raw, "smtp_starttls", False)
    got["smtp_user"] = _opt_str(raw, "smtp_user", "notify.")
    got["smtp_password_file"] = _opt_str(raw, "smtp_password_file", "notify.")
    events = _strings(raw.get("events", list(NOTIFY_KINDS)), "notify.events")
    for kind in events:
        if kind not in NOTIFY_KINDS:
            raise ConfigError(f"notify.events: unknown kind {kind!r} (known: "
                              f"{', '.join(NOTIFY_KINDS)})")
    got["events"] = events
    got["group_s"] = _positive(raw, "group_s", DEFAULT_NOTIFY_GROUP_S)
    per_hour = raw.get("per_hour", DEFAULT_NOTIFY_PER_HOUR)
    if type(per_hour) is not int or not 1 <= per_hour <= 3600:
        raise ConfigError(f"notify.per_hour: must be an integer from 1 to 3600, got {per_hour!r}")
    got["per_hour"] = per_hour
    budget = raw.get("energy_budget_kwh")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or budget <= 0):
        raise ConfigError(f"notify.energy_budget_kwh: must be positive kWh, got {budget!r}")
    got["energy_budget_kwh"] = None if budget is None else float(budget)
    return NotifySettings(**got)


def _binhost(raw: dict[str, Any]) -> dict[str, Any]:
    """binhost_listen (HOST:PORT, a port given), binhost_keep, binhost_gpg_home and
    binhost_gpg_key (both or neither; the key as a hex id or fingerprint)."""
    listen = _opt_str(raw, "binhost_listen", "")
    if listen is not None:
        try:
            split_hostport(listen)  # no default: the port must be given
        except ValueError as exc:
            raise ConfigError(f"binhost_listen: {exc} (give HOST:PORT)") from None
    keep = raw.get("binhost_keep", DEFAULT_BINHOST_KEEP)
    if type(keep) is not int or not 1 <= keep <= MAX_BINHOST_KEEP:
        raise ConfigError(f"binhost_keep: must be an integer from 1 to {MAX_BINHOST_KEEP}, "
                          f"got {keep!r}")
    home, key = _opt_str(raw, "binhost_gpg_home", ""), _opt_str(raw, "binhost_gpg_key", "")
    if (home is None) != (key is None):
        raise ConfigError("binhost_gpg_home and binhost_gpg_key: set both or neither")
    if key is not None and not _GPG_KEY.fullmatch(key):
        raise ConfigError(f"binhost_gpg_key: a key id or fingerprint in hex, got {key!r}")
    return {"binhost_listen": listen, "binhost_keep": keep, "binhost_gpg_home": home,
            "binhost_gpg_key": key}


def _history(raw: dict[str, Any]) -> dict[str, Any]:
    """build_retention (seconds), build_keep_max, history_attempts, history_builds."""
    got: dict[str, Any] = {"build_retention": _positive(raw, "build_retention",
                                                         DEFAULT_BUILD_RETENTION_S)}
    for key, default, least in (("build_keep_max", DEFAULT_BUILD_KEEP_MAX, 0),
                                ("history_attempts", DEFAULT_HISTORY_ATTEMPTS, 100),
                                ("history_builds", DEFAULT_HISTORY_BUILDS, 10)):
        value = raw.get(key, default)
        if type(value) is not int or not least <= value <= 10**9:
            raise ConfigError(f"{key}: must be an integer from {least} to 1000000000, "
                              f"got {value!r}")
        got[key] = value
    return got


def _ssh(raw: Any) -> SshSettings:
    if not isinstance(raw, dict):
        raise ConfigError("ssh: must be a table")
    _known(raw, _SSH, "ssh.")
    port = raw.get("port", 22)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"ssh.port: must be a port number, got {port!r}")
    return SshSettings(
        user=_opt_str(raw, "user", "ssh."),
        port=port,
        identity_file=_opt_str(raw, "identity_file", "ssh."),
        known_hosts=_strings(raw.get("known_hosts", []), "ssh.known_hosts"),
        config=_opt_str(raw, "config", "ssh.") or SshSettings.config,
        host_keys=_strings(raw.get("host_keys", list(DEFAULT_HOST_KEYS)), "ssh.host_keys"),
    )


def _known(raw: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = _closest(key, allowed)
            raise ConfigError(f"{prefix}{key}: unknown key" + (f" (did you mean {hint!r}?)"
                                                                if hint else ""))


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return match[0] if match else None


def _command(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_COMMAND:
        raise ConfigError(f"{key}: must be a non-empty command line, got {value!r}")
    return value


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _watts(raw: dict[str, Any]) -> dict[str, float | None]:
    """watts_idle and watts_max (both or neither, 0 <= idle <= max <= 100 kW) and
    price_per_kwh."""
    got: dict[str, float | None] = {}
    for key in ("watts_idle", "watts_max"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= 100_000):
            raise ConfigError(f"{key}: must be watts from 0 to 100000, got {value!r}")
        got[key] = None if value is None else float(value)
    if (got["watts_idle"] is None) != (got["watts_max"] is None):
        raise ConfigError("watts_idle and watts_max: set both or neither")
    if got["watts_idle"] is not None and got["watts_max"] < got["watts_idle"]:  # type: ignore[operator]
        raise ConfigError(f"watts_max: must be at least watts_idle ({got['watts_idle']:g}), "
                          f"got {got['watts_max']:g}")
    price = raw.get("price_per_kwh")
    if price is not None and (isinstance(price, bool) or not isinstance(price, int | float)
                              or not 0 <= price <= 1000):
        raise ConfigError(f"price_per_kwh: must be a price from 0 to 1000, got {price!r}")
    got["price_per_kwh"] = None if price is None else float(price)
    return got


def _host_names(value: Any) -> tuple[str, ...]:
    """Host names as a Host header carries them, without a port, lower-cased."""
    names = _strings(value, "http_hosts")
    for name in names:
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(f"http_hosts: {name!r} is not a host name (no port, no scheme)")
    return tuple(n.lower() for n in names)


def _positive(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _opt_str(raw: dict[str, Any], key: str, prefix: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{prefix}{key}: must be a non-empty string, got {value!r}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of strings, got {value!r}")
    return tuple(value)


def _ids(value: Any, where: str) -> tuple[str, ...]:
    """A list of node ids (names can be changed by a rename, ids cannot)."""
    ids = _strings(value, where)
    for i, node_id in enumerate(ids):
        if not is_node_id(node_id):
            raise ConfigError(f"{where}[{i}]: not a node id: {node_id[:60]!r}")
    return ids


def _node_map(raw: Any, where: str, check, limit: int = 16) -> dict[str, tuple[str, ...]]:
    """`{node name or id: value or [values]}`, every value checked by `check`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table of node name or id = value")
    result: dict[str, tuple[str, ...]] = {}
    for node, value in raw.items():
        values = _strings(value, f"{where}.{node}")
        if len(values) > limit:
            raise ConfigError(f"{where}.{node}: at most {limit} entries")
        for i, item in enumerate(values):
            try:
                check(item)
            except ValueError as exc:
                raise ConfigError(f"{where}.{node}[{i}]: {exc}") from exc
        result[node] = values
    return result


def _address(text: str) -> None:
    split_hostport(text, 1)


def _hop(text: str) -> None:
    parse_hop(text, default_user="-")
