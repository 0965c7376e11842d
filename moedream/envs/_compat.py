"""numpy-2 compatibility for overcooked-ai 1.1.0 (2021). Import this before overcooked_ai_py.

overcooked_ai_py uses ``np.Inf`` and ``np.int``, both removed in numpy 2. Only names that are
missing are set: numpy 2 has ``np.bool`` again, and overwriting it breaks scipy's numpy.ma.
"""

import warnings

import numpy as np

_ALIASES = {"Inf": np.inf, "int": int}

for _name, _value in _ALIASES.items():
    if _name not in np.__dict__:
        setattr(np, _name, _value)

# overcooked_ai_py imports the unmaintained `gym` package, which warns loudly on import.
warnings.filterwarnings("ignore", message=".*Gym has been unmaintained.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="gym")
