"""RLlib new API stack: perceiver/planner/reflector modules, MAPPO connectors, MBMAPPO, imagination.

Importing this package on an env runner (the config references its connectors and callbacks)
also sets overcooked-ai's numpy-2 aliases before any env is built.
"""

from moedream.envs import _compat  # noqa: F401  (numpy aliases before overcooked_ai_py)
