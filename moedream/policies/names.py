"""The one home of the names the team's modules, connectors, imagination and metrics share.

Batch columns, module ids, the imagined-episode id prefix and learner metric keys, and the
functions that map an agent to its planner's module id. Import-free, so that every
policies module can use them without importing another (no import cycles).
"""

from __future__ import annotations

# --- batch columns (added by the connectors in moedream.policies.connectors)
AGENT_INDEX = "agent_index"
"""[B] int64: the agent's position in the env's agent order (the planner's agent-id input)."""
JOINT_OBS = "joint_obs"
"""[B, N * D]: all agents' observations at the same env step (the reflector's input)."""

# --- module ids of the team MultiRLModule
PERCEIVER = "perceiver"
REFLECTOR = "reflector"
SHARED_PLANNER = "planner"

# --- episodes
IMAGINED_PREFIX = "imagined-"
"""Ids of imagined episodes start with this, so learner connectors can tell them from real."""

# --- learner metric keys
IMAGINED_STEPS_KEY = "moedream_imagined_agent_steps"
REAL_STEPS_KEY = "moedream_real_agent_steps"
OBS_NORM_COUNT_KEY = "moedream_obs_norm_count"


def planner_id(agent_id: str, shared: bool) -> str:
    """The ModuleID of the planner that acts for ``agent_id``."""
    return SHARED_PLANNER if shared else f"planner_{agent_id}"


def map_agent_to_planner(agent_id: str, episode=None, *, shared: bool = True, **kwargs) -> str:
    """RLlib's policy mapping function: the planner that acts for ``agent_id``."""
    return planner_id(agent_id, shared)
