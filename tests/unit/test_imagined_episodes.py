"""build_imagined_episodes builds each episode whole; it must equal the episode built step by
step with RLlib's add_env_reset + add_env_step (benchmarks/imagined_episodes.py times both)."""

from __future__ import annotations

import numpy as np
import pytest
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from benchmarks.imagined_episodes import step_by_step
from moedream.envs import env_spec
from moedream.policies.imagination import build_imagined_episodes
from moedream.policies.rl_modules import team_module_spec
from moedream.world_model.trajectory import Trajectories

COLUMNS = (Columns.ACTION_DIST_INPUTS, Columns.ACTION_LOGP, WEIGHTS_SEQ_NO)


@pytest.fixture(scope="module")
def setting():
    spec = env_spec("overcooked", layout="cramped_room", horizon=100)
    module = team_module_spec(
        spec, embedding_dim=16, perceiver_hidden=[16], planner_hidden=[16], reflector_hidden=[16]
    ).build()
    rng = np.random.default_rng(3)
    b, h, n = 12, 5, spec.n_agents
    terminated = np.zeros((b, h, n), np.float32)
    terminated[2, 1, 0] = 0.9  # ends at step 1 (one agent's prediction is enough)
    terminated[5, 4, 1] = 0.7  # ends at its last step: terminated, not truncated
    terminated[7, 3, :] = 0.4  # below the threshold: truncated at H
    trajs = Trajectories(
        obs=rng.normal(size=(b, h + 1, n, spec.obs_dim)).astype(np.float32),
        action=spec.encode_actions(rng.integers(0, spec.action_dim, size=(b, h, n))),
        reward=rng.normal(size=(b, h, n)).astype(np.float32),
        terminated=terminated,
        length=np.array([5, 5, 5, 1, 3, 5, 2, 5, 4, 5, 5, 1]),  # the gate's coherent prefixes
    )
    return spec, module, trajs


def test_whole_episodes_equal_the_step_by_step_ones(setting):
    spec, module, trajs = setting
    built = build_imagined_episodes(trajs, module, spec, weights_seq_no=9)
    expected = step_by_step(trajs, module, spec, 9)  # the reference build (the old one)
    assert [e.env_steps() for e in built] == [5, 5, 2, 1, 3, 5, 2, 5, 4, 5, 5, 1]
    for got, want in zip(built, expected, strict=True):
        assert got.id_.startswith("imagined-")
        assert (got.is_terminated, got.is_truncated) == (want.is_terminated, want.is_truncated)
        assert got.env_t == want.env_t and got.env_t_started == want.env_t_started == 0
        for agent in spec.agent_ids:
            g, w = got.agent_episodes[agent], want.agent_episodes[agent]
            assert (g.module_id, len(g), g.t_started) == (w.module_id, len(w), w.t_started)
            assert (g.is_terminated, g.is_truncated) == (w.is_terminated, w.is_truncated)
            np.testing.assert_array_equal(g.get_observations(), w.get_observations())
            np.testing.assert_array_equal(g.get_actions(), w.get_actions())
            np.testing.assert_array_equal(g.get_rewards(), w.get_rewards())
            for column in COLUMNS:
                np.testing.assert_allclose(
                    g.get_extra_model_outputs(column), w.get_extra_model_outputs(column),
                    rtol=1e-6, err_msg=f"{agent} {column}",
                )  # fmt: skip
            assert list(got.env_t_to_agent_t[agent]) == list(want.env_t_to_agent_t[agent])
