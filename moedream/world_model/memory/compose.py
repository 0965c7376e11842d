"""Product of contrastive experts (PoCE): composing the memory experts' diffusion predictions.

Each expert i gives two predictions at the same (x_t, t): eps_i^c with its memory context and
eps_i^u with that context replaced by null (for the long-term expert: with its episode adapter
switched off). Two forms (``MemoryConfig.form``)::

    "sum"           eps = sum_i [ eps_i^u + alpha_i (eps_i^c - eps_i^u) ]          (authors' code)
    "shared_prior"  eps = eps^u + sum_i alpha_i (eps_i^c - eps_i^u)                 (default)

What each computes. In score terms (eps = -sigma * grad log p), "shared_prior" is the score of

    p(x) * prod_i [ p_i(x | c_i) / p_i(x) ]^alpha_i

one prior times each expert's likelihood ratio (its *contrast*), tempered by alpha_i. Its
weights sum to one (1 + sum_i alpha_i - sum_i alpha_i), so it is the same whichever affine
parameterisation the denoiser predicts (eps, v or flow velocity), and with one expert and
alpha = 1 it is exactly that expert's conditional prediction. "sum" is the score of
``prod_i p_i(x) [p_i(x | c_i) / p_i(x)]^alpha_i``: every expert brings its own prior, so with n
experts the prior is counted n times (a sharpened, over-confident prior: the weights sum to
n), and applied to a v or flow-velocity prediction it also rescales the prediction by n. With
one expert the two forms agree. We default to "shared_prior" because it is the product of
experts with a single prior, is invariant to the prediction parameterisation and keeps the
magnitude of the prediction when experts are added or removed (ablations stay comparable);
"sum" is kept to reproduce the authors' code and is measured beside it in
``benchmarks/memory_experts.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moedream.world_model.memory.config import FORMS


def compose_predictions(
    cond_preds: Sequence[Tensor],
    uncond_preds: Sequence[Tensor],
    alphas: Sequence[float],
    form: str = "shared_prior",
    *,
    prior: Tensor | None = None,
) -> Tensor:
    """PoCE over n experts: lists of n predictions [B, X] and n weights -> composed [B, X].

    ``prior`` is eps^u of the "shared_prior" form (default: ``uncond_preds[0]``); "sum" ignores
    it. Pure function: no weights, no state.
    """
    n = len(cond_preds)
    if n == 0 or len(uncond_preds) != n or len(alphas) != n:
        raise ValueError(
            f"compose_predictions needs one cond, one uncond prediction and one alpha per expert; "
            f"got {len(cond_preds)}, {len(uncond_preds)}, {len(alphas)}"
        )
    if form not in FORMS:
        raise ValueError(f"`form` = {form!r} is invalid: must be one of {list(FORMS)}")
    contrast = torch.zeros_like(cond_preds[0])  # sum_i alpha_i (eps_i^c - eps_i^u)  [B, X]
    for c, u, a in zip(cond_preds, uncond_preds, alphas, strict=True):
        contrast = contrast + a * (c - u)
    if form == "sum":
        return torch.stack(list(uncond_preds)).sum(0) + contrast  # sum_i eps_i^u + contrast
    base = uncond_preds[0] if prior is None else prior
    return base + contrast
