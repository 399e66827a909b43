"""swarmnode: one program on every machine of a peer-to-peer build swarm."""

__version__ = "0.1.0"
