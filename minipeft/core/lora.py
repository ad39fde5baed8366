"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer W (out × in) learns only a low-rank update:

    h = x Wᵀ + b  +  s · dropout(x) Aᵀ Bᵀ          A: (r × in), B: (out × r), r ≪ min(in, out)

              x ──────────────► W (frozen) ─────────┐
              │                                      + ──► h
              └─► dropout ─► A (r×in) ─► B (out×r) ─► × s

The scale s is α/r, or α/√r with `rslora` (rank-stabilized LoRA, Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732: with α/r the update of a higher rank learns more slowly; α/√r keeps the
learning dynamics stable as r grows). Either way a learning rate tuned at one rank carries over.

Initialization (`init`), each as peft has it:
    kaiming   A ~ Kaiming-uniform (as nn.Linear initializes its weight), B = 0: BA = 0, so the model starts
              exactly as the pretrained one.
    gaussian  A ~ N(0, 1/r²), B = 0: exact at init too.
    pissa     PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): W = U S Vᵀ; the top-r singular
              triplets move into the adapter, A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s), and W keeps the residual
              W − s·BA. The adapter trains the principal directions of W.
    olora     OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): W = QR; A = R[:r], B = Q[:, :r],
              W keeps W − s·BA (orthonormal B).
PiSSA and OLoRA rewrite the frozen base weight (to W − s·B₀A₀), so W + s·BA equals the pretrained W at init
only up to float rounding, and a saved adapter means "on the residual of this base": loading it computes the
same residual again. In peft's format it becomes a plain LoRA of rank 2r on the original weights.

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): `lr_ratio` gives B a learning rate lr_ratio ×
A's (the paper suggests 16); the method declares it (`lr_factors`) and the trainer's AdamW puts B in its
own parameter group.

Trainable parameters: r · (in + out) per adapted layer. Examples: r=4 on a 1000×1000 weight: 8,000;
r=4 on q and v of a GPT-2-medium shape (24 layers, d=1024): 24 · 2 · 4 · 2048 = 393,216.

Merging: W ← W + s·BA gives the same outputs with no extra inference cost; `unmerge` subtracts it again
(the base comes back up to float rounding of the subtraction). Merging is explicit (mp.merge), never a side
effect of `.eval()`.

`LoRALinear` *is* an nn.Linear (a wrap.FrozenLinear: it keeps the base `weight`/`bias` keys, as torchtune
does), with `lora_A` and `lora_B` beside them; it replaces the wrapped layer by setattr on its parent.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Dropout
from . import targets as linear_targets
from .registry import Method, Option, register
from .wrap import DeltaMerge, FrozenLinear, wrap

INITS = ("kaiming", "gaussian", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # these move part of W into the adapter


class LowRankUpdate:
    """The LoRA path, shared by LoRALinear, the 4-bit QLoRALinear (qlora.py) and DoRA (dora.py): adds
    lora_A, lora_B to `self`."""

    def init_lora(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                  rslora: bool = False):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank {rank} is larger than the layer ({out_features}×{in_features}); "
                             f"use a rank <= {min(in_features, out_features)}")
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.lora_dropout = Dropout(dropout)
        self.merged = False

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out): s · dropout(x) Aᵀ Bᵀ, never forming the out×in product."""
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


def residual_init(weight: torch.Tensor, rank: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA / OLoRA: the factors A₀ (r, in), B₀ (out, r) of the part of `weight` (out, in) an adapter of
    scale s takes over; the layer keeps weight − s·B₀A₀."""
    weight = weight.detach().float()
    if init == "pissa":  # W = U S Vᵀ: the top-r singular triplets, S_r split evenly between B and A
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[:rank] / scale).sqrt()  # (r,)
        return root[:, None] * Vh[:rank], U[:, :rank] * root
    Q, R = torch.linalg.qr(weight)  # olora: W = QR, Q with orthonormal columns
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


class LoRALinear(LowRankUpdate, DeltaMerge, FrozenLinear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "kaiming"):
        super().__init__(base)
        self.init_lora(base.in_features, base.out_features, rank, alpha, dropout, rslora)
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / rank)
        elif init in RESIDUAL_INITS:
            self.changes_base = True
            with torch.no_grad():
                A, B = residual_init(self.weight, rank, self.scale, init)
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)
                residual = self.weight.float() - self.delta_weight()  # W keeps the residual, rounded once (peft's)
                self.weight.copy_(residual.to(self.weight.dtype))
        self.to(base.weight.device)

    def forward(self, x):  # (…, in) -> (…, out)
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.lora_update(x)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], rslora: bool = False,
               init: str = "kaiming", lr_ratio: float = 1.0):
    """Wrap every targeted linear layer of every block in a LoRALinear (the registry froze the base)."""
    if lr_ratio <= 0:
        raise ValueError(f"lr_ratio must be > 0, got {lr_ratio}")
    wrap(model, targets, lambda layer: LoRALinear(layer, rank, alpha, dropout, rslora, init))


def lora_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    """n_layer · Σ_targets r · (in + out)."""
    return cfg.n_layer * sum(rank * sum(linear_targets.shape(cfg, t))
                             for t in linear_targets.validate(cfg, targets))


def lora_lr_factors(model, lr_ratio: float = 1.0, **_) -> dict[str, float]:
    """LoRA+: every B learns lr_ratio times faster than the rest."""
    return {name: lr_ratio for name, _ in model.named_parameters() if name.endswith("lora_B")} \
        if lr_ratio != 1.0 else {}


# the options LoRA and QLoRA share, and LoRA's own
LORA_OPTIONS = (
    Option("rank", int, 8, "LoRA rank r (>= 1)"),
    Option("alpha", float, 16.0, "LoRA scale numerator: the update is multiplied by alpha / rank"),
    Option("dropout", float, 0.0, "dropout on the LoRA input path (the model's own dropout is --model-dropout)"),
    Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'"),
)
RSLORA = Option("rslora", bool, False, "rank-stabilized scale alpha / sqrt(rank) instead of alpha / rank")
LORA_ONLY_OPTIONS = (
    RSLORA,
    Option("init", str, "kaiming", "initialization: kaiming or gaussian A with B = 0 (exact at init); pissa "
           "(top singular triplets of W) or olora (QR of W), which leave W the residual", choices=INITS),
    Option("lr_ratio", float, 1.0, "LoRA+: B's learning rate is lr_ratio times A's (the paper suggests 16)"),
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

    rsLoRA is peft's `use_rslora` (scale α/√r; a fused module of n targets then gets α' = √n·α). PiSSA and
    OLoRA (`init_lora_weights` "pissa" / "olora") are written as they are, and peft, loading them, computes
    the residual of the base weights again, as we do; that needs modules of their own (peft would factorize
    GPT-2's fused c_attn as one matrix) and, for OLoRA, not GPT-2 (peft factorizes its Conv1D weight
    transposed). Loading such an adapter makes it a plain LoRA on the unchanged base, exactly as peft's
    own conversion does: ΔW = s(BA − B₀A₀) = s [B, −B₀] [A; A₀], rank 2r, with A₀, B₀ recomputed from the
    base weights (residual_init). LoRA+'s lr_ratio is an optimizer setting, which peft's files do not hold.
    """

    peft_type = "LORA"
    # config fields naming features minipeft's LoRA lacks: field -> what it is
    features_we_lack = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "bias": "trained base biases",
                        "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
                        "target_parameters": "LoRA on nn.Parameters", "alora_invocation_tokens": "aLoRA"}

    # init_lora_weights values whose tensors mean a plain LoRA (they only chose the starting point)
    plain_inits = (True, False, "gaussian", "eva", "orthogonal")

    def accepts(self, config: dict) -> bool:
        return not config.get("use_dora")  # dora.py takes those

    def check_config(self, config: dict, path) -> None:
        lacking = [what for field, what in self.features_we_lack.items()
                   if config.get(field) not in (None, False, "none", [], {})]
        if lacking:
            raise ValueError(f"adapter {path} uses {', '.join(lacking)}, which minipeft's LoRA does not "
                             "have; load it with peft, or train it without")
        init = config.get("init_lora_weights", True)
        if init not in self.plain_inits + RESIDUAL_INITS:
            raise ValueError(f"adapter {path} was initialized with init_lora_weights={init!r}, which changes the "
                             "base weights in a way minipeft does not reproduce (it knows kaiming, gaussian, pissa "
                             "and olora); convert it to a plain LoRA with peft first")

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        cfg, options = model.cfg, model.peft_config["options"]
        rank, alpha, rslora = options["rank"], options["alpha"], options.get("rslora", False)
        targets = linear_targets.validate(cfg, options["targets"])
        # the adapted targets of each transformers module, in row order: [("q", "v"), ("o",), ...]
        groups = list(dict.fromkeys(tuple(t for t in layout.fused(target) if t in targets) for target in targets))
        init = options.get("init", "kaiming")
        _check_residual(init, [layout.fused(group[0]) for group in groups], cfg)
        tensors, carried = {}, {}  # carried: peft's name of each exported module -> how many targets it holds
        for i, block in enumerate(model.blocks):
            for group in groups:
                A, B = _fused_update(block, group, layout.fused(group[0]), rank, cfg)
                tensors[layout.key(group[0], i, "lora_A.weight")] = A
                tensors[layout.key(group[0], i, "lora_B.weight")] = B
                carried[layout.peft_name(group[0], i)] = len(group)
        def fused_alpha(n):  # α' of a module of n targets (rank n·r) with the same scale as α over r
            return alpha * (math.sqrt(n) if rslora else n)
        config = {"r": rank, "lora_alpha": alpha, "rank_pattern": {}, "alpha_pattern": {}}
        if len(set(carried.values())) == 1:  # every module has rank n·r: n·r and α' are the global ones
            n = next(iter(carried.values()))
            config.update(r=n * rank, lora_alpha=fused_alpha(n))
        else:
            fused = {name: n for name, n in carried.items() if n > 1}
            config.update(rank_pattern={name: n * rank for name, n in fused.items()},
                          alpha_pattern={name: fused_alpha(n) for name, n in fused.items()})
        config.update(target_modules=list(carried), lora_dropout=options["dropout"],
                      fan_in_fan_out=cfg.flavor == "gpt2",  # GPT-2's Conv1D keeps its weight as (in, out)
                      bias="none", use_rslora=rslora, use_dora=False,
                      init_lora_weights=init if init in RESIDUAL_INITS else True,
                      layers_to_transform=None, layers_pattern=None)
        return tensors, config

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        cfg = model.cfg
        init = config.get("init_lora_weights", True)
        _check_residual(init, [], cfg)  # (a fused module converts exactly on the way in)
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
            if init in RESIDUAL_INITS:  # on the original base: ΔW = s [B, −B₀] [A; A₀], rank 2r
                weight = torch.cat([model.blocks[layer].get_submodule(linear_targets.TARGETS[t]).weight for t in held])
                A0, B0 = residual_init(weight, rank, scale, init)
                A, B = torch.cat([A, A0]), torch.cat([B, -B0], dim=1)
            for t, (A_t, B_t) in _split_fused(A, B, held, cfg).items():
                updates[(layer, t)] = (A_t, B_t, scale)
        return _padded_to_one_rank(cfg, updates, config.get("lora_dropout", 0.0), bool(config.get("use_rslora")))


def _check_residual(init: str, modules: list[tuple], cfg) -> None:
    """PiSSA / OLoRA adapters move between peft and minipeft only where both factorize the same matrix."""
    if init not in RESIDUAL_INITS:
        return
    if any(len(held) > 1 for held in modules):
        raise ValueError(f"a {init} adapter on GPT-2's fused c_attn is not exchangeable: peft factorizes q, k and v "
                         "as one matrix, minipeft each one; use targets o, up, down, or init=kaiming")
    if init == "olora" and cfg.flavor == "gpt2":
        raise ValueError("an olora adapter on gpt2 is not exchangeable: peft's OLoRA factorizes GPT-2's Conv1D "
                         "weights transposed (in × out); use init=pissa or kaiming")


def _fused_update(block, adapted: tuple, held: tuple, rank: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAInPeft's A', B' for one transformers module holding the targets `held` (row order), of which
    `adapted` have a LoRA (for a module of its own: its A and B)."""
    layers = {t: block.get_submodule(linear_targets.TARGETS[t]) for t in adapted}
    A = torch.cat([layer.lora_A for layer in layers.values()])  # (n·r, in)
    B = torch.zeros(sum(linear_targets.shape(cfg, t)[1] for t in held), len(adapted) * rank,
                    dtype=A.dtype, device=A.device)  # (Σ out, n·r): zero where a held target is not adapted
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


def _padded_to_one_rank(cfg, updates: dict, dropout: float, rslora: bool = False) -> tuple[dict, dict]:
    """{(layer, target): (A, B, scale)} -> LoRA options and lora_A / lora_B values of one rank and alpha."""
    targets = [t for t in linear_targets.TARGETS if any(t == key[1] for key in updates)]
    rank = max(A.shape[0] for A, _, _ in updates.values())
    divisor = math.sqrt(rank) if rslora else rank
    alpha = next(iter(updates.values()))[2] * divisor
    our_scale = alpha / divisor  # what LoRALinear will use
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
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets, "rslora": rslora}, weights


register(Method(
    "lora", "low-rank updates BA on the targeted linear layers (Hu et al. 2021; rsLoRA, PiSSA, OLoRA, LoRA+)",
    apply_lora, lora_parameter_count, LORA_OPTIONS + LORA_ONLY_OPTIONS, mergeable=True, peft=LoRAInPeft(),
    lr_factors=lora_lr_factors, side_by_side=True, changes_base=lambda init="kaiming", **_: init in RESIDUAL_INITS,
    lr=2e-3,  # the headline run (README): test accuracy 0.811 / 0.822 / 0.819 over seeds 0-2, 0.802 at 1e-3
    examples=({}, {"rank": 2, "alpha": 2.0, "dropout": 0.1, "targets": ["all"], "rslora": True, "lr_ratio": 16.0},
              {"rank": 4, "targets": ["k", "o", "down"]})))
