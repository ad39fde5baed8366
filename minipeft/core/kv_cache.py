"""The KV cache of incremental decoding: the keys and values of every token seen so far, so that a new token attends
to them without recomputing them (model.py's Attention appends; generate.py and extras/fewshot.py create it).

    per layer: k, v  (B, Hkv, T_seen, head_dim)
"""
import torch


class KVCache:
    """One (k, v) pair per layer; `forward(idx, cache=c)` appends the new tokens' keys/values and reads the old."""

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.layers[layer] is not None:
            past_k, past_v = self.layers[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v
