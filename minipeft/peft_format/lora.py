"""LoRA in peft's files (peft_type LORA), both ways."""
import math

import torch

from minipeft.core import targets as linear_targets
from minipeft.core.lora import RESIDUAL_INITS, residual_init


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

    QLoRA. In peft a QLoRA adapter is this LoRA, trained on a bitsandbytes 4-bit base; so is ours (qlora's
    A, B and scale are LoRA's, its quant options describe the base), and it is written as above (served on
    the 4-bit base, it computes what it trained; on the full-precision one, that base + the same ΔW). A LoRA
    adapter loaded into a model whose block layers are 4-bit (a bitsandbytes 4-bit folder, or
    quantize="nf4") becomes qlora in those layers' format (method_for), as peft puts its LoRA on the
    Linear4bit layers; qlora has no rsLoRA option, so its alpha becomes scale · r. A PiSSA or OLoRA adapter
    cannot go there: peft would quantize the residual W − s·B₀A₀ again, a base minipeft does not build.
    """

    peft_type = "LORA"
    # config fields naming features minipeft's LoRA lacks: field -> what it is
    features_we_lack = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "bias": "trained base biases",
                        "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
                        "target_parameters": "LoRA on nn.Parameters", "alora_invocation_tokens": "aLoRA",
                        "use_bdlora": "block-diagonal LoRA factors (BD-LoRA)", "kasa_config": "KaSA",
                        "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing"}

    # init_lora_weights values whose tensors mean a plain LoRA (they only chose the starting point)
    plain_inits = (True, False, "gaussian", "eva", "orthogonal", "mica")  # (MiCA: B starts from W's minor vectors)

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
        _check_residual(init, [layout.fused(group[0]) for group in groups], layout)
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
        _check_residual(init, [], layout)  # (a fused module converts exactly on the way in)
        if init in RESIDUAL_INITS and base_4bit_format(model):
            raise ValueError(f"adapter {layout.path} was initialized with {init}, which on a base stored in 4 bits "
                             "makes peft quantize the residual weights again, a base minipeft does not build; load "
                             "it into the full-precision model")
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
            configured = layout.pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
            if rank != configured:  # peft would refuse the file; its scale would be alpha / the config's rank
                raise ValueError(f"adapter {layout.path}: {module} has rank {rank} in its tensors but {configured} "
                                 "in its config (r, rank_pattern), so peft cannot load it; save the adapter again")
            alpha = layout.pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
            if init in RESIDUAL_INITS:  # on the original base: ΔW = s [B, −B₀] [A; A₀], rank 2r
                weight = torch.cat([model.blocks[layer].get_submodule(linear_targets.TARGETS[t]).weight for t in held])
                A0, B0 = residual_init(weight, rank, scale, init)
                A, B = torch.cat([A, A0]), torch.cat([B, -B0], dim=1)
            for t, (A_t, B_t) in _split_fused(A, B, held, cfg).items():
                updates[(layer, t)] = (A_t, B_t, scale)
        return _padded_to_one_rank(cfg, updates, config.get("lora_dropout", 0.0), bool(config.get("use_rslora")))

    def method_for(self, model, method: str, options: dict) -> tuple[str, dict]:
        """(method, options) as read (lora, or dora: dora.py), or on a model whose block layers are 4-bit
        ("qlora", the same LoRA in their format)."""
        quant = base_4bit_format(model)
        if quant is None:
            return method, options
        options = dict(options)
        rank, rslora = options["rank"], options.pop("rslora")
        if rslora:  # qlora's scale is alpha / r: the alpha giving rsLoRA's alpha / √r
            options["alpha"] = options["alpha"] / math.sqrt(rank) * rank
        return "qlora", options | dict(zip(("quant", "blocksize", "double_quant"), quant))


def base_4bit_format(model) -> tuple[str, int, bool] | None:
    """(quant type, blocksize, double_quant) of the model's 4-bit block layers (core/nf4.py), None if it has none."""
    from minipeft.core.nf4 import Linear4bit  # here: a LoRA run without 4-bit layers never imports the quantizer
    layer = next((m for m in model.blocks.modules() if isinstance(m, Linear4bit)), None)
    return None if layer is None else (layer.quant_type, layer.blocksize, layer.double_quant)


def _check_residual(init: str, modules: list[tuple], layout) -> None:
    """PiSSA / OLoRA adapters move between peft and minipeft only where both factorize the same matrix:
    not on a fused module (`modules`: the targets each exported module holds), nor on GPT-2's Conv1D for OLoRA."""
    if init not in RESIDUAL_INITS:
        return
    cfg = layout.cfg
    held = next((held for held in modules if len(held) > 1), None)
    if held:
        module = layout.modules[held[0]][0].rpartition(".")[2]
        apart = ", ".join(t for t in layout.modules if len(layout.fused(t)) == 1)
        raise ValueError(f"a {init} adapter on {cfg.flavor}'s fused {module} is not exchangeable: peft factorizes "
                         f"{', '.join(held)} as one matrix, minipeft each one; use targets {apart}, or init=kaiming")
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


HOOK = LoRAInPeft()  # hooks() registers it for the methods "lora" and "qlora"
