"""Builds: plans of jobs (TOML or `emerge --pretend` output) and where to run them.

Everything here is pure: it reads the text or files it is given and computes, so the leader can
re-plan and re-schedule on every change without side effects, and tests need no swarm.
"""

from swarmnode.build.plan import (
    Job,
    Plan,
    PlanError,
    Requires,
    load_plan,
    parse_plan,
    topological_order,
    validate_plan,
)

__all__ = [
    "Job",
    "Plan",
    "PlanError",
    "Requires",
    "load_plan",
    "parse_plan",
    "topological_order",
    "validate_plan",
]
