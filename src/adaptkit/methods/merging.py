"""Weighted merges of LoRA-family adapters into one new LoRA adapter: `ak.merge_adapters`.

    model.add_adapter(...)  # or load_adapter: the inputs, LoRA (plain, rsLoRA or DoRA, any ranks) or AdaLoRA
    ak.merge_adapters(model, {"help": 0.6, "ui": 0.4}, method="ties", density=0.3, out="help+ui")
    model.save_adapter("help+ui", "help+ui.safetensors")   # one file; its header says what was merged

Every input i contributes, on each module p it adapts, its task vector (the matrix it adds to W):

    LoRA      ΔW_i = s_i · B_i A_i              s_i = alpha / r, or alpha / sqrt(r) with use_rslora
    AdaLoRA   ΔW_i = s_i · P_i diag(Λ_i) Q_i    over the kept triplets only (what its file holds and,
                                                once its pattern is fixed, what its forward uses);
                                                s_i = alpha / (init_r + 1e-5), as AdaLoRA computes it

and ΔW_i = 0 on a module it does not adapt. Each input's own scaling is applied before anything is
combined, so inputs of different ranks, rsLoRA or not, mix correctly. With weights w_i, per module:

    "linear"       ΔW = Σ w_i ΔW_i, exactly: the factors side by side along the rank, each scaled by
                   sqrt(|w_i s_i|) (the sign on A), a LoRA of rank Σ r_i. No SVD, no cross terms.
    "cat"          ΔW = Σ w_i ΔW_i, exactly, in peft's "cat" layout: A = [w_i s_i A_i], B = [B_i].
                   The same matrix as "linear"; only how the scale is split between B and A differs.
    "svd"          ΔW = the best rank-k approximation (Eckart–Young) of Σ w_i ΔW_i: its truncated
                   SVD, k = `rank`, by default the largest rank among the inputs (an AdaLoRA's
                   largest kept rank).
    "ties"         TIES (Yadav et al. 2023) on the task vectors: trim each ΔW_i to its ⌊density · n⌋
                   largest-magnitude entries (n = out · in: ranked per module, as peft and mergekit
                   do; the paper's code ranks over the whole model), v_i = w_i · trimmed ΔW_i; elect
                   a sign per entry, γ = sgn(Σ v_i) ("total") or sgn(Σ sgn(v_i)) ("frequency"); keep the
                   v_i whose sign is γ and take their mean (disjoint mean; 0 where none agrees, or where
                   the election ties, sgn(0) = 0). With every w_i = λ this is the paper's λ · τ_m.
    "dare_linear"  DARE (Yu et al. 2023): each entry of each ΔW_i kept with probability `density` and
                   the kept ones divided by `density`, then Σ w_i (dropped and rescaled ΔW_i).
    "dare_ties"    DARE's drop and rescale, then TIES's sign election and disjoint mean (no trim).

The three combining rules then store the result as a LoRA through its SVD, ΔW = (U √S)(√S Vᵀ), cut
to `rank` singular values; `rank=None` keeps every singular value above float64 rounding (σ_j >
σ_1 · max(out, in) · eps64, torch.linalg.matrix_rank's rule), so the stored ΔW is the combined matrix
itself. That cut is the only approximation any method makes; the header records how much of ΔW it
dropped (`relative_truncation_error`, ‖dropped‖_F / ‖ΔW‖_F over all modules).

DARE's random drops are seeded and independent of everything but their own input and module: the
keep mask of input `name` on module `path` is `torch.rand(out, in, dtype=float64, generator=g) <
density` with `g` seeded by the first 8 bytes (little-endian, top bit cleared) of
sha256(f"{seed}\\0{name}\\0{path}"), so adding an input or a module never redraws another's mask.

DoRA inputs (`use_dora=True`; methods/dora.py), "linear" and "cat" only. A DoRA input's whole change of W is

    ΔF_i = W'_i − W = (g_i − 1) ⊙ W + g_i ⊙ s_i B_i A_i      g_i = m_i / ‖W + s_i B_i A_i‖_c, per output row

(a LoRA or AdaLoRA input: g_i = 1, ΔF_i = ΔW_i). With G = 1 + Σ w_i (g_i − 1), per output row,

    W + Σ w_i ΔF_i = G ⊙ (W + Σ (w_i g_i / G) ⊙ s_i B_i A_i)

exactly: a DoRA adapter whose direction update B A is the inputs' factors side by side as above, each B_i's
rows scaled by g_i / G ("linear": B_i · sqrt(|w_i s_i|) · g_i / G; "cat": B_i · g_i / G), rank Σ r_i, scaling
1, and magnitude m = G ⊙ ‖W + B A‖_c. g_i, G and m are computed in float64 from the backbone's own W (so
merge_adapters refuses while an adapter is merged into it) and stored in the inputs' dtype. Where some
|G| < 1e-6 the row is no longer G times a direction the factors can carry (they would hold 1/G): refused.
When any input is DoRA the result is DoRA (use_dora=True) on every module it targets (G = 1 where no DoRA
input adapts it). "svd", "ties" and "dare_*" refuse DoRA inputs: their truncation, trimming and drops act on
a low-rank task vector, and DoRA's ΔF_i is not one ((g_i − 1) ⊙ W is full rank); applied to the directions
alone, with the magnitude recomputed, they would no longer approximate Σ w_i ΔF_i in any stated sense.

The result is a new adapter in the bank, a plain LoRA (DoRA when an input is DoRA, above): r = the largest
stored rank over the modules (modules of lower rank padded with zero factors, which add nothing), alpha = r
and use_rslora False, so its scaling is exactly 1 and the factors carry every scale. It targets the union
of the inputs' modules. It routes, saves, loads, exports to peft and merges into the backbone like any LoRA. Its
factors are computed in float64 and stored in the inputs' dtype: in float32 each stored product
B[o, k] A[k, i] is off by at most 2u + u² of itself (u = 2⁻²⁴), which bounds |ΔW_stored − ΔW| by
(2u + u²) · (|B| |A|) entrywise (tests/test_merging.py checks exactly that against float64).

Its metadata (written to the file as `adaptkit.merge`, JSON; core/adapterfile.py) records the
provenance: the method, density, majority_sign, seed, requested and stored rank, the truncation
error, and per input its name, weight, family, use_dora, config and the sha256 of the file it was loaded
from (null when it was made in memory). Routing keys (task, src_lang, tgt_lang, domain) are the inputs'
where every input has the same value, absent otherwise, unless given.

Refused, with a message: other families (prefix, bottleneck: their updates do not add up as
matrices), inputs with a task head, DoRA inputs to "svd", "ties" and "dare_*", and DoRA inputs while
an adapter is merged into the backbone (above). Any LoRA or AdaLoRA update that
carries a parameter this module does not know is refused the same way, so a variant added later is
never merged by silently ignoring its extra parameter.

peft's `add_weighted_adapter` (0.22) agrees with these definitions for "cat" and "svd" (rsLoRA
included, since 0.22 resets use_rslora on the merged config) and, at equal weights, for "ties_svd";
its "linear", "ties", "dare_*" and "magnitude_prune" combine A and B separately, which adds cross
terms B_i A_j (1.0 of ‖ΔW‖ off for two rank-4 rsLoRA inputs in tests/test_merging.py), and refuse
inputs of different ranks; AdaLoRA models refuse merging at all. peft's TIES elects the sign on the
unweighted task vectors, ours on the weighted ones (v_i above): the same at equal weights, and only
the latter keeps a negative weight's contribution on the side of its own sign.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from adaptkit.core.adapterfile import ROUTING_KEYS
from adaptkit.core.errors import AdapterError
from adaptkit.methods.adalora import AdaLoRAAdapter
from adaptkit.methods.base import Adapter
from adaptkit.methods.dora import dense_weight
from adaptkit.methods.lora import LoRA, LoRAAdapter

if TYPE_CHECKING:
    from adaptkit.core.bank import AdaptedModel

MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
_SIGN_METHODS = ("ties", "dare_ties")
_SVD_METHODS = ("svd", *_DENSITY_METHODS)
# The parameters each family's update holds; anything more (DoRA's magnitude, a bias) is refused, not ignored.
_KNOWN_PARAMETERS = {LoRAAdapter: {"lora_A", "lora_B"}, AdaLoRAAdapter: {"P", "Lambda", "Q"}}
_DORA_PARAMETERS = {"lora_magnitude"}  # known only on an update that is DoRA (update.dora)
_DORA_METHODS = ("linear", "cat")
_MIN_G = 1e-6  # |G| below this: refused (module docstring)


@dataclass(frozen=True)
class LowRankTerm:
    """One input's update on one module, ΔW = scale · B A, factors in float64 on the CPU."""

    B: torch.Tensor  # (out × r)
    A: torch.Tensor  # (r × in)
    scale: float
    # DoRA: g = m / ‖W + scale · B A‖_c (out), its whole change of W being (g − 1) ⊙ W + g ⊙ scale · B A
    row_factor: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


def low_rank_terms(adapter: Adapter) -> dict[str, LowRankTerm]:
    """module path → the adapter's update there as a LowRankTerm; AdapterError for what cannot be merged."""
    family = type(adapter)
    if family not in _KNOWN_PARAMETERS:
        raise AdapterError(
            f"merge_adapters merges LoRA-family adapters (lora, adalora); {adapter.name!r} is a {adapter.method} "
            "adapter, whose update is not a matrix added to a weight, so no weighted sum of it is defined")
    if adapter.head is not None:
        raise AdapterError(f"adapter {adapter.name!r} carries a task head ({type(adapter.head).__name__}); "
                           "merge_adapters merges weight updates only and would silently drop the head")
    terms = {}
    modules = {target.name: target.module for target in adapter.targets}
    with torch.no_grad():
        for path, update in adapter.site_items():
            dora = getattr(update, "dora", False)
            known = _KNOWN_PARAMETERS[family] | (_DORA_PARAMETERS if dora else set())
            extra = sorted({n for n, _ in update.named_parameters()} - known)
            if extra:
                raise AdapterError(f"adapter {adapter.name!r} ({adapter.method}) has parameters {extra} on {path}, "
                                   "which merge_adapters does not know how to merge; it refuses rather than "
                                   "ignoring them")
            if family is LoRAAdapter:
                B, A, scale = _f64(update.lora_B), _f64(update.lora_A), float(update.scale)
                factor = None
                if dora:  # g = m / ‖W + s·B A‖_c, in float64 from the backbone's W
                    weight = _f64(dense_weight(modules[path]))
                    factor = _f64(update.lora_magnitude) / torch.linalg.norm(weight + scale * (B @ A), dim=1)
                terms[path] = LowRankTerm(B, A, scale, factor)
            else:
                # The kept triplets only, whatever Λ holds at pruned ranks (an optimizer step may have revived
                # one): the file holds these, and once the pattern is fixed the forward uses only these.
                keep = update.kept.nonzero().view(-1).cpu()
                P, Lambda, Q = (_f64(t) for t in (update.P, update.Lambda, update.Q))
                terms[path] = LowRankTerm(P[:, keep], Lambda[keep, None] * Q[keep], float(update.scale))
    return terms


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def merge_adapters(model: AdaptedModel, weights: Mapping[str, float], method: str = "linear", *, out: str,
                   density: float | None = None, majority_sign: str | None = None, rank: int | None = None,
                   seed: int = 0, task: str | None = None, src_lang: str | None = None, tgt_lang: str | None = None,
                   domain: str | None = None) -> Adapter:
    """Add a new LoRA adapter `out` to `model` whose update is the `method` merge of the weighted inputs.

    weights: input adapter name → weight (any finite number, negative subtracts). method: one of
    MERGE_METHODS (module docstring: exact definitions). density: the fraction kept by ties / dare_*.
    majority_sign: "total" (default) or "frequency", for ties / dare_ties. rank: the stored rank for svd
    (default: the inputs' largest) and ties / dare_* (default None: every singular value, exact).
    Inputs must be loaded, or in the model's store (then they are loaded).
    seed: DARE's drops. task / src_lang / tgt_lang / domain: routing keys of the result (default: the
    inputs' where they all agree). Returns the new adapter; `model.save_adapter(out, ...)` writes it.
    """
    names, weight_values = _check_weights(weights)
    _check_options(method, density, majority_sign, rank, seed)
    if out in model.adapters:
        raise AdapterError(f"an adapter named {out!r} is already loaded; choose another name for the merge")
    for name in names:  # an input in the store but not resident loads as routing to it would
        if name not in model.adapters and model.load_on_use and model.store is not None and name in model.store:
            model.load_from_store(name)
    token = model.pin(names)  # no other thread may remove or evict an input while its factors are read
    try:
        adapters = [model.get_adapter(name) for name in names]
        dora = [n for n, a in zip(names, adapters) if getattr(a.config, "use_dora", False)]
        if dora and method not in _DORA_METHODS:
            raise AdapterError(
                f"method {method!r} does not merge DoRA adapters ({', '.join(map(repr, dora))}): its truncation, "
                "trimming or drops act on a low-rank task vector, and a DoRA adapter's change of W, "
                "(g − 1) ⊙ W + g ⊙ s·B A, is not one. Use 'linear' or 'cat' (exact for DoRA)")
        if dora and model.merged_adapter is not None:
            raise AdapterError(f"{model.merged_adapter!r} is merged into the backbone, and merging DoRA adapters "
                               f"({', '.join(map(repr, dora))}) reads the backbone's own W: unmerge_adapter() first")
        terms = [low_rank_terms(adapter) for adapter in adapters]
        metadata = [model.adapter_metadata(name) for name in names]
        versions = [model.adapter_version(name) for name in names]
    finally:
        model.unpin(token)
    order = [site.name for site in model.arch.linears]
    paths = [p for p in order if any(p in t for t in terms)]  # the union, in backbone order
    dropped_sq = total_sq = 0.0  # what the SVD step cut, over all modules (linear and cat cut nothing)
    magnitudes = {}
    if method in ("linear", "cat"):
        factors = {}
        modules = {site.name: site.module for site in model.arch.linears}
        for p in paths:
            parts = [(t[p], w) for t, w in zip(terms, weight_values) if p in t]
            if not dora:
                factors[p] = _concatenated(method, parts)
                continue
            factors[p], magnitudes[p] = _dora_concatenated(method, p, parts, _f64(dense_weight(modules[p])))
    else:
        k = rank if rank is not None else (max(t.rank for ts in terms for t in ts.values()) if method == "svd"
                                          else None)
        factors = {}
        for p in paths:
            combined = _combined(method, p, names, [t.get(p) for t in terms], weight_values, density,
                                 majority_sign or "total", seed)
            factors[p], dropped, total = _factorized(combined, k)
            dropped_sq, total_sq = dropped_sq + dropped, total_sq + total
    stored_rank = max(1, max(A.shape[0] for _, A in factors.values()))
    dtype = next(adapters[0].parameters()).dtype
    tensors = {}
    for p, (B, A) in factors.items():
        pad = stored_rank - A.shape[0]  # zero ranks add nothing: one rank for the whole adapter, as LoRA has
        tensors[f"{p}.lora_A"] = torch.nn.functional.pad(A, (0, 0, 0, pad)).to(dtype)
        tensors[f"{p}.lora_B"] = torch.nn.functional.pad(B, (0, pad)).to(dtype)
        if dora:
            tensors[f"{p}.lora_magnitude"] = magnitudes[p].to(dtype)
    provenance = {
        "method": method,
        "inputs": [{"name": n, "weight": w, "method": a.method, "use_dora": n in dora,
                    "config": a.config_for_file().to_dict(), "sha256": v}
                   for n, w, a, v in zip(names, weight_values, adapters, versions)],
        "density": density,
        "majority_sign": (majority_sign or "total") if method in _SIGN_METHODS else None,
        "seed": seed if method.startswith("dare") else None,
        "rank": rank,
        "stored_rank": stored_rank,
        "relative_truncation_error": math.sqrt(dropped_sq / total_sq) if total_sq else 0.0,
    }
    keys = _routing_keys(metadata, dict(task=task, src_lang=src_lang, tgt_lang=tgt_lang, domain=domain))
    # alpha = r: scaling exactly 1 (r / r), the factors carry every scale; never rsLoRA (that would be sqrt(r))
    config = LoRA(r=stored_rank, alpha=float(stored_rank), dropout=0.0, targets=tuple(paths), use_rslora=False,
                  use_dora=bool(dora))
    adapter = model.add_adapter(out, config, merge={k: v for k, v in provenance.items() if v is not None}, **keys)
    try:
        adapter.load_adapter_state_dict(tensors)
    except BaseException:
        model.remove_adapter(out)
        raise
    return adapter


def _check_weights(weights: Mapping[str, float]) -> tuple[list[str], list[float]]:
    if not isinstance(weights, Mapping) or not weights:
        raise AdapterError("merge_adapters takes a non-empty mapping of adapter name → weight, "
                           "e.g. {'a': 0.5, 'b': 0.5}")
    names, values = [], []
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterError(f"the weight of {name!r} must be a finite number, got {weight!r}")
        names.append(name)
        values.append(float(weight))
    return names, values


def _check_options(method: str, density: float | None, majority_sign: str | None, rank: int | None,
                   seed: int) -> None:
    if method not in MERGE_METHODS:
        raise AdapterError(f"unknown merge method {method!r}; use one of {list(MERGE_METHODS)}")
    if method in _DENSITY_METHODS:
        if density is None or isinstance(density, bool) or not 0 < density <= 1:
            raise AdapterError(f"method {method!r} needs density in (0, 1] (the fraction of entries kept), "
                               f"got {density!r}")
    elif density is not None:
        raise AdapterError(f"density applies to {list(_DENSITY_METHODS)} only; method {method!r} would ignore it")
    if majority_sign is not None:
        if method not in _SIGN_METHODS:
            raise AdapterError(f"majority_sign applies to {list(_SIGN_METHODS)} only; method {method!r} would "
                               "ignore it")
        if majority_sign not in ("total", "frequency"):
            raise AdapterError(f"majority_sign is 'total' or 'frequency', got {majority_sign!r}")
    if rank is not None:
        if method not in _SVD_METHODS:
            raise AdapterError(f"rank applies to {list(_SVD_METHODS)}; method {method!r} is exact at the sum of "
                               "the inputs' ranks (use 'svd' to cut it)")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"rank must be a positive integer or None, got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AdapterError(f"seed must be an integer, got {seed!r}")


def _concatenated(method: str, parts: list[tuple[LowRankTerm, float]],
                  row_scales: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A = Σ w s diag(row_scale_i) B_i A_i exactly (row_scale_i = 1 without row_scales): the inputs'
    factors side by side along the rank."""
    Bs, As = [], []
    for i, (term, weight) in enumerate(parts):
        c = weight * term.scale
        B = term.B if row_scales is None else row_scales[i][:, None] * term.B
        if method == "linear":
            # sqrt on both sides keeps B and A of comparable size; the sign goes on one side only
            root = math.sqrt(abs(c))
            Bs.append(root * B)
            As.append(math.copysign(root, c) * term.A)
        else:  # peft's cat: the whole weight and scale on A
            Bs.append(B)
            As.append(c * term.A)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def _dora_concatenated(method: str, path: str, parts: list[tuple[LowRankTerm, float]], weight: torch.Tensor
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((B, A), m) of the DoRA merge on one module (module docstring), W = `weight` (out × in, float64):
    G = 1 + Σ w_i (g_i − 1), B A = Σ (w_i g_i / G) ⊙ s_i B_i A_i, m = G ⊙ ‖W + B A‖_c."""
    ones = torch.ones(weight.shape[0], dtype=torch.float64)
    factors = [ones if term.row_factor is None else term.row_factor for term, _ in parts]
    G = 1 + sum(w * (g - 1) for (_, w), g in zip(parts, factors))
    small = G.abs() < _MIN_G
    if small.any():
        rows = small.nonzero().view(-1)[:5].tolist()
        raise AdapterError(f"merging these DoRA adapters leaves {path} rows {rows}{'…' if small.sum() > 5 else ''} "
                           f"with G = 1 + Σ w_i (g_i − 1) = {G[rows[0]].item():.3g} (|G| < {_MIN_G}): the merged "
                           "weight there is not G times a direction the factors can carry (they would hold 1/G). "
                           "Change the weights")
    B, A = _concatenated(method, parts, [g / G for g in factors])
    return (B, A), G * torch.linalg.norm(weight + B @ A, dim=1)


def _combined(method: str, path: str, names: list[str], terms: list[LowRankTerm | None], weights: list[float],
              density: float | None, majority_sign: str, seed: int) -> torch.Tensor:
    """The merged ΔW of one module (float64), before it is factorized."""
    present = [(n, t.delta(), w) for n, t, w in zip(names, terms, weights) if t is not None]
    if method == "svd":
        return sum(w * delta for _, delta, w in present)
    if method == "ties":
        vectors = [w * trimmed(delta, density) for _, delta, w in present]
        return disjoint_mean(torch.stack(vectors), majority_sign)
    dropped = [w * delta * dare_keep_mask(seed, n, path, delta.shape, density) / density for n, delta, w in present]
    if method == "dare_linear":
        return sum(dropped)
    return disjoint_mean(torch.stack(dropped), majority_sign)


def trimmed(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the ⌊density · n⌋ largest-magnitude entries kept, the rest zero."""
    n = delta.numel()
    # density · n in binary floating point can land just below an integer (0.29 · 100 = 28.999…): nudge it
    k = min(n, math.floor(density * n + 1e-9))
    if k >= n:
        return delta
    flat = delta.reshape(-1)
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(k).indices
    kept[index] = flat[index]
    return kept.view_as(delta)


def disjoint_mean(vectors: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES's sign election and disjoint mean over the stacked (weighted) task vectors."""
    signs = vectors.sign()
    elected = (vectors.sum(0) if majority_sign == "total" else signs.sum(0)).sign()
    # sgn(0) = 0 agrees with no entry: a tied election keeps nothing, favouring neither sign
    agree = (signs == elected) & (signs != 0)
    return (vectors * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_keep_mask(seed: int, name: str, path: str, shape: torch.Size, density: float) -> torch.Tensor:
    """DARE's keep mask of input `name` on module `path`: seeded by (seed, name, path) only."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{path}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(shape, generator=generator, dtype=torch.float64) < density


def _factorized(delta: torch.Tensor, rank: int | None) -> tuple[tuple[torch.Tensor, torch.Tensor], float, float]:
    """((B, A), ‖dropped‖_F², ‖ΔW‖_F²): ΔW's SVD balanced into B = U √S, A = √S Vᵀ, cut to `rank` singular
    values and always to those above float64 rounding (so rank=None stores ΔW itself)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    tolerance = S[0].item() * max(delta.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
    k = int((S > tolerance).sum())
    if rank is not None:
        k = min(k, rank)
    root = S[:k].sqrt()
    return (U[:, :k] * root, root[:, None] * Vh[:k]), float((S[k:] ** 2).sum()), float((S**2).sum())


def _routing_keys(metadata: list[dict[str, Any]], given: dict[str, str | None]) -> dict[str, str]:
    """Given keys win; otherwise a key all inputs share with one value; otherwise none."""
    keys = {}
    for key in ROUTING_KEYS:
        if given.get(key) is not None:
            keys[key] = given[key]
            continue
        values = {m.get(key) for m in metadata}
        if len(values) == 1 and None not in values:
            keys[key] = values.pop()
    return keys
