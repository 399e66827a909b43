"""config.toml: every key parsed with its default, every mistake named precisely."""

from __future__ import annotations

import pytest

from swarmnode import config
from swarmnode.config import ConfigError, NodeConfig


def test_missing_file_means_every_default(tmp_path):
    cfg = config.load(tmp_path)
    assert cfg == NodeConfig()
    assert cfg.reboot_command == "systemctl reboot"
    assert cfg.restart_command == "systemctl restart swarmnode"
    assert cfg.accept_actions is True and cfg.kind is None
    assert cfg.ssh.port == 22 and cfg.ssh.known_hosts == ()


def test_full_file(tmp_path):
    (tmp_path / "config.toml").write_text('''
kind = "lxc"
cores = 3
reboot_command = "touch /tmp/rebooted"
restart_command = "rc-service swarmnode restart"
accept_actions = false
exec_timeout = 60
redo_after = 300
watts_idle = 35
watts_max = 180.5
price_per_kwh = 0.31

[overrides]
tarn = "10.42.0.1:17946"
"abcd" = ["10.0.0.1", "[fd00::1]:7000"]

[jumps]
far = ["admin@10.42.0.3", "root@172.30.0.2:2222"]

[ssh]
user = "build"
port = 2200
identity_file = "/root/.ssh/id_ed25519"
known_hosts = ["/etc/swarmnode/known_hosts"]
host_keys = ["/etc/ssh/ssh_host_ed25519_key.pub"]
''')
    cfg = config.load(tmp_path)
    assert cfg.kind == "lxc" and cfg.cores == 3 and cfg.accept_actions is False
    assert cfg.exec_timeout == 60.0 and cfg.redo_after == 300.0
    assert (cfg.watts_idle, cfg.watts_max, cfg.price_per_kwh) == (35.0, 180.5, 0.31)
    assert cfg.override_for("xyz", "tarn") == ("10.42.0.1:17946",)
    assert cfg.override_for("abcd", "other") == ("10.0.0.1", "[fd00::1]:7000")
    assert cfg.override_for("nope", "none") == ()
    assert cfg.jumps_for("id", "far") == ("admin@10.42.0.3", "root@172.30.0.2:2222")
    assert cfg.ssh.user == "build" and cfg.ssh.port == 2200
    assert cfg.ssh.known_hosts == ("/etc/swarmnode/known_hosts",)


@pytest.mark.parametrize(("text", "message"), [
    ("reboot_comand = 'x'", "reboot_comand: unknown key (did you mean 'reboot_command'?)"),
    ("kind = 'laptop'", "kind: must be one of bare, vm, lxc, docker"),
    ("cores = 0", "cores: must be an integer from 1 to 4096"),
    ("roles = ['binhots']", "roles: unknown role 'binhots'"),
    ("accept_actions = 'yes'", "accept_actions: must be true or false"),
    ("exec_timeout = -1", "exec_timeout: must be a positive number"),
    ("redo_after = 0", "redo_after: must be a positive number"),
    ("reboot_command = ''", "reboot_command: must be a non-empty command line"),
    ("[overrides]\ntarn = 'host:notaport'", "overrides.tarn[0]:"),
    ("[overrides]\ntarn = 5", "overrides.tarn: must be a list of strings"),
    ("[jumps]\nfar = ['@host']", "jumps.far[0]:"),
    ("[jumps]\nfar = ['a b@host']", "jumps.far[0]:"),
    ("[ssh]\nport = 70000", "ssh.port: must be a port number"),
    ("[ssh]\nknwon_hosts = []", "ssh.knwon_hosts: unknown key (did you mean 'known_hosts'?)"),
    ("ssh = 3", "ssh: must be a table"),
    ("watts_idle = 40", "watts_idle and watts_max: set both or neither"),
    ("watts_idle = 40\nwatts_max = 30", "watts_max: must be at least watts_idle (40)"),
    ("watts_idle = -1\nwatts_max = 30", "watts_idle: must be watts from 0 to 100000"),
    ("watts_idle = 1\nwatts_max = 'lots'", "watts_max: must be watts from 0 to 100000"),
    ("price_per_kwh = -0.2", "price_per_kwh: must be a price from 0 to 1000"),
    ("kind = ", "config.toml"),  # TOML syntax error: names the file and the line
])
def test_bad_config_is_refused_with_the_key_named(tmp_path, text, message):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert message in str(info.value)
    assert str(tmp_path / "config.toml") in str(info.value)
