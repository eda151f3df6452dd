"""ak.merge_adapters: each method's merged ΔW against a float64 reference written here from the formulas
(methods/merging.py's docstring; TIES: Yadav et al. 2023, DARE: Yu et al. 2023), computed from the input
adapters' own tensors and configs, never from the implementation's helpers.

Tolerance. The merged factors are computed in float64 and stored in float32. Each stored entry is its
float64 value rounded, relative error <= u = 2⁻²⁴; a product B[o, k] A[k, i] of two of them is then off
by <= (2u + u²) of itself, so entrywise |ΔW_stored − ΔW| <= (2u + u²) · (|B| |A|)[o, i]. The float64
arithmetic on both sides (products, sums, the SVD) adds ~1e-15 of ‖ΔW‖; 1e-12 · ‖ΔW‖_F covers it with
room. `factor_bound` is that sum: a wrong scale, a dropped rank or a cross term is many orders above it.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import adaptkit as ak
from numerics import assert_close_to_rounding, depth_of
from tiny import tiny_batch, tiny_model, with_random_adapters

WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.3}


# -- the inputs: rsLoRA r=4, plain LoRA r=2 on other modules, AdaLoRA with pruned ranks ---------------------

def inputs_model(arch: str = "llama") -> ak.AdaptedModel:
    model = ak.AdaptedModel(tiny_model(arch))
    gpt2 = arch == "gpt2"
    with_random_adapters(model, {
        "a": ak.LoRA(r=4, alpha=8, targets="attention", use_rslora=True),
        "b": ak.LoRA(r=2, alpha=4, targets="ffn" if gpt2 else ("q", "v", "ffn_out")),
        "c": ak.AdaLoRA(init_r=6, target_r=2, total_steps=10, targets="attention" if gpt2 else ("k", "v", "ffn_gate")),
    }, seed=3, scale=0.5)
    prune(model.get_adapter("c"))
    return model


def prune(adalora) -> None:
    """Random kept triplets per module, one module pruned to rank 0, the pattern fixed. Λ keeps its values at
    the pruned ranks: a merge that ignored the mask would be visibly wrong."""
    generator = torch.Generator().manual_seed(7)
    for i, (_, update) in enumerate(adalora.site_items()):
        keep = torch.rand(update.kept.shape, generator=generator) < 0.6
        keep[0] = i != 1  # module 1 keeps nothing; every other keeps at least one triplet
        update.kept.copy_(keep)
        update.fix_pattern()
    adalora.finished = True


# -- the reference, from the formulas ------------------------------------------------------------------------

@torch.no_grad()
def reference_deltas(model: ak.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """module path → ΔW (out × in, float64) of one input, from its config and tensors."""
    adapter = model.get_adapter(name)
    c = adapter.config
    deltas = {}
    for path, u in adapter.site_items():
        if isinstance(c, ak.LoRA):
            scaling = c.alpha / (math.sqrt(c.r) if c.use_rslora else c.r)
            deltas[path] = scaling * (u.lora_B.double() @ u.lora_A.double())
        else:  # AdaLoRA: B diag(E · mask) A · alpha / (init_r + 1e-5)
            scaling = c.alpha / (c.init_r + 1e-5)
            mask = u.kept.double()
            deltas[path] = scaling * (u.P.double() @ torch.diag(u.Lambda.double() * mask) @ u.Q.double())
    return deltas


def ref_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    n = delta.numel()
    k = math.floor(density * n + 1e-9)
    if k >= n:
        return delta
    kth_largest = delta.abs().flatten().kthvalue(n - k + 1).values
    return delta * (delta.abs() >= kth_largest)


def ref_disjoint_mean(vectors: list[torch.Tensor], majority_sign: str) -> torch.Tensor:
    stacked = torch.stack(vectors)
    gamma = torch.sign(stacked.sum(0)) if majority_sign == "total" else torch.sign(torch.sign(stacked).sum(0))
    total, count = torch.zeros_like(vectors[0]), torch.zeros_like(vectors[0])
    for v in vectors:
        agrees = (torch.sign(v) == gamma) & (v != 0)
        total += v * agrees
        count += agrees
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def ref_dare(delta: torch.Tensor, seed: int, name: str, path: str, density: float) -> torch.Tensor:
    """The documented draw: torch.rand under a generator seeded from sha256(f"{seed}\\0{name}\\0{path}")."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{path}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return delta * keep / density


def best_rank(matrix: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None:
        return matrix
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def reference_merge(model: ak.AdaptedModel, weights: dict[str, float], method: str, density: float | None = None,
                    majority_sign: str = "total", seed: int = 0, rank: int | None = None) -> dict[str, torch.Tensor]:
    deltas = {name: reference_deltas(model, name) for name in weights}
    paths = {p for d in deltas.values() for p in d}
    merged = {}
    for p in paths:
        here = [(n, deltas[n][p], w) for n, w in weights.items() if p in deltas[n]]
        if method in ("linear", "cat", "svd"):
            m = sum(w * d for _, d, w in here)
        elif method == "ties":
            m = ref_disjoint_mean([w * ref_trim(d, density) for _, d, w in here], majority_sign)
        elif method == "dare_linear":
            m = sum(w * ref_dare(d, seed, n, p, density) for n, d, w in here)
        else:
            m = ref_disjoint_mean([w * ref_dare(d, seed, n, p, density) for n, d, w in here], majority_sign)
        merged[p] = best_rank(m, rank)
    return merged


def stored(model: ak.AdaptedModel, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The merged adapter's stored factors (B, A) per module, with its scaling checked to be exactly 1."""
    adapter = model.get_adapter(name)
    c = adapter.config
    assert isinstance(c, ak.LoRA) and c.alpha == c.r and not c.use_rslora and c.scale == 1.0
    return {p: (u.lora_B.detach(), u.lora_A.detach()) for p, u in adapter.site_items()}


def factor_bound(B: torch.Tensor, A: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Entrywise bound on |B A − ΔW| from rounding B, A to their dtype (module docstring)."""
    u = torch.finfo(B.dtype).eps / 2
    rounding = (2 * u + u * u) * (B.double().abs() @ A.double().abs()) * (1 + 1e-6)
    return rounding + 1e-12 * reference.norm()


def assert_factors_match(model: ak.AdaptedModel, name: str, reference: dict[str, torch.Tensor], what: str) -> None:
    factors = stored(model, name)
    assert set(factors) == set(reference), what
    for path, (B, A) in factors.items():
        merged = B.double() @ A.double()
        excess = (merged - reference[path]).abs() - factor_bound(B, A, reference[path])
        assert excess.max() <= 0, (f"{what}, {path}: |ΔW − reference| exceeds the float32 bound by "
                                   f"{excess.max():.3g} (|reference| max {reference[path].abs().max():.3g})")


# -- each method against its formula ----------------------------------------------------------------------

CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),  # rank: the inputs' largest
    ("svd", {"rank": 64}),  # above every module's size: exact
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "majority_sign": "frequency"}),
    ("ties", {"density": 0.3, "rank": 3}),
    ("dare_linear", {"density": 0.6, "seed": 5}),
    ("dare_ties", {"density": 0.6, "seed": 5}),
    ("dare_ties", {"density": 0.4, "seed": 11, "majority_sign": "frequency", "rank": 5}),
]


@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_each_method_equals_its_formula(method, options):
    model = inputs_model()
    ak.merge_adapters(model, WEIGHTS, method, out="m", **options)
    rank = options.get("rank")
    if method == "svd" and rank is None:
        # the inputs' largest rank: a's 4, b's 2, c's largest kept rank
        rank = max(4, 2, *(u.rank for _, u in model.get_adapter("c").site_items()))
    reference = reference_merge(model, WEIGHTS, method, options.get("density"), options.get("majority_sign", "total"),
                                options.get("seed", 0), rank)
    assert_factors_match(model, "m", reference, f"{method} {options}")
    # the union of the inputs' modules, nothing else, in backbone order
    union = {p for n in WEIGHTS for p, _ in model.get_adapter(n).site_items()}
    targets = model.get_adapter("m").config.targets
    assert set(targets) == union and list(targets) == [s.name for s in model.arch.linears if s.name in union]


def test_linear_is_exact_at_the_sum_of_ranks_and_svd_truncation_is_eckart_young():
    model = inputs_model()
    ak.merge_adapters(model, WEIGHTS, "linear", out="lin")
    c_ranks = {p: u.rank for p, u in model.get_adapter("c").site_items()}
    a_paths = {p for p, _ in model.get_adapter("a").site_items()}
    b_paths = {p for p, _ in model.get_adapter("b").site_items()}
    union = a_paths | b_paths | set(c_ranks)
    expected = max(4 * (p in a_paths) + 2 * (p in b_paths) + c_ranks.get(p, 0) for p in union)
    assert model.get_adapter("lin").config.r == expected
    info = model.adapter_metadata("lin")["merge"]
    assert info["relative_truncation_error"] == 0.0 and info["stored_rank"] == expected

    ak.merge_adapters(model, WEIGHTS, "svd", rank=2, out="svd2")
    full = reference_merge(model, WEIGHTS, "svd")
    dropped = total = 0.0
    for path, (B, A) in stored(model, "svd2").items():
        S = torch.linalg.svdvals(full[path])
        residual = (B.double() @ A.double() - full[path]).norm()
        # the best rank-2 approximation's error is exactly the dropped singular values (Eckart–Young)
        assert abs(residual - S[2:].norm()) <= 1e-6 * S.norm() + 1e-12, path
        dropped, total = dropped + float((S[2:] ** 2).sum()), total + float((S**2).sum())
    recorded = model.adapter_metadata("svd2")["merge"]["relative_truncation_error"]
    assert recorded == pytest.approx(math.sqrt(dropped / total), rel=1e-9)


# -- the merged adapter in use --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linear_merge_gives_the_logits_of_the_weighted_sum(arch, float64):
    """The merged adapter's forward equals a hook-free backbone whose weights are W + Σ w_i ΔW_i."""
    model = inputs_model(arch)
    ak.merge_adapters(model, WEIGHTS, "linear", out="m")
    batch = tiny_batch(arch)
    logits = model(**batch, adapter="m").logits

    reference = tiny_model(arch)  # the same seed: the same backbone, no adapters, no hooks
    merged = reference_merge(model, WEIGHTS, "linear")
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for path, delta in merged.items():
            module = modules[path]
            module.weight += delta.T if isinstance(module, Conv1D) else delta
    expected = reference(**batch).logits
    assert_close_to_rounding(logits, expected, depth_of(model), f"{arch} merged adapter vs W + Σ w ΔW")


def test_merge_adapter_into_the_backbone_keeps_working(float64):
    model = inputs_model()
    ak.merge_adapters(model, WEIGHTS, "ties", density=0.5, out="m")
    batch = tiny_batch("llama")
    routed = model(**batch, adapter="m").logits
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.merge_adapter("m")
    assert_close_to_rounding(model(**batch, adapter=None).logits, routed, depth_of(model), "merged into W")
    model.unmerge_adapter()
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- the file: routing keys and provenance ------------------------------------------------------------------

def test_the_file_carries_routing_keys_and_provenance(tmp_path):
    source = inputs_model()
    paths = {
        "a": source.save_adapter("a", tmp_path / "a.safetensors", src_lang="en", tgt_lang="de", domain="help"),
        "c": source.save_adapter("c", tmp_path / "c.safetensors", src_lang="en", tgt_lang="de", domain="ui"),
    }
    model = ak.AdaptedModel(tiny_model("llama"))
    for name, path in paths.items():
        model.load_adapter(path, name)
    weights = {"a": 0.6, "c": 0.4}
    ak.merge_adapters(model, weights, "dare_linear", density=0.7, seed=9, out="m")
    out = model.save_adapter("m", tmp_path / "m.safetensors")
    info = ak.read_adapter_info(out)
    assert (info["src_lang"], info["tgt_lang"]) == ("en", "de") and "domain" not in info  # domains disagree
    merge = info["merge"]
    assert (merge["method"], merge["density"], merge["seed"], merge["stored_rank"]) == ("dare_linear", 0.7, 9,
                                                                                       info["config"]["r"])
    described = [(i["name"], i["weight"], i["method"]) for i in merge["inputs"]]
    assert described == [("a", 0.6, "lora"), ("c", 0.4, "adalora")]
    assert [i["sha256"] for i in merge["inputs"]] == [ak.read_adapter_info(paths[n])["sha256"] for n in weights]
    assert merge["inputs"][0]["config"]["use_rslora"] is True and "rank_pattern" in merge["inputs"][1]["config"]

    # the loaded file is the same adapter, bit for bit, and saving it again keeps its provenance
    model.load_adapter(out, "m2")
    for (B, A), (B2, A2) in zip(stored(model, "m").values(), stored(model, "m2").values()):
        assert torch.equal(B, B2) and torch.equal(A, A2)
    assert ak.read_adapter_info(model.save_adapter("m2", tmp_path / "m2.safetensors"))["merge"] == merge
    # the pruned AdaLoRA loaded from its file (per-module ranks) merges as the in-memory one did
    assert_factors_match(model, "m", reference_merge(model, weights, "dare_linear", 0.7, seed=9), "from files")

    ak.merge_adapters(model, weights, "linear", out="given", domain="software")
    assert model.adapter_metadata("given")["domain"] == "software"


def test_dare_is_seeded():
    model = inputs_model()
    for out, seed in (("s1", 1), ("s1again", 1), ("s2", 2)):
        ak.merge_adapters(model, WEIGHTS, "dare_ties", density=0.5, seed=seed, out=out)
    one, again, two = (stored(model, n) for n in ("s1", "s1again", "s2"))
    assert all(torch.equal(one[p][0], again[p][0]) and torch.equal(one[p][1], again[p][1]) for p in one)
    assert any(not torch.equal(one[p][0] @ one[p][1], two[p][0] @ two[p][1]) for p in one)


# -- refusals ------------------------------------------------------------------------------------------

def test_what_cannot_be_merged_is_refused():
    model = inputs_model()
    model.add_adapter("prefix", ak.Prefix(length=2))
    model.add_adapter("bottleneck", ak.Bottleneck(reduction=4))
    for name in ("prefix", "bottleneck"):
        with pytest.raises(ak.AdapterError, match="merges LoRA-family adapters"):
            ak.merge_adapters(model, {"a": 1.0, name: 1.0}, out="m")
    refused = [
        (dict(weights={"a": float("nan")}), "finite"),
        (dict(weights={}), "non-empty"),
        (dict(weights=WEIGHTS, method="magnitude"), "unknown merge method"),
        (dict(weights=WEIGHTS, method="ties"), "needs density"),
        (dict(weights=WEIGHTS, method="dare_linear", density=0.0), "needs density"),
        (dict(weights=WEIGHTS, method="linear", density=0.5), "density applies"),
        (dict(weights=WEIGHTS, method="dare_linear", density=0.5, majority_sign="total"), "majority_sign applies"),
        (dict(weights=WEIGHTS, method="cat", rank=2), "rank applies"),
        (dict(weights=WEIGHTS, out="a"), "already loaded"),
        (dict(weights={"nope": 1.0}), "not loaded"),
    ]
    for kwargs, message in refused:
        kwargs.setdefault("out", "m")
        with pytest.raises(ak.AdapterError, match=message):
            ak.merge_adapters(model, **kwargs)
    assert "m" not in model.adapters


def test_an_update_with_parameters_it_does_not_know_is_refused_not_ignored():
    """A magnitude on an update that is not DoRA, a bias, any later variant: refused by name, not merged without it."""
    model = inputs_model()
    update = next(u for _, u in model.get_adapter("b").site_items())
    update.register_parameter("lora_magnitude", torch.nn.Parameter(torch.ones(update.lora_B.shape[0])))
    with pytest.raises(ak.AdapterError, match=r"parameters \['lora_magnitude'\]"):
        ak.merge_adapters(model, {"a": 1.0, "b": 1.0}, out="m")


# -- DoRA inputs: the exact rule of "linear" / "cat" -------------------------------------------------------

def dora_model() -> ak.AdaptedModel:
    """Two DoRA adapters (one rsLoRA) and a plain LoRA on overlapping modules, seeded random A and B, magnitudes
    ‖W + s·B A‖_c times a seeded factor in [0.5, 1.5] (so g ≠ 1, and G stays away from 0 at the test weights)."""
    model = ak.AdaptedModel(tiny_model("llama"))
    with_random_adapters(model, {
        "d": ak.LoRA(r=4, alpha=8, targets="attention", use_dora=True),
        "e": ak.LoRA(r=2, alpha=4, targets=("q", "v", "ffn_out"), use_dora=True, use_rslora=True),
        "l": ak.LoRA(r=3, alpha=3, targets=("k", "v", "ffn_gate")),
    }, seed=5, scale=0.5)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name in ("d", "e"):
            adapter = model.get_adapter(name)
            for target, u in adapter.updates():
                norm = (target.module.weight.double() + u.scale * (u.lora_B.double() @ u.lora_A.double())).norm(dim=1)
                u.lora_magnitude.copy_(norm * (0.5 + torch.rand(norm.shape, generator=generator, dtype=torch.float64)))
    return model


@torch.no_grad()
def full_changes(model: ak.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """module path → W'_i − W (float64) of one input, from the DoRA / LoRA formulas."""
    adapter = model.get_adapter(name)
    changes = {}
    for target, u in adapter.updates():
        weight = target.module.weight.double()
        low_rank = adapter.config.scale * (u.lora_B.double() @ u.lora_A.double())
        if adapter.config.use_dora:
            directed = weight + low_rank
            changes[target.name] = (u.lora_magnitude.double() / directed.norm(dim=1))[:, None] * directed - weight
        else:
            changes[target.name] = low_rank
    return changes


DORA_CASES = [("linear", {"d": 0.7, "e": -0.4}), ("cat", {"d": 0.6, "e": 0.5}), ("linear", {"d": 0.8, "l": 0.5}),
              ("cat", {"e": -0.3, "l": 1.2, "d": 0.4})]


@pytest.mark.parametrize(("method", "weights"), DORA_CASES, ids=[f"{m}-{'+'.join(w)}" for m, w in DORA_CASES])
def test_dora_merge_gives_the_logits_of_the_weighted_sum_of_full_changes(method, weights, float64):
    """The merged DoRA adapter's forward equals a hook-free backbone with weights W + Σ w_i (W'_i − W): in
    float64 (the fixture) both are the same function up to rounding, numerics.py's bound."""
    model = dora_model()
    ak.merge_adapters(model, weights, method, out="m")
    merged = model.get_adapter("m")
    c = merged.config
    assert c.use_dora and c.scale == 1.0 and not c.use_rslora
    union = {p for n in weights for p, _ in model.get_adapter(n).site_items()}
    assert set(c.targets) == union
    sites = {n: {p for p, _ in model.get_adapter(n).site_items()} for n in weights}
    assert c.r == max(sum(model.get_adapter(n).config.r for n in weights if p in sites[n]) for p in union)  # Σ r_i
    info = model.adapter_metadata("m")["merge"]
    assert [i["use_dora"] for i in info["inputs"]] == [model.get_adapter(n).config.use_dora for n in weights]

    batch = tiny_batch("llama")
    with torch.no_grad():
        logits = model(**batch, adapter="m").logits
        bare = model(**batch, adapter=None).logits
    reference = tiny_model("llama")
    modules = dict(reference.named_modules())
    changes = {n: full_changes(model, n) for n in weights}
    with torch.no_grad():
        for path in union:
            modules[path].weight += sum(w * changes[n][path] for n, w in weights.items() if path in changes[n])
        expected = reference(**batch).logits
    assert_close_to_rounding(logits, expected, depth_of(model), f"{method} {weights}: merged vs W + Σ w (W' − W)")
    assert (logits - bare).abs().max() > 1e-3 * bare.abs().max()

    # merged into the backbone and back: the adapter's logits, then the backbone bit for bit
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.merge_adapter("m")
    with torch.no_grad():
        assert_close_to_rounding(model(**batch, adapter=None).logits, logits, depth_of(model), "merged into W")
    model.unmerge_adapter()
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dora_merge_in_float32_matches_the_float64_rule():
    """In float32 the magnitude and factors are computed in float64 and rounded once: m is the float64
    G ⊙ ‖W + B A‖_c (from the stored factors' float64 values) up to its own rounding and the factors' (2u + u²)."""
    model = dora_model()
    weights = {"d": 0.7, "e": -0.4, "l": 0.5}
    ak.merge_adapters(model, weights, "linear", out="m")
    changes = {n: full_changes(model, n) for n in weights}
    u = torch.finfo(torch.float32).eps / 2
    for target, update in model.get_adapter("m").updates():
        assert update.lora_magnitude.dtype == torch.float32
        weight = target.module.weight.double()
        total = weight + sum(w * changes[n][target.name] for n, w in weights.items() if target.name in changes[n])
        B, A = update.lora_B.double(), update.lora_A.double()
        g = update.lora_magnitude.double() / (weight + B @ A).norm(dim=1)
        merged = g[:, None] * (weight + B @ A)
        # m and B A each off by O(u) of themselves: W' off by a few u of |G| (|W| + |B| |A|), row by row
        bound = 8 * u * g.abs()[:, None] * (weight.abs() + B.abs() @ A.abs()).max(dim=1, keepdim=True).values
        assert ((merged - total).abs() <= bound).all(), target.name


def test_dora_refusals():
    model = dora_model()
    for method, options in (("svd", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5}),
                            ("dare_ties", {"density": 0.5})):
        with pytest.raises(ak.AdapterError, match="does not merge DoRA adapters.*not one"):
            ak.merge_adapters(model, {"d": 0.5, "l": 0.5}, method, out="m", **options)
    # G = 1 + Σ w (g − 1) = 0 on every row: w = 1 / (1 − g) for a single input with g constant per row
    adapter = model.get_adapter("d")
    with torch.no_grad():
        for target, u in adapter.updates():
            norm = (target.module.weight.double() + u.scale * (u.lora_B.double() @ u.lora_A.double())).norm(dim=1)
            u.lora_magnitude.copy_(norm * 0.5)  # g = 0.5 (to float32 rounding): G = 1 + w (g − 1) = 0 at w = 2
    with pytest.raises(ak.AdapterError, match=r"\|G\| < 1e-06"):
        ak.merge_adapters(model, {"d": 2.0}, out="m")
    model.merge_adapter("l")
    with pytest.raises(ak.AdapterError, match="reads the backbone's own W: unmerge_adapter"):
        ak.merge_adapters(model, {"e": 1.0}, out="m")
    model.unmerge_adapter()
    assert "m" not in model.adapters


# -- peft's add_weighted_adapter on the same rsLoRA adapters ---------------------------------------------------

def test_peft_add_weighted_adapter_differs_from_the_formula_where_ours_matches():
    """Two rsLoRA adapters (r 4, alphas 8 and 16) on q/v of the tiny llama, the same seeded weights in peft and
    here. peft's "linear" and "ties" combine A and B separately (cross terms); its "cat" is right (0.22 resets
    use_rslora on the merged config). Inputs of different ranks: peft refuses "linear", ours is exact."""
    peft = pytest.importorskip("peft")
    weights = {"x": 0.7, "y": 0.5}

    def config(r: int, alpha: float):
        return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=True)

    reference_model = peft.get_peft_model(tiny_model("llama"), config(4, 8), adapter_name="x")
    reference_model.add_adapter("y", config(4, 16))
    reference_model.add_adapter("r2", config(2, 4))  # a different rank, for the last part
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference_model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = {n.removeprefix("base_model.model."): m for n, m in reference_model.named_modules()
              if hasattr(m, "lora_A") and "x" in m.lora_A}

    model = ak.AdaptedModel(tiny_model("llama"))
    for name, (r, alpha) in {"x": (4, 8), "y": (4, 16), "r2": (2, 4)}.items():
        adapter = model.add_adapter(name, ak.LoRA(r=r, alpha=alpha, targets=("q", "v"), use_rslora=True))
        with torch.no_grad():
            for path, update in adapter.site_items():
                update.lora_A.copy_(layers[path].lora_A[name].weight)
                update.lora_B.copy_(layers[path].lora_B[name].weight)
    assert set(layers) == {p for p, _ in model.get_adapter("x").site_items()}

    def peft_delta(combination: str, merge_weights: dict[str, float] = weights, **kwargs) -> dict[str, torch.Tensor]:
        name = f"{combination}-{len(reference_model.peft_config)}"
        reference_model.add_weighted_adapter(list(merge_weights), list(merge_weights.values()), name,
                                             combination_type=combination, **kwargs)
        return {p: layer.scaling[name] * (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double())
                for p, layer in layers.items()}

    def relative_error(deltas: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float((deltas[p] - reference[p]).norm() ** 2) for p in reference)
                         / sum(float(reference[p].norm() ** 2) for p in reference))

    linear = reference_merge(model, weights, "linear")
    ties = reference_merge(model, weights, "ties", density=0.5)
    ak.merge_adapters(model, weights, "linear", out="ours-linear")
    ak.merge_adapters(model, weights, "ties", density=0.5, out="ours-ties")
    assert_factors_match(model, "ours-linear", linear, "ours, linear, rsLoRA")
    assert_factors_match(model, "ours-ties", ties, "ours, ties, rsLoRA")
    assert relative_error(peft_delta("cat"), linear) < 1e-6  # peft's cat is the formula (measured 1.8e-8)
    assert relative_error(peft_delta("linear"), linear) > 0.3  # measured 1.01: the cross terms B_x A_y
    assert relative_error(peft_delta("ties", density=0.5), ties) > 0.3  # 1.07: trims and elects on A and B, not ΔW
    # peft's TIES on ΔW (ties_svd, full rank) agrees with ours where the definitions meet, at equal weights
    # (peft elects the sign before weighting, ours after: with a negative weight only the latter is coherent)
    equal = {"x": 0.6, "y": 0.6}
    ties_equal = reference_merge(model, equal, "ties", density=0.5)
    peft_ties_svd = peft_delta("ties_svd", equal, density=0.5, svd_rank=32, svd_full_matrices=False)
    assert relative_error(peft_ties_svd, ties_equal) < 1e-5  # measured 5.6e-7 (peft's float32 SVD)

    # different ranks: peft refuses linear outright; ours is exact at rank 4 + 2
    with pytest.raises(ValueError, match="same r"):
        reference_model.add_weighted_adapter(["x", "r2"], [0.7, 0.5], "mixed", combination_type="linear")
    ak.merge_adapters(model, {"x": 0.7, "r2": 0.5}, "linear", out="ours-mixed")
    assert model.get_adapter("ours-mixed").config.r == 6
    assert_factors_match(model, "ours-mixed", reference_merge(model, {"x": 0.7, "r2": 0.5}, "linear"), "ranks 4 + 2")
