"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190).

Every layer gets P trainable "virtual tokens" that exist only as keys and values: attention puts them in
front of the real tokens' keys/values, so every real token can attend to them; the base model stays frozen.

    head_i = softmax( q_i [P_k ; K]ᵀ / √d_h ) [P_v ; V]          P_k, P_v: (P × d_h) per layer and head

        keys:    [ P_k(layer) | k(x_1) … k(x_T) ]      the real tokens take positions P … P+T−1,
        values:  [ P_v(layer) | v(x_1) … v(x_T) ]      as if the prefix had been P real tokens before them

Reparameterization (optional, mlp_hidden > 0, as in the paper): an MLP makes the prefixes from a smaller
embedding, which trains more stably; after training, `fold(model)` keeps only its output:

    [P_k ; P_v](all layers) = W_2 tanh(W_1 E + b_1) + b_2      E: (P × d), W_1: (h × d), W_2: (L·2·d_kv × h)

Initialization: direct prefixes ~ N(0, 0.02²); with the MLP, E ~ N(0, 0.02²) and nn.Linear's own init; so
the output differs slightly from the base model's at initialization. Not mergeable: the virtual tokens
are extra keys, not a weight change. Trainable parameters (L layers, d_kv = n_kv_head · head_dim):
    direct:   L · 2 · P · d_kv
    with MLP: P·d + (d·h + h) + (h · L·2·d_kv + L·2·d_kv)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Method, Option, register


class PrefixTuning(nn.Module):
    def __init__(self, cfg, length: int, mlp_hidden: int = 0):
        super().__init__()
        self.length, self.n_layer = length, cfg.n_layer
        self.n_kv_head, self.head_dim = cfg.n_kv_head, cfg.head_dim
        self.per_layer = 2 * cfg.n_kv_head * cfg.head_dim  # keys and values of one virtual token
        total = cfg.n_layer * self.per_layer
        if mlp_hidden:
            self.embedding = nn.Parameter(0.02 * torch.randn(length, cfg.d_model))  # (P, d)
            self.mlp_in = nn.Linear(cfg.d_model, mlp_hidden)
            self.mlp_out = nn.Linear(mlp_hidden, total)
        else:
            self.prefix = nn.Parameter(0.02 * torch.randn(length, total))  # (P, L·2·d_kv)

    def layer_table(self, layer: int) -> torch.Tensor:  # (P, 2·d_kv): this layer's keys and values
        cols = slice(layer * self.per_layer, (layer + 1) * self.per_layer)
        if hasattr(self, "prefix"):
            return self.prefix[:, cols]
        hidden = torch.tanh(self.mlp_in(self.embedding))  # (P, h)
        return F.linear(hidden, self.mlp_out.weight[cols], self.mlp_out.bias[cols])  # only this layer's rows

    def key_values(self, layer: int, batch: int):
        table = self.layer_table(layer).view(self.length, 2, self.n_kv_head, self.head_dim)
        k, v = table.permute(1, 2, 0, 3)  # each (Hkv, P, hd)
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)  # (B, Hkv, P, hd)


class LayerPrefix:
    """One layer's `Attention.prefix` slot: a view of the shared PrefixTuning module (not a Module, so its
    parameters are registered once, under `prefix_tuning`; `parameters()` is for the memory ledger)."""

    def __init__(self, tuning: PrefixTuning, layer: int):
        self.tuning, self.layer, self.length = tuning, layer, tuning.length

    def __call__(self, batch: int):
        return self.tuning.key_values(self.layer, batch)

    def parameters(self):
        return self.tuning.parameters()


def apply_prefix(model, length: int, mlp_hidden: int):
    if length < 1:
        raise ValueError(f"prefix length must be >= 1, got {length}")
    model.prefix_tuning = PrefixTuning(model.cfg, length, mlp_hidden).to(model.tok_emb.weight.device)
    for i, block in enumerate(model.blocks):
        block.attn.prefix = LayerPrefix(model.prefix_tuning, i)


@torch.no_grad()
def fold(model):
    """Replace the MLP by its output after training (the same prefixes); the adapter then saves as mlp_hidden=0."""
    tuning = model.prefix_tuning
    if not hasattr(tuning, "prefix"):
        table = torch.cat([tuning.layer_table(i) for i in range(tuning.n_layer)], dim=1)  # (P, L·2·d_kv)
        del tuning.embedding, tuning.mlp_in, tuning.mlp_out
        tuning.prefix = nn.Parameter(table.clone())
    model.peft_config["options"]["mlp_hidden"] = 0
    return model


def prefix_parameter_count(cfg, length: int, mlp_hidden: int, **_) -> int:
    total = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim
    if not mlp_hidden:
        return length * total
    return length * cfg.d_model + (cfg.d_model * mlp_hidden + mlp_hidden) + (mlp_hidden * total + total)


register(Method(
    "prefix", "trainable key/value prefixes in every layer (Li & Liang 2021)", apply_prefix,
    prefix_parameter_count,
    (Option("length", int, 20, "virtual tokens P (prefix length)"),
     Option("mlp_hidden", int, 0, "hidden width of the reparameterization MLP (0: train the prefixes directly)")),
    lr=1e-2, exact_at_init=False, examples=({}, {"length": 3, "mlp_hidden": 16})))
