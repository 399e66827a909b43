"""Network-namespace lab: real, separate hosts on one machine for multi-host tests."""

from .netns import Host, HostRef, Lab, LabError, LabUnavailable, unavailable_reason
from .topology import IncidentTopology, incident_topology, lan_addr

__all__ = [
    "Host",
    "HostRef",
    "IncidentTopology",
    "Lab",
    "LabError",
    "LabUnavailable",
    "incident_topology",
    "lan_addr",
    "unavailable_reason",
]
