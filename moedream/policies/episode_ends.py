"""How an episode's end reaches PPO: truncated (GAE bootstraps from the critic) or terminated.

RLlib's ``MultiAgentEpisode.add_env_step`` declares an episode TERMINATED as soon as every
agent is done, even when every agent was only TRUNCATED (a time limit: the MDP goes on), and
hands that termination to each agent's ``SingleAgentEpisode``. PPO's learner connector
(``AddOneTsToEpisodesAndTruncate``) then writes ``terminateds = 1`` at the last step and
``compute_value_targets`` drops ``gamma * V(s_T)`` there: the last steps of every episode that
ended by time limit learn a value target as if the world had stopped.

An agent episode that was truncated AND terminated therefore went through that rule (the env
wrapper, moedream.envs.register_rllib_envs, never reports both for one agent: termination wins,
as in Gymnasium). :func:`restore_truncation` undoes it, for real episodes (MBMAPPO, with
``bootstrap_truncated_episodes``) and for imagined rollouts cut at their horizon
(:func:`moedream.policies.imagination.build_imagined_episodes`, with
``imagination.bootstrap_truncated``) alike. Plain attribute writes: no ray import.
"""

from __future__ import annotations

from typing import Any

BOOTSTRAP_TRUNCATED_EPISODES = True
"""The default of ``bootstrap_truncated_episodes`` (AgentsConfig, MBMAPPOConfig): on, the value
target a time limit calls for (benchmarks/truncation_bootstrap.py measured no difference in
return at the budget it could afford; the results table's base config pins it off while its
runs, started before the fix, are under way)."""


def restore_truncation(episode: Any) -> bool:
    """Mark every agent episode of the multi-agent ``episode`` that is truncated and terminated
    as truncated only, and the team episode terminated only if every agent is. True if any
    agent episode changed. Episodes still running, or ended by a real termination, are left
    as they are."""
    changed = False
    for agent_episode in episode.agent_episodes.values():
        if agent_episode.is_truncated and agent_episode.is_terminated:
            agent_episode.is_terminated = False
            changed = True
    if changed:
        agents = list(episode.agent_episodes.values())
        episode.is_terminated = all(a.is_terminated for a in agents)
        episode.is_truncated = not episode.is_terminated
    return changed
