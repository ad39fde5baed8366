import pytest
import torch

import minipeft as mp

FLAVORS = ("gpt2", "bert", "llama")


def tiny_config(flavor: str, n_classes=None, **overrides) -> mp.ModelConfig:
    """A 2-layer model small enough to run a backward pass in milliseconds; llama uses GQA (4 heads
    sharing 2 key/value heads) and an untied head, so every code path is exercised."""
    kw = dict(flavor=flavor, vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
              n_classes=n_classes, pad_token_id=0)
    if flavor == "llama":
        kw.update(n_kv_head=2, tie_embeddings=False, rope_theta=500.0)
    kw.update(overrides)
    return mp.ModelConfig(**kw)


def tiny_model(flavor: str, n_classes=None, seed: int = 0, **overrides) -> mp.Transformer:
    torch.manual_seed(seed)
    return mp.Transformer(tiny_config(flavor, n_classes, **overrides))


def tiny_batch(vocab=97, B=3, T=12, seed=1):
    """Token ids (B, T) and a right-padded attention mask whose rows have different lengths."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(1, B):
        mask[row, T - 3 * row:] = 0
    idx[mask == 0] = 0
    return idx, mask


@pytest.fixture(params=FLAVORS)
def flavor(request):
    return request.param
