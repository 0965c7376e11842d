"""The driver the chaos suite SIGTERMs: a model-based run that checkpoints every iteration.

    python -m tests.integration.chaos_driver <gcs address> <root> <data> <gate name> <out>

Joins the test's Ray cluster, builds test_chaos's algorithm config (no remote env runner) and
trains until it is killed, saving ``<out>/iter_<n>`` after iteration n and then printing
``saved <n> <real env steps lifetime>`` (the line the test waits for).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(address: str, root: str, data: str, gate_name: str, out: str) -> None:
    import ray

    from moedream.policies.algorithm import METRICS
    from tests.integration.test_chaos import algo_config

    ray.init(address=address, log_to_driver=False)
    algo = algo_config(Path(root), Path(data), gate_name, runners=0, retrain=2).build_algo()
    while True:
        result = algo.train()
        algo.save_to_path(str(Path(out) / f"iter_{algo.iteration}"))
        print("saved", algo.iteration, result[METRICS]["real_env_steps_lifetime"], flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
