"""AdaLoRA: LoRA in SVD form whose rank budget moves to where it matters during training.

        x ──► W (frozen) ───────────────────────────────┐
        │                                               + ──► y = W x + scale · P diag(Λ) Q x
        └──► Q (r × in) ──► Λ (r) ──► P (out × r) ──────┘     Λ starts at zero: a new adapter is the identity

Each rank i is a triplet (P[:, i], Λ[i], Q[i]). After every optimizer step `on_step_end(step)`
scores the triplets by smoothed sensitivity |w · ∂L/∂w| times its uncertainty, and zeroes the
Λ of the least important ones until the total kept rank follows a cubic schedule from
`init_r` per module down to `target_r` per module (Zhang et al. 2023; peft's `RankAllocator`,
whose arithmetic this follows, parity-tested). A training loop that never calls `on_step_end`
would silently train plain LoRA: a gradient hook counts backward passes, warns, and saving
refuses. On save only the kept triplets are written, with the per-module ranks in the config:
a trained AdaLoRA file is a LoRA with per-module ranks.

A training loop that knows its length calls `on_train_begin(total_steps)` first (ak.train does):
the schedule is then fitted to the run, so it always ends with target_r per module.

peft form: lora_A (r × in), lora_E (r × 1), lora_B (out × r) ↔ Q, Λ, P; the kept ranks in rank_pattern.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from adaptkit.core.arch import Arch, linear_shape
from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import register_method
from adaptkit.methods.base import AdapterConfig
from adaptkit.methods.lora import (
    NO_DROPOUT,
    LowRankAdapter,
    normalize_targets,
    peft_low_rank_tensors,
    refuse_peft_options,
)

RANKNUM_EPS = 1e-5  # peft divides by (ranknum + 1e-5); kept so that peft's weights give peft's outputs


@dataclass
class AdaLoRA(AdapterConfig):
    """init_r: starting rank per module; target_r: average rank per module at the end.
    The budget stays at init_r for `tinit` steps, shrinks cubically (a reallocation every `delta_t`
    steps) until `total_steps - tfinal`, then stays fixed. tinit / tfinal default to 10% / 20% of
    total_steps (tfinal at least 1: a loop counting steps from 0 reaches the end of the schedule), and
    follow total_steps when a trainer fits the schedule to its run (`for_steps`). Update scale:
    alpha / init_r, constant, as in peft. `rank_pattern` (module path → kept rank) is written on
    save; a config that has it builds the pruned, finished adapter."""

    method = "adalora"
    init_r: int = 12
    target_r: int = 4
    total_steps: int = 1000
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "attention"
    rank_pattern: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.targets = normalize_targets(self.targets)
        # Not a field (it never reaches the file): which of tinit / tfinal were left to follow total_steps.
        self._derived = tuple(name for name in ("tinit", "tfinal") if getattr(self, name) is None)
        if self.tinit is None:
            self.tinit = self.total_steps // 10
        if self.tfinal is None:
            self.tfinal = max(1, self.total_steps // 5)
        problems = []
        if self.init_r < 1 or not 0 <= self.target_r <= self.init_r:
            problems.append(f"need init_r >= 1 and 0 <= target_r <= init_r (got {self.init_r}, {self.target_r})")
        if self.total_steps < 1 or self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_steps - self.tfinal:
            problems.append(f"tinit={self.tinit}, tfinal={self.tfinal} leave no budgeting phase within "
                            f"total_steps={self.total_steps}; need 0 <= tinit < total_steps - tfinal")
        if self.delta_t < 1:
            problems.append(f"delta_t must be at least 1, got {self.delta_t}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            problems.append(f"beta1, beta2 must lie in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if problems:
            raise AdapterError("AdaLoRA config: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_r + RANKNUM_EPS)

    def for_steps(self, total_steps: int) -> AdaLoRA:
        """The same schedule over `total_steps`: tinit / tfinal left to their defaults are derived anew,
        explicit ones kept (and checked against the new length)."""
        return dataclasses.replace(self, total_steps=total_steps, **{name: None for name in self._derived})


class SVDUpdate(nn.Module):
    """P diag(Λ) Q x for one projection; peft's lora_B, lora_E, lora_A. `kept` marks live triplets."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float):
        super().__init__()
        self.Q = nn.Parameter(torch.randn(r, in_features) * 0.02)  # peft's init: P, Q small normal, Λ zero
        self.Lambda = nn.Parameter(torch.zeros(r))
        self.P = nn.Parameter(torch.randn(out_features, r) * 0.02)
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool), persistent=False)
        # Once the pattern is final, the forward uses only the kept triplets: bit for bit what a
        # reloaded (pruned) file computes. None: all triplets take part.
        self.register_buffer("live", None, persistent=False)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else NO_DROPOUT
        self.merged = False

    @property
    def rank(self) -> int:
        return int(self.kept.sum())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.live is None:
            return self.P, self.Lambda, self.Q
        live = self.live
        return self.P.index_select(1, live), self.Lambda.index_select(0, live), self.Q.index_select(0, live)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P, Lambda, Q = self.factors()
        x = self.dropout(x.to(Q.dtype))
        return (x @ (Q * Lambda[:, None]).T @ P.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        P, Lambda, Q = self.factors()
        return (P @ (Q * Lambda[:, None])) * self.scale

    def fix_pattern(self) -> None:
        """The schedule is over: from now on only the kept triplets take part."""
        self.live = None if bool(self.kept.all()) else self.kept.nonzero().view(-1)

    def pruned(self) -> dict[str, torch.Tensor]:
        """The kept triplets only: what a file holds."""
        keep = self.kept
        return {"Q": self.Q[keep], "Lambda": self.Lambda[keep], "P": self.P[:, keep]}

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.Lambda.masked_fill_(~self.kept, 0.0)


class RankAllocator:
    """Importance scores and the budget schedule over one adapter's triplets (peft's arithmetic)."""

    def __init__(self, config: AdaLoRA, updates: list[SVDUpdate]):
        self.config = config
        self.updates = updates
        self.init_budget = sum(u.Q.shape[0] for u in updates)
        self.target_budget = config.target_r * len(updates)
        self.reset()

    def reset(self) -> None:
        self.avg_ipt: dict[nn.Parameter, torch.Tensor] = {}
        self.avg_unc: dict[nn.Parameter, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at this step, whether to reallocate now)."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_steps - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_steps - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.delta_t == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        """Sensitivity |w · grad|, smoothed (beta1), and its uncertainty (beta2)."""
        b1, b2 = self.config.beta1, self.config.beta2
        params = [p for u in self.updates for p in (u.P, u.Lambda, u.Q)]
        if all(p.grad is None for p in params):
            raise AdapterError(
                "AdaLoRA on_step_end found no gradients: call it after loss.backward() and optimizer.step(), "
                "before optimizer.zero_grad()"
            )
        for p in params:
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.avg_ipt.get(p, torch.zeros_like(p))
            unc = self.avg_unc.get(p, torch.zeros_like(p))
            self.avg_ipt[p] = avg = b1 * avg + (1 - b1) * ipt
            self.avg_unc[p] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, p: nn.Parameter) -> torch.Tensor:
        if p not in self.avg_ipt:
            return torch.zeros_like(p)
        return self.avg_ipt[p] * self.avg_unc[p]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the `budget` most important triplets of the whole adapter; zero the others' Λ."""
        scores = [self._score(u.Lambda) + self._score(u.Q).mean(dim=1) + self._score(u.P).mean(dim=0)
                  for u in self.updates]
        flat = torch.cat(scores)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(min(budget, flat.numel())).indices] = True  # exactly `budget` kept, ties or not
        for update, kept in zip(self.updates, keep.split([s.numel() for s in scores])):
            update.kept.copy_(kept)
            update.apply_mask()


@register_method
class AdaLoRAAdapter(LowRankAdapter):
    method = "adalora"
    config_class = AdaLoRA
    peft_types: ClassVar[tuple[str, ...]] = ("ADALORA",)
    # LoRA+: P is peft's lora_B; Λ is its lora_E, (r × 1) there, so 2-D and at the base lr like Q (lora_A)
    loraplus_b: ClassVar[frozenset[str]] = frozenset({"P"})

    def __init__(self, name: str, config: AdaLoRA, arch: Arch):
        super().__init__(name, config, arch)
        pattern = config.rank_pattern
        if pattern is not None:  # a saved (pruned) adapter: build each module at its kept rank
            unknown = sorted(set(pattern) - {t.name for t in self.targets})
            if unknown:
                raise AdapterError(f"AdaLoRA rank_pattern names modules that are not targets: {unknown[:3]}")
            for target in self.targets:
                in_features, out_features = linear_shape(target.module)
                self.add_site(target.name, SVDUpdate(in_features, out_features, pattern.get(target.name, 0),
                                                     config.scale, config.dropout))
        self.allocator = RankAllocator(config, [u for _, u in self.updates()])
        self.finished = pattern is not None  # the schedule has run (or the file says it ran)
        self.steps_seen = 0
        self.backward_passes = 0
        self._warned = False
        first = self.allocator.updates[0].Lambda if self.allocator.updates else None
        if first is not None:  # counts training steps, to catch a loop that forgets on_step_end
            # Through a weak reference: a tensor's hook holding its adapter is a cycle the collector never
            # breaks, and the adapter holds the backbone's Arch (so its modules) for ever.
            count = weakref.WeakMethod(self._count_backward)
            first.register_post_accumulate_grad_hook(lambda param: _call_if_alive(count, param))

    def make_update(self, in_features: int, out_features: int) -> nn.Module:
        c = self.config
        return SVDUpdate(in_features, out_features, c.init_r, c.scale, c.dropout)

    # -- training --------------------------------------------------------------------------------
    def _count_backward(self, _param: torch.Tensor) -> None:
        self.backward_passes += 1
        if self.finished or self.steps_seen or self._warned:
            return
        if self.backward_passes > max(self.config.tinit, 1):
            self._warned = True
            warnings.warn(self._forgot_message(), UserWarning, stacklevel=2)

    def _forgot_message(self) -> str:
        return (
            f"AdaLoRA adapter {self.name!r} has had {self.backward_passes} backward passes but on_step_end(step) "
            f"was never called: its rank budget is not running and it trains as plain LoRA of rank "
            f"{self.config.init_r}. Call model.get_adapter({self.name!r}).on_step_end(step) after "
            "optimizer.step() and before optimizer.zero_grad() in every step"
        )

    def on_train_begin(self, total_steps: int) -> None:
        """Fit the budget schedule to a run of `total_steps` optimizer steps (steps 0 … total_steps − 1), so
        that it ends at target_r; the saved config records it. A finished adapter keeps its pattern."""
        if self.finished or (total_steps == self.config.total_steps and self.config.tfinal >= 1):
            return
        try:
            config = self.config.for_steps(total_steps)
        except AdapterError as error:
            raise AdapterError(f"AdaLoRA adapter {self.name!r} cannot fit its schedule to a run of {total_steps} "
                               f"steps: {error}. Leave tinit / tfinal unset to scale them with the run") from None
        if config.tfinal < 1:
            raise AdapterError(f"AdaLoRA adapter {self.name!r} has tfinal=0: a run that counts steps from 0 never "
                               f"reaches step total_steps - tfinal = {total_steps}, so the rank pattern is never "
                               "fixed; use tfinal >= 1 (or leave it unset)")
        self.config = self.allocator.config = config

    def on_step_end(self, step: int) -> None:
        """update_and_allocate: score, then mask to the scheduled budget. Needs this step's gradients."""
        self.steps_seen += 1
        if self.finished:
            for _, update in self.updates():
                update.apply_mask()  # the optimizer may have revived a masked Λ
            return
        end = self.config.total_steps - self.config.tfinal
        if step < end:
            self.allocator.update_scores()
            budget, reallocate = self.allocator.budget(step)
            if reallocate:
                self.allocator.mask_to_budget(budget)
        else:  # the first call at or past the end of the schedule fixes the final pattern
            self.allocator.mask_to_budget(self.allocator.target_budget)
            self.allocator.reset()
            for _, update in self.updates():
                update.fix_pattern()
            self.finished = True

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Masks, importance averages and counters: without them a resumed run reallocates differently."""
        names = {p: n for n, p in self.named_parameters()}
        tensors = {f"kept:{path}": u.kept.clone() for path, u in self.site_items()}
        for kind, averages in (("ipt", self.allocator.avg_ipt), ("unc", self.allocator.avg_unc)):
            tensors.update({f"{kind}:{names[p]}": v.detach().clone() for p, v in averages.items()})
        info = {"finished": self.finished, "steps_seen": self.steps_seen, "backward_passes": self.backward_passes}
        return tensors, info

    @torch.no_grad()
    def load_training_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        params = dict(self.named_parameters())
        for path, update in self.site_items():
            update.kept.copy_(tensors[f"kept:{path}"])
        for kind, averages in (("ipt", self.allocator.avg_ipt), ("unc", self.allocator.avg_unc)):
            averages.clear()
            for key, value in tensors.items():
                if key.startswith(kind + ":"):
                    averages[params[key[len(kind) + 1:]]] = value.to(params[key[len(kind) + 1:]].device)
        self.finished, self.steps_seen = info["finished"], info["steps_seen"]
        self.backward_passes = info["backward_passes"]
        for _, update in self.site_items():
            update.live = None
            if self.finished:
                update.fix_pattern()

    def check_trained(self) -> None:
        if self.backward_passes and not self.steps_seen and not self.finished:
            raise AdapterError(self._forgot_message() + "; the adapter cannot be saved as AdaLoRA until it has")

    def regularization_loss(self) -> torch.Tensor | None:
        """orth_reg_weight · mean ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F: keeps P and Q near-orthogonal, as SVD factors."""
        if self.config.orth_reg_weight == 0:
            return None
        terms = []
        for _, u in self.updates():
            for gram in (u.Q @ u.Q.T, u.P.T @ u.P):
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    # -- files -----------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """Kept rank per module path."""
        return {path: update.rank for path, update in self.site_items()}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{path}.{key}": t.detach().contiguous()
                for path, update in self.site_items() for key, t in update.pruned().items()}

    def config_for_file(self) -> AdaLoRA:
        return dataclasses.replace(self.config, rank_pattern=self.ranks())

    # -- peft --------------------------------------------------------------------------------------
    def to_peft(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c: AdaLoRA = self.config
        tensors, rank_pattern = {}, {}
        for path, update in self.site_items():
            kept = update.pruned()
            tensors[f"{path}.lora_A"] = kept["Q"]
            tensors[f"{path}.lora_E"] = kept["Lambda"][:, None]
            tensors[f"{path}.lora_B"] = kept["P"]
            # peft builds every module at init_r, then keeps the rows this mask selects; the tensors
            # above are already pruned, so the kept ones are listed first.
            rank = update.rank
            rank_pattern[f"{path}.lora_E"] = [True] * rank + [False] * (c.init_r - rank)
        config = dict(peft_type="ADALORA", init_r=c.init_r, target_r=c.target_r, total_step=c.total_steps,
                      tinit=c.tinit, tfinal=c.tfinal, deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2,
                      orth_reg_weight=c.orth_reg_weight, lora_alpha=c.alpha, lora_dropout=c.dropout,
                      rank_pattern=rank_pattern, **self.peft_targets())
        return config, tensors

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], arch: Arch
                  ) -> tuple[AdaLoRA, dict[str, torch.Tensor]]:
        c = peft_config
        refuse_peft_options(c, {"modules_to_save": bool(c.get("modules_to_save")),
                                f"bias={c.get('bias')!r}": c.get("bias", "none") != "none"})
        targets, ours = peft_low_rank_tensors(arch, tensors, {".lora_A": "Q", ".lora_E": "Lambda", ".lora_B": "P"})
        ours = {k: t.reshape(-1) if k.endswith(".Lambda") else t for k, t in ours.items()}
        init_r = int(c["init_r"])
        alpha = float(c.get("lora_alpha") or init_r)  # peft: scaling = lora_alpha if > 0 else r
        adalora = AdaLoRA(
            init_r=init_r, target_r=min(int(c.get("target_r", 8)), init_r), total_steps=int(c["total_step"]),
            tinit=int(c.get("tinit", 0)), tfinal=int(c.get("tfinal", 0)), delta_t=int(c.get("deltaT", 1)),
            beta1=float(c.get("beta1", 0.85)), beta2=float(c.get("beta2", 0.85)),
            orth_reg_weight=float(c.get("orth_reg_weight", 0.5)), alpha=alpha,
            dropout=float(c.get("lora_dropout", 0)), targets=targets,
            rank_pattern={p: int(ours[f"{p}.Q"].shape[0]) for p in targets},
        )
        return adalora, ours


def _call_if_alive(method: weakref.WeakMethod, *args: Any) -> None:
    bound = method()
    if bound is not None:
        bound(*args)
