"""Long-term memory expert: per-episode LoRA adapters of the denoiser finetuned at test time.

Design choice: one private copy of the world model's denoiser is wrapped once as a peft
``PeftModel`` and holds every episode's adapter side by side (peft's multi-adapter API:
``add_adapter``, ``set_adapter``, ``delete_adapter``), LoRA on every ``nn.Linear`` of the
denoiser. Why:
- switching episodes costs nothing (no tensor copies), and a batch mixing several episodes is
  one forward pass (peft's ``adapter_names=[...]`` mixed-batch inference), which is what a
  Serve replica batching requests of many episodes needs;
- the memory is bounded: at most ``max_adapters`` adapters (each ``rank * (in + out)`` floats
  per targeted layer), the least recently used one evicted (or the oldest, ``eviction='fifo'``);
- the base weights are frozen in the copy and the caller's denoiser is never touched (the copy
  is private); after the world model trains further, ``sync_base(denoiser)`` refreshes it.
An adapter can leave the store as a state dict (``export`` / ``import_adapter``), e.g. to save
an episode's memory or move it between Serve replicas.

Adapter names are ``ep<n>`` (episode ids may hold characters peft's module dicts refuse).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from moedream.world_model.diffusion import Denoiser
from moedream.world_model.memory.config import MemoryConfig

ANCHOR = "anchor"  # a never-trained adapter (B = 0) so the PeftModel exists with no episode
BASE = "__base__"  # peft's name for "no adapter" in mixed batches
PREFIX = "denoiser."  # the denoiser's attribute in the wrapper peft sees


class _DenoiserHolder(nn.Module):
    """The denoiser under one attribute name, so LoRA targets are ``denoiser.*`` layers."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.denoiser(x_t, t, cond)


class MemoryStore:
    """Bounded per-episode LoRA adapters on a frozen private copy of ``denoiser``."""

    def __init__(self, denoiser: Denoiser, cfg: MemoryConfig) -> None:
        self.cfg = cfg
        self.cfg.validate()
        private = _DenoiserHolder(copy.deepcopy(denoiser)).eval()
        targets = [
            name
            for name, module in private.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(PREFIX)
        ]
        self.lora_config = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
        )
        self.model = get_peft_model(private, self.lora_config, adapter_name=ANCHOR)
        self.model.eval()
        self._adapters: OrderedDict[str, str] = OrderedDict()  # episode id -> adapter name
        self._next = 0
        self._trainable = False
        self.last_finetune_seconds = 0.0
        self.last_kept: dict[str, int] = {}  # episode id -> its last validation kept it (1/0)

    # ----- bookkeeping -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._adapters

    @property
    def episode_ids(self) -> list[str]:
        """Episodes with an adapter, least recently used first (eviction order)."""
        return list(self._adapters)

    def get(self, episode_id: str) -> str | None:
        """The adapter name of ``episode_id`` (marks it used), or None if it has none."""
        name = self._adapters.get(episode_id)
        if name is not None and self.cfg.eviction == "lru":
            self._adapters.move_to_end(episode_id)
        return name

    def evict(self, episode_id: str | None = None) -> str | None:
        """Drop ``episode_id``'s adapter, or the next one in eviction order if None.

        Returns the evicted episode id (None if the store was empty)."""
        if episode_id is None:
            if not self._adapters:
                return None
            episode_id = next(iter(self._adapters))
        if episode_id not in self._adapters:
            raise KeyError(f"episode {episode_id!r} has no adapter; stored: {self.episode_ids}")
        name = self._adapters.pop(episode_id)
        self._activate(ANCHOR)
        self.model.delete_adapter(name)
        return episode_id

    def _create(self, episode_id: str) -> str:
        while len(self._adapters) >= self.cfg.max_adapters:
            self.evict()
        name = f"ep{self._next}"
        self._next += 1
        self.model.add_adapter(name, self.lora_config)
        self._adapters[episode_id] = name
        return name

    # ----- test-time finetuning ----------------------------------------------------------
    def finetune_pairs(
        self,
        episode_id: str,
        target: Tensor,
        cond: Tensor,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        validation: float = 0.0,
    ) -> dict[str, float]:
        """Fit ``episode_id``'s adapter to the denoiser's own pairs: x0 ``target`` [M, X] given
        ``cond`` [M, C]. Creates the adapter if needed (evicting beyond ``max_adapters``), else
        continues training it (call again as the episode grows). Cost is ``steps`` x one
        minibatch of ``lora_batch_size``, independent of the episode length.

        ``validation`` > 0 holds out the latest fraction of the pairs (test-time training with
        a check): the adapter is fitted on the rest and kept only if it lowers the denoiser's
        loss on the held-out pairs (same noise for adapter and base); otherwise it is reset to
        zero (eps^c = eps^u: the expert abstains). Logs ``lora/kept`` (1 or 0)."""
        start = time.perf_counter()
        if target.shape[0] != cond.shape[0] or target.shape[0] == 0:
            raise ValueError(
                f"MemoryStore.finetune_pairs needs as many targets as conds (> 0), got "
                f"{tuple(target.shape)} and {tuple(cond.shape)}"
            )
        n_val = int(round(validation * target.shape[0])) if validation > 0 else 0
        if n_val < 1 or n_val >= target.shape[0]:
            n_val = 0
        val_target, val_cond = target[target.shape[0] - n_val :], cond[cond.shape[0] - n_val :]
        target, cond = target[: target.shape[0] - n_val], cond[: cond.shape[0] - n_val]
        name = self.get(episode_id) or self._create(episode_id)
        self.model.set_adapter(name)  # only this adapter's LoRA weights require grad
        self._trainable = True
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lora_lr)
        denoiser = self.model.get_base_model().denoiser
        self.model.train()
        first = last = float("nan")
        for step in range(steps or self.cfg.lora_steps):
            size = min(self.cfg.lora_batch_size, target.shape[0])
            idx = torch.randint(
                0, target.shape[0], (size,), generator=generator, device=target.device
            )
            loss, _ = denoiser.loss(target[idx], cond[idx].detach(), generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            first = loss.item() if step == 0 else first
            last = loss.item()
        self.model.eval()
        self._activate(name)
        logs = {"lora/loss_first": first, "lora/loss_last": last}
        if n_val:
            kept = self._validate(episode_id, val_target, val_cond)
            self.last_kept[episode_id] = int(kept[0])
            logs.update({"lora/kept": float(kept[0]), "lora/val_loss": kept[1],
                         "lora/val_loss_base": kept[2]})  # fmt: skip
        self.last_finetune_seconds = time.perf_counter() - start
        logs["lora/seconds"] = self.last_finetune_seconds
        return logs

    @torch.no_grad()
    def paired_loss(self, episode_id: str, target: Tensor, cond: Tensor) -> tuple[float, float]:
        """The denoiser loss on pairs x0 ``target`` [M, X] given ``cond`` [M, C] with
        ``episode_id``'s adapter and with the base, on the same noise draws (at least 256
        in all, fixed seed) -> (adapter loss, base loss)."""
        name = self._adapters[episode_id]
        denoiser = self.model.get_base_model().denoiser
        gen = torch.Generator(device=target.device).manual_seed(0)
        reps = max(1, 256 // target.shape[0])  # noise draws per pair
        x_t, t, goal = denoiser.noisy_input(target.repeat(reps, 1), gen)
        c = cond.repeat(reps, 1)
        self._activate(name)
        adapted = float((self.model.get_base_model()(x_t, t, c) - goal).pow(2).mean())
        base = float((self.predict_base(x_t, t, c) - goal).pow(2).mean())
        return adapted, base

    @torch.no_grad()
    def _validate(self, episode_id: str, target: Tensor, cond: Tensor) -> tuple[bool, float, float]:
        """Keep ``episode_id``'s adapter only if it beats the base on (target, cond) with
        shared noise draws; else zero its LoRA B matrices. -> (kept, adapter loss, base loss)."""
        name = self._adapters[episode_id]
        adapted, base = self.paired_loss(episode_id, target, cond)
        kept = adapted < base
        if not kept:
            for key, param in self.model.named_parameters():
                if f"lora_B.{name}." in key:
                    param.zero_()
        return kept, adapted, base

    # ----- inference ---------------------------------------------------------------------
    def predict(
        self, x_t: Tensor, t: Tensor, cond: Tensor, episode_ids: Sequence[str | None]
    ) -> Tensor:
        """Each row with its episode's adapter (base weights where it has none) -> [B, X]."""
        if len(episode_ids) != x_t.shape[0]:
            raise ValueError(
                f"`episode_ids` has {len(episode_ids)} entries for a batch of {x_t.shape[0]}"
            )
        names = [self.get(e) or BASE if e is not None else BASE for e in episode_ids]
        if len(set(names)) == 1:  # one adapter for the whole batch: no per-row dispatch
            if names[0] == BASE:
                return self.predict_base(x_t, t, cond)
            self._activate(names[0])
            return self.model.get_base_model()(x_t, t, cond)
        return self.model(x_t, t, cond, adapter_names=names)

    def _activate(self, name: str) -> None:
        """Make ``name`` the active adapter (frozen); a no-op when it already is (set_adapter
        walks every module, too slow to repeat at each denoising step)."""
        if self.model.active_adapter != name or self._trainable:
            self.model.set_adapter(name, inference_mode=True)
            self._trainable = False

    def predict_base(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        with self.model.disable_adapter():
            return self.model.get_base_model()(x_t, t, cond)

    # ----- base weights and adapter transfer ---------------------------------------------
    def base_state_dict(self) -> dict[str, Tensor]:
        """The copy's frozen base weights under the denoiser's own names."""
        out = {}
        for key, value in self.model.get_base_model().state_dict().items():
            if "lora_" not in key:
                out[key.replace(".base_layer", "").removeprefix(PREFIX)] = value
        return out

    @torch.no_grad()
    def sync_base(self, denoiser: Denoiser) -> None:
        """Copy ``denoiser``'s current weights into the frozen base (adapters are kept)."""
        base = self.base_state_dict()
        for key, value in denoiser.state_dict().items():
            base[key].copy_(value)

    def export(self, episode_id: str) -> dict[str, Tensor]:
        """The LoRA weights of ``episode_id`` (a state dict to move or save the memory)."""
        name = self.get(episode_id)
        if name is None:
            raise KeyError(f"episode {episode_id!r} has no adapter; stored: {self.episode_ids}")
        return {
            k: v.detach().clone()
            for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()
        }

    def adapters(self) -> OrderedDict[str, dict[str, Tensor]]:
        """Every episode's LoRA weights, in eviction order (to save the store; unlike
        :meth:`export` this does not mark the episodes used)."""
        return OrderedDict(
            (episode_id, {k: v.detach().clone()
                          for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()})
            for episode_id, name in self._adapters.items()
        )  # fmt: skip

    def import_adapter(self, episode_id: str, state: dict[str, Tensor]) -> None:
        """Install LoRA weights from :meth:`export` as ``episode_id``'s adapter."""
        name = self.get(episode_id) or self._create(episode_id)
        set_peft_model_state_dict(self.model, state, adapter_name=name)
