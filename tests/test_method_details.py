"""Method-specific behaviour of adapters, prefix tuning, prompt tuning and LLaMA-Adapter (the shared
promises are in test_methods.py)."""
import pytest
import torch
import torch.nn as nn
from tokenizers import processors

import minipeft as mp
from minipeft.core import adapter, llama_adapter, prefix
from conftest import tiny_batch, tiny_model, tiny_tokenizer


def test_houlsby_worked_example():
    layer = adapter.AdapterLinear(nn.Linear(1024, 1024), size=64)
    assert sum(p.numel() for n, p in layer.named_parameters() if n.startswith("adapter_")) == 132_160
    bert_large = mp.ModelConfig(flavor="bert", n_layer=24, n_head=16, d_model=1024, vocab_size=30522)
    layer_norms = 24 * 2 * 2048 + 2048
    assert adapter.adapter_parameter_count(bert_large, size=64, kind="houlsby") == 6_343_680 + layer_norms


def test_adapter_is_the_residual_bottleneck():
    """h' = h + W_up · GELU(W_down · h + b_down) + b_up, h the frozen projection's output (Houlsby 2019)."""
    torch.manual_seed(0)
    layer = adapter.AdapterLinear(nn.Linear(12, 10), size=3)
    nn.init.normal_(layer.adapter_up.weight), nn.init.normal_(layer.adapter_up.bias)
    x = torch.randn(4, 12)
    h = x @ layer.weight.T + layer.bias
    down, up = layer.adapter_down, layer.adapter_up
    expected = h + nn.functional.gelu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected)


def test_adapter_kinds():
    houlsby = mp.apply(tiny_model("bert"), "adapter", size=8)
    pfeiffer = mp.apply(tiny_model("bert"), "adapter", size=8, kind="pfeiffer")
    count = lambda m: sum(isinstance(x, adapter.AdapterLinear) for x in m.modules())
    assert count(houlsby) == 4 and count(pfeiffer) == 2
    assert houlsby.blocks[0].ln1.weight.requires_grad and not pfeiffer.blocks[0].ln1.weight.requires_grad
    with pytest.raises(ValueError, match="adapter: unknown kind 'lowrank'"):
        mp.apply(tiny_model("bert"), "adapter", kind="lowrank")


@pytest.mark.parametrize("flavor", ["gpt2", "bert", "llama"])
def test_prefix_mlp_folds_to_the_same_logits(flavor):
    model = mp.apply(tiny_model(flavor), "prefix", length=5, mlp_hidden=16).eval()
    idx, mask = tiny_batch()
    before = model(idx, attention_mask=mask)
    n_before = model.num_parameters(trainable_only=True)
    prefix.fold(model)
    assert not hasattr(model.prefix_tuning, "mlp_in")
    torch.testing.assert_close(model(idx, attention_mask=mask), before, atol=1e-6, rtol=0)
    assert model.num_parameters(trainable_only=True) < n_before
    assert model.peft_config["options"]["mlp_hidden"] == 0


def test_prefix_shifts_positions_like_real_tokens():
    """A prefix of P virtual tokens behaves exactly like P real tokens whose keys/values are cached."""
    model = tiny_model("llama").eval()
    idx, _ = tiny_batch(B=1, T=8)
    cache = mp.KVCache(model.cfg.n_layer)
    model(idx[:, :3], cache=cache)  # the first 3 tokens' keys/values will become the prefix
    first_three = [(k.clone(), v.clone()) for k, v in cache.layers]  # each (1, Hkv, 3, hd)
    with_cache = model(idx[:, 3:], cache=cache)
    mp.apply(model, "prefix", length=3)
    with torch.no_grad():  # the prefix table is laid out (P, layer, {k, v}, Hkv, hd)
        per_layer = [torch.stack([k[0], v[0]]).permute(2, 0, 1, 3).reshape(3, -1) for k, v in first_three]
        model.prefix_tuning.prefix.copy_(torch.cat(per_layer, dim=1))
    torch.testing.assert_close(model(idx[:, 3:]), with_cache, atol=1e-5, rtol=0)


def test_prompt_inits():
    """random ~ U(−0.5, 0.5); vocab: rows of the whole vocabulary (peft's SAMPLE_VOCAB, randint(0, V)); text:
    init_text's own tokens, repeated, without the special tokens the tokenizer's template would add."""
    torch.manual_seed(0)
    model = tiny_model("gpt2")
    mp.apply(model, "prompt", length=2000, init="vocab")
    drawn = (model.prompt.embedding.detach()[:, None] == model.tok_emb.weight[None]).all(dim=2)  # (2000, V)
    assert (drawn.sum(dim=1) == 1).all() and drawn.any(dim=0).all()  # every draw a row, every row drawn
    random = mp.apply(tiny_model("gpt2"), "prompt", length=100).prompt.embedding.detach()  # 3,200 draws
    assert -0.5 <= random.min() < -0.49 and 0.49 < random.max() <= 0.5
    assert random.std().item() == pytest.approx(12 ** -0.5, rel=0.05)
    tokenizer = tiny_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[UNK] $A", special_tokens=[("[UNK]", 1)])
    text = mp.apply(tiny_model("gpt2"), "prompt", length=5, init="text", init_text="great movie", tokenizer=tokenizer)
    ids = [tokenizer.token_to_id(w) for w in ("great", "movie", "great", "movie", "great")]
    assert torch.equal(text.prompt.embedding.detach(), text.tok_emb.weight[ids])
    with pytest.raises(ValueError, match="init='text' needs init_text and the model's tokenizer"):
        mp.apply(tiny_model("gpt2"), "prompt", init="text", init_text="hello")
    with pytest.raises(ValueError, match="prompt: unknown init 'zeros'"):
        mp.apply(tiny_model("gpt2"), "prompt", init="zeros")


def test_prompt_goes_first_on_a_causal_model():
    """As peft prepends its virtual tokens."""
    model = mp.apply(tiny_model("gpt2"), "prompt", length=3)
    x = torch.randn(1, 5, 32)
    widened, _, _ = model.prompt.insert(x)
    assert torch.equal(widened[0, :3], model.prompt.embedding.detach()) and torch.equal(widened[0, 3:], x[0])


def test_prompt_goes_after_cls_for_bert():
    model = mp.apply(tiny_model("bert"), "prompt", length=3)
    x = torch.zeros(1, 5, 32)
    widened, mask, types = model.prompt.insert(x, torch.ones(1, 5, dtype=torch.long), None)
    assert widened.shape == (1, 8, 32) and torch.equal(widened[0, 0], x[0, 0])
    assert torch.equal(widened[0, 1:4], model.prompt.embedding.detach())
    assert mask.sum() == 8 and types is None
    idx, _ = tiny_batch()  # the soft tokens have token type 0 (as peft's), what a sequence without types has
    model.eval()
    torch.testing.assert_close(model(idx, token_type_ids=torch.zeros_like(idx)), model(idx), atol=0, rtol=0)


def test_llama_adapter_top_layers_only_and_gate():
    model = mp.apply(tiny_model("llama"), "llama_adapter", length=4, layers=1)
    assert model.blocks[0].attn.adaption is None
    assert isinstance(model.blocks[1].attn.adaption, llama_adapter.AdaptionPrompt)
    assert torch.count_nonzero(model.blocks[1].attn.adaption.gate) == 0
    with pytest.raises(ValueError, match="1 <= layers <= 2"):
        mp.apply(tiny_model("llama"), "llama_adapter", layers=3)


def test_llama_adapter_attends_to_its_prompts_through_the_gate():
    """Per query head h (its key/value head h // (H / H_kv), as transformers' repeat_kv shares them):
    g_h · softmax(q_h K_pᵀ / √d_h) V_p, with K_p, V_p the prompts through the layer's own W_k, W_v."""
    torch.manual_seed(0)
    cfg = tiny_model("llama").cfg  # 4 query heads sharing 2 key/value heads of 8
    adaption = llama_adapter.AdaptionPrompt(cfg, length=3)
    nn.init.normal_(adaption.gate)
    hd, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    k_proj, v_proj = (nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False) for _ in range(2))
    q = torch.randn(2, cfg.n_head, 5, hd)
    out = adaption(q, k_proj, v_proj)
    prompt = adaption.prompt.detach()
    for h in range(cfg.n_head):
        kv = slice(h // group * hd, (h // group + 1) * hd)
        keys, values = k_proj(prompt)[:, kv], v_proj(prompt)[:, kv]  # (K, hd)
        weights = torch.softmax(q[:, h] @ keys.T / hd ** 0.5, dim=-1)  # (B, T, K)
        torch.testing.assert_close(out[:, h], adaption.gate[h] * weights @ values, msg=f"head {h}")


def test_llama_adapter_and_prefix_tables_start_at_std_0_02():
    """The docstrings' inits: the adaption prompts, the direct prefixes and the MLP's embedding ~ N(0, 0.02²)."""
    torch.manual_seed(0)
    cfg = tiny_model("llama").cfg
    tables = {"adaption prompt": llama_adapter.AdaptionPrompt(cfg, length=100).prompt,  # 3,200 draws each
              "prefix": prefix.PrefixTuning(cfg, length=50).prefix,
              "prefix embedding": prefix.PrefixTuning(cfg, length=100, mlp_hidden=8).embedding}
    for name, table in tables.items():
        assert table.numel() >= 3000 and table.mean().abs() < 0.002, name
        assert table.std().item() == pytest.approx(0.02, rel=0.05), name
