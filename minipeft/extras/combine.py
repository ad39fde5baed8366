"""Combining LoRA adapters into a new one, as peft's `add_weighted_adapter` does:

    mp.load_adapter(model, "folder-a", name="a"); mp.load_adapter(model, "folder-b", name="b")
    mp.combine_adapters(model, ["a", "b"], [0.7, 0.4], name="ab", how="ties", density=0.5)
    mp.set_adapter(model, "ab")                      # or model(idx, adapter_names=[...]); save_adapter(name="ab")

Every adapter i is a LoRA (A_i: r_i × in, B_i: out × r_i, scale s_i) on some targets; the new one is a LoRA
of scale 1 (alpha = rank) on all of their targets. Per adapted layer, with weights w_i:

    cat       A = [w₁s₁A₁; w₂s₂A₂; …],  B = [B₁ B₂ …]            rank Σ r_i: exactly Σ w_i ΔW_i
    svd       Σ w_i s_i B_i A_i = U S Vᵀ, cut to rank R          B = U_R S_R, A = V_Rᵀ (R = `rank`, or the largest r_i)
    linear    A = Σ c_i A_i,  B = Σ |c_i| B_i,  c_i = sign(w_i s_i)·√|w_i s_i|   (equal ranks; the factors are
              mixed, not ΔW: a rough, cheap approximation)
    ties      like linear, each of A and B merged by TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708):
              keep each tensor's `density` fraction of largest |entries|, elect each entry's sign from the sum
              of the kept ones, average the weighted entries that agree with it
    dare_linear, dare_ties
              like linear / ties, but each tensor keeps a random `density` fraction of its entries, rescaled by
              1/density (DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099); masks from `dare_mask`

These are peft's definitions (same rank rules; with one adapter every mode is linear), so the result equals
peft's on the same adapters: exactly for cat, and up to float rounding for the others, DARE given the same
masks. Only on GPT-2's fused c_attn do they differ: peft combines (and prunes, and factorizes) q, k and v
as one matrix of the exported rank (2r or 3r), minipeft each target on its own at rank r (cat and linear
still give peft's outputs where peft accepts them; svd, ties and DARE do not). Where the first adapter is
rsLoRA, peft 0.21's new adapter keeps its α/√r scale (√rank times too strong; fixed in peft's pull request
3449): minipeft's has scale 1.
"""
import math
import numbers

import torch

from . import multi
from minipeft.core import targets as linear_targets
from minipeft.core.registry import apply

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties")


def combine_adapters(model, names: list[str], weights: list[float], name: str, how: str = "svd",
                     density: float | None = None, rank: int | None = None):
    """Add LoRA adapter `name`, made from the loaded LoRA adapters `names` with `weights` (see the module
    docstring for `how`); `density`: the fraction TIES and DARE keep; `rank`: svd's rank."""
    names, weights = _names_and_weights(names, weights)
    if how not in HOWS:
        raise ValueError(f"unknown how {how!r}; choose one of {', '.join(HOWS)}")
    how = "linear" if len(names) == 1 else how  # as in peft: one adapter is only scaled, whatever the mode
    options = _combined_options(model, names, how, density, rank)
    targets = options["targets"]
    factors = {}  # (id(parent), attribute) -> (A, B) of the new adapter
    for parent, attr in linear_targets.find(model, targets):
        layers = getattr(parent, attr).layers
        present = [(layers[n], w) for n, w in zip(names, weights) if n in layers]
        factors[(id(parent), attr)] = _combine(present, how, density, options["rank"])

    def build(base_model):
        apply(base_model, "lora", **options)
        with torch.no_grad():
            for parent, attr in linear_targets.find(base_model, targets):
                layer, (A, B) = getattr(parent, attr), factors[(id(parent), attr)]
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
    return multi.add_adapter(model, name, "lora", options, build)


def _names_and_weights(names, weights) -> tuple[list[str], list[float]]:
    """The adapters' names and their weights as lists, after their checks (ValueError naming what does not fit)."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names is a list of adapter names, not {names!r}")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights is a list of numbers, one per adapter, not {weights!r}") from None
    if not names or len(names) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(names)} adapters, {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"the weights must be finite numbers (a nan or inf would fill the adapter with them); "
                         f"got {weights}")
    return list(names), weights


def _combined_options(model, names, how, density, rank) -> dict:
    """The new adapter's LoRA options, after every check (ValueError naming what does not fit)."""
    adapters = multi._adapters(model)
    for n in names:
        multi._check_known(adapters, n)
        if adapters.configs[n]["method"] != "lora":
            raise ValueError(f"adapter {n!r} is {adapters.configs[n]['method']}; "
                             "combine_adapters combines lora adapters")
    if how in ("ties", "dare_linear", "dare_ties") and not (isinstance(density, numbers.Real) and 0 < density <= 1):
        raise ValueError(f"how={how!r} needs a density in (0, 1], the fraction of entries each adapter keeps; "
                         f"got {density!r}")
    if how == "svd" and rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool)):
        raise ValueError(f"rank, the rank svd cuts to, is a whole number >= 1 (or None: the largest rank given), "
                         f"not {rank!r}")
    options = [adapters.configs[n]["options"] for n in names]
    ranks = [o["rank"] for o in options]
    if how in EQUAL_RANKS and len(set(ranks)) > 1:
        raise ValueError(f"how={how!r} mixes the factors themselves, so it needs adapters of one rank; "
                         f"{dict(zip(names, ranks))}; use how='cat' or 'svd'")
    new_rank = sum(ranks) if how == "cat" else (rank or max(ranks)) if how == "svd" else ranks[0]
    targets = [t for t in linear_targets.TARGETS if any(t in o["targets"] for o in options)]
    # scale alpha / rank = 1, the weights and scales being inside the factors (so not rsLoRA's alpha / √rank)
    return {**options[0], "rank": new_rank, "alpha": float(new_rank), "rslora": False, "targets": targets,
            "init": "kaiming"}


def _combine(present: list, how: str, density, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) of the new adapter at one layer, from [(LoRA layer, weight)]."""
    with torch.no_grad():
        if how == "cat":
            A = torch.cat([w * layer.scale * layer.lora_A for layer, w in present])
            B = torch.cat([layer.lora_B for layer, _ in present], dim=1)
            return _padded(A, B, rank)
        if how == "svd":
            delta = merge_tensors([layer.delta_weight() for layer, _ in present], [w for _, w in present], "linear")
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            return Vh[:rank], U[:, :rank] * S[:rank]
        signed = [w * layer.scale for layer, w in present]
        a_weights = [abs(c) ** 0.5 * (1 if c >= 0 else -1) for c in signed]  # the sign goes on A only
        b_weights = [abs(c) ** 0.5 for c in signed]
        A = merge_tensors([layer.lora_A for layer, _ in present], a_weights, how, density)
        B = merge_tensors([layer.lora_B for layer, _ in present], b_weights, how, density)
        return A, B


def _padded(A, B, rank):
    """Zero rows of A and columns of B up to `rank` (they add nothing)."""
    pad = rank - A.shape[0]
    return torch.cat([A, A.new_zeros(pad, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)


def merge_tensors(tensors: list, weights: list, how: str, density: float | None = None) -> torch.Tensor:
    """Σ w_i t_i (linear), or TIES / DARE's merge of the tensors t_i (same shape)."""
    stacked = torch.stack(list(tensors))  # (n, …)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if how in ("dare_linear", "dare_ties") and density < 1:
        stacked = torch.stack([t * dare_mask(t, density) / density for t in stacked])
    if how == "ties" and density < 1:
        stacked = torch.stack([t * magnitude_mask(t, density) for t in stacked])
    if how in ("linear", "dare_linear"):
        return (stacked * w).sum(0)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # TIES: the elected sign of each entry
    agree = stacked.sign() == sign  # (n, …): the entries that agree with it
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the int(density · numel) entries of largest |value|, 0 elsewhere."""
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
    return mask.view(tensor.shape)


def dare_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's random mask: each entry kept (1) with probability `density`, from torch's global RNG."""
    return torch.bernoulli(torch.full_like(tensor, density))
