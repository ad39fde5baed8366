"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer W (out × in) learns only a low-rank update:

    h = x Wᵀ + b  +  (α / r) · dropout(x) Aᵀ Bᵀ          A: (r × in), B: (out × r), r ≪ min(in, out)

              x ──────────────► W (frozen) ─────────┐
              │                                      + ──► h
              └─► dropout ─► A (r×in) ─► B (out×r) ─► × α/r

Initialization: A ~ Kaiming-uniform (as nn.Linear initializes its weight), B = 0, so BA = 0 and the
model starts exactly as the pretrained one. The scale α/r keeps the update's size roughly independent
of the rank, so a learning rate tuned at one rank carries over.

Trainable parameters: r · (in + out) per adapted layer. Examples: r=4 on a 1000×1000 weight: 8,000;
r=4 on q and v of a GPT-2-medium shape (24 layers, d=1024): 24 · 2 · 4 · 2048 = 393,216.

Merging: W ← W + (α/r) B A gives the same outputs with no extra inference cost; `unmerge` subtracts it
again (the base comes back up to float rounding of the subtraction). Merging is explicit (mp.merge),
never a side effect of `.eval()`.

`LoRALinear` *is* an nn.Linear (it keeps the base `weight`/`bias` keys, as torchtune does), with
`lora_A` and `lora_B` beside them; it replaces the wrapped layer by setattr on its parent.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Dropout
from . import targets as linear_targets
from .registry import Method, Option, register


class LowRankUpdate:
    """The LoRA path, shared by LoRALinear and the 4-bit QLoRALinear (qlora.py): adds lora_A, lora_B
    to `self`."""

    def init_lora(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank {rank} is larger than the layer ({out_features}×{in_features}); "
                             f"use a rank <= {min(in_features, out_features)}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.lora_dropout = Dropout(dropout)
        self.merged = False

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out): (α/r) · dropout(x) Aᵀ Bᵀ, never forming the out×in product."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def saved_activations(self, ledger, x: str, n: int, grad: bool):
        """For the memory ledger (memory.py): what autograd keeps of the LoRA path for n tokens of the
        input named `x` (`grad`: x needs a gradient): dropout's mask and output, or x itself; A's output."""
        me = f"{x}@{id(self)}"
        if self.lora_dropout.p > 0:  # each LoRA layer draws its own mask
            ledger.dropout(self.lora_dropout.p, f"{me}.lora_dropout", n * self.in_features, grad)
            ledger.keep(f"{me}.lora_dropout.out", n * self.in_features)
        else:
            ledger.keep(x, n * self.in_features)
        ledger.keep(f"{me}.lora_A.out", n * self.rank)


class LoRALinear(LowRankUpdate, nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same frozen tensors, same keys
        self.init_lora(base.in_features, base.out_features, rank, alpha, dropout)
        self.to(base.weight.device)

    def forward(self, x):  # (…, in) -> (…, out)
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.lora_update(x)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Wrap every targeted linear layer of every block in a LoRALinear (the registry froze the base)."""
    for parent, attr in linear_targets.find(model, targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))


def lora_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    """n_layer · Σ_targets r · (in + out)."""
    return cfg.n_layer * sum(rank * sum(linear_targets.shape(cfg, t))
                             for t in linear_targets.validate(cfg, targets))


# the options LoRA and QLoRA share
LORA_OPTIONS = (
    Option("rank", int, 8, "LoRA rank r (>= 1)"),
    Option("alpha", float, 16.0, "LoRA scale numerator: the update is multiplied by alpha / rank"),
    Option("dropout", float, 0.0, "dropout on the LoRA input path (the model's own dropout is --model-dropout)"),
    Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'"),
)

# --- peft's file format ----------------------------------------------------------------------------
# The hook peft_format.py calls (its docstring gives the protocol; `layout` is its PeftLayout).


class LoRAInPeft:
    """LoRA in peft's files (peft_type LORA). Per adapted transformers module (`layout.key` names it):

        base_model.model.<module>.lora_A.weight  (r, in)      <->  blocks.i.<target>.lora_A
        base_model.model.<module>.lora_B.weight  (out, r)     <->  blocks.i.<target>.lora_B

    and in the config `r` and `lora_alpha`: the update is (lora_alpha / r) · B A, or lora_alpha / √r with
    use_rslora; rank_pattern / alpha_pattern give some modules their own r and alpha.

    Fused modules: one transformers module holding several of our targets (`layout.fused`), like GPT-2's
    c_attn. minipeft can adapt q and v alone; peft can only adapt the whole c_attn, whose output rows
    are [q | k | v] (d each). With n of the three adapted (rank r, scale α/r
    each), the update of c_attn is written exactly as one LoRA of rank n·r:

        ΔW_c_attn = (α/r) [B_q A_q ; B_k A_k ; B_v A_v]  =  (α'/r') B' A'          (absent targets: 0)

            A' = [A_q ; A_v]            (2r × d)       stacked in q, k, v order (here n = 2: q and v)
            B' = [ B_q   0  ]           (3d × 2r)      block-structured: the rows of k are zero
                 [  0    0  ]
                 [  0   B_v ]
            r' = n·r,  α' = n·α,  so  α'/r' = α/r

    We write r' and α' as `r` and `lora_alpha` when every exported module has that rank (only q/k/v
    adapted), so any reader of the format gets the scale right; when other modules are adapted too, they
    keep `r`, `lora_alpha` and c_attn gets `rank_pattern` / `alpha_pattern` {"c_attn": n·r} / {"c_attn": n·α}.

    Loading a c_attn LoRA splits it back. With B' cut into its row blocks B'_q, B'_k, B'_v, each target
    gets ΔW_t = (α'/r') B'_t A', which is exact in every case. If the columns that the non-zero blocks use
    are disjoint (as in our own export), target t only needs its columns C_t: a rank-|C_t| LoRA
    (A'[C_t], B'_t[:, C_t]) on t alone, and all-zero blocks are dropped. Otherwise (an adapter peft
    trained on all of c_attn) q, k and v each get rank r' with a copy of the shared A'.

    One LoRA rank and alpha serve every module here, so a loaded adapter takes the largest rank,
    zero-pads smaller updates (zero rows of A, zero columns of B add nothing), and folds any other
    module's scale into its B. Layers peft left out get B = 0.
    """

    peft_type = "LORA"
    # config fields naming features minipeft's LoRA lacks: field -> what it is
    features_we_lack = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "bias": "trained base biases",
                        "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
                        "target_parameters": "LoRA on nn.Parameters", "alora_invocation_tokens": "aLoRA"}

    def check_config(self, config: dict, path) -> None:
        lacking = [what for field, what in self.features_we_lack.items()
                   if config.get(field) not in (None, False, "none", [], {})]
        if lacking:
            raise ValueError(f"adapter {path} uses {', '.join(lacking)}, which minipeft's LoRA does not "
                             "have; load it with peft, or train it without")

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        cfg, options = model.cfg, model.peft_config["options"]
        rank, alpha = options["rank"], options["alpha"]
        targets = linear_targets.validate(cfg, options["targets"])
        # the adapted targets of each transformers module, in row order: [("q", "v"), ("o",), ...]
        groups = list(dict.fromkeys(tuple(t for t in layout.fused(target) if t in targets) for target in targets))
        tensors, carried = {}, {}  # carried: peft's name of each exported module -> how many targets it holds
        for i, block in enumerate(model.blocks):
            for group in groups:
                A, B = _fused_update(block, group, layout.fused(group[0]), rank, cfg)
                tensors[layout.key(group[0], i, "lora_A.weight")] = A
                tensors[layout.key(group[0], i, "lora_B.weight")] = B
                carried[layout.peft_name(group[0], i)] = len(group)
        config = {"r": rank, "lora_alpha": alpha, "rank_pattern": {}, "alpha_pattern": {}}
        if len(set(carried.values())) == 1:  # every module has rank n·r: n·r and n·α are the global ones
            n = next(iter(carried.values()))
            config.update(r=n * rank, lora_alpha=n * alpha)
        else:
            fused = {name: n for name, n in carried.items() if n > 1}
            config.update(rank_pattern={name: n * rank for name, n in fused.items()},
                          alpha_pattern={name: n * alpha for name, n in fused.items()})
        config.update(target_modules=list(carried), lora_dropout=options["dropout"],
                      fan_in_fan_out=cfg.flavor == "gpt2",  # GPT-2's Conv1D keeps its weight as (in, out)
                      bias="none", use_rslora=False, use_dora=False, init_lora_weights=True,
                      layers_to_transform=None, layers_pattern=None)
        return tensors, config

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        cfg = model.cfg
        updates = {}  # (layer, target) -> (A, B, scale)
        for module, pair in _lora_pairs(tensors, layout).items():
            layer, held = layout.locate(module)
            if set(pair) != {"A", "B"}:
                raise ValueError(f"adapter {layout.path} has only lora_{''.join(pair)} of {module}; "
                                 "the file is incomplete")
            A, B = pair["A"], pair["B"]
            in_features = linear_targets.shape(cfg, held[0])[0]
            out_features = sum(linear_targets.shape(cfg, t)[1] for t in held)
            if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
                raise ValueError(f"adapter {layout.path}: {module} has lora_A {tuple(A.shape)} and lora_B "
                                 f"{tuple(B.shape)}, this model's layer is {out_features}×{in_features}; "
                                 "load the base model it was trained on")
            rank = A.shape[0]
            alpha = layout.pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
            for t, (A_t, B_t) in _split_fused(A, B, held, cfg).items():
                updates[(layer, t)] = (A_t, B_t, scale)
        return _padded_to_one_rank(cfg, updates, config.get("lora_dropout", 0.0))


def _fused_update(block, adapted: tuple, held: tuple, rank: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAInPeft's A', B' for one transformers module holding the targets `held` (row order), of which
    `adapted` have a LoRA (for a module of its own: its A and B)."""
    layers = {t: block.get_submodule(linear_targets.TARGETS[t]) for t in adapted}
    A = torch.cat([layer.lora_A for layer in layers.values()])  # (n·r, in)
    B = torch.zeros(sum(linear_targets.shape(cfg, t)[1] for t in held), len(adapted) * rank,
                    device=A.device)  # (Σ out, n·r): zero where a held target is not adapted
    row = 0
    for t in held:
        out_features = linear_targets.shape(cfg, t)[1]
        if t in layers:
            column = adapted.index(t) * rank
            B[row:row + out_features, column:column + rank] = layers[t].lora_B
        row += out_features
    return A, B


def _lora_pairs(tensors: dict, layout) -> dict[str, dict[str, torch.Tensor]]:
    """peft's module name (root stripped) -> {"A": (R, in), "B": (out, R)}, as fp32."""
    pairs = {}
    for key, value in tensors.items():
        module, _, matrix = key.removeprefix(layout.root).rpartition(".lora_")
        if not key.startswith(layout.root) or not module or matrix not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter {layout.path} holds {key}, which is not a LoRA A/B matrix of a linear "
                             "layer nor a classifier; minipeft cannot load it")
        pairs.setdefault(module, {})[matrix[0]] = value.float()
    if not pairs:
        raise ValueError(f"adapter {layout.path} holds no LoRA matrices")
    return pairs


def _split_fused(A, B, held: tuple, cfg) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRAInPeft's split of a fused module: B (Σ out, R) -> {target: (A_t, B_t)}."""
    if len(held) == 1:
        return {held[0]: (A, B)}
    blocks = dict(zip(held, B.split([linear_targets.shape(cfg, t)[1] for t in held])))
    used = {t: (b != 0).any(dim=0) for t, b in blocks.items()}  # (R,) columns each block uses
    active = [t for t in held if used[t].any()]
    users = sum(used[t].long() for t in held)  # (R,) how many blocks use each column
    if active and users.max() <= 1:  # block-structured: each target keeps only its own columns
        return {t: (A[used[t]], blocks[t][:, used[t]]) for t in active}
    return {t: (A, blocks[t]) for t in held}  # general: rank R on each, sharing A


def _padded_to_one_rank(cfg, updates: dict, dropout: float) -> tuple[dict, dict]:
    """{(layer, target): (A, B, scale)} -> LoRA options and lora_A / lora_B values of one rank and alpha."""
    targets = [t for t in linear_targets.TARGETS if any(t == key[1] for key in updates)]
    rank = max(A.shape[0] for A, _, _ in updates.values())
    alpha = next(iter(updates.values()))[2] * rank
    our_scale = alpha / rank  # what LoRALinear will use
    weights = {}
    for i in range(cfg.n_layer):
        for t in targets:
            in_features, out_features = linear_targets.shape(cfg, t)
            A_full, B_full = torch.zeros(rank, in_features), torch.zeros(out_features, rank)
            if (i, t) in updates:
                A, B, scale = updates[(i, t)]
                A_full[:A.shape[0]] = A
                B_full[:, :B.shape[1]] = B if scale == our_scale else B * (scale / our_scale)
            name = f"blocks.{i}.{linear_targets.TARGETS[t]}"
            weights[f"{name}.lora_A"], weights[f"{name}.lora_B"] = A_full, B_full
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}, weights


register(Method(
    "lora", "low-rank updates BA on the targeted linear layers (Hu et al. 2021)",
    apply_lora, lora_parameter_count, LORA_OPTIONS, mergeable=True, peft=LoRAInPeft(),
    examples=({}, {"rank": 2, "alpha": 4.0, "dropout": 0.1, "targets": ["all"]},
              {"rank": 4, "targets": ["k", "o", "down"]})))
