"""QLoRA: LoRA on a 4-bit base (the quantizer itself is tested against bitsandbytes in test_quant.py)."""
import pytest
import torch

import minipeft as mp
import minipeft.fast
from minipeft.core import adapted
from minipeft.core.lora import LoRALinear
from minipeft.core.qlora import QLoRALinear
from minipeft.core.targets import find as find_targets
from minipeft.core.nf4 import Linear4bit, bits_per_parameter, dequantize_4bit, quantize_4bit
from minipeft.run.report import frozen_weight_bytes
from conftest import perturb_trainable, tiny_batch, tiny_model


@pytest.mark.parametrize("flavor", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_qlora_equals_lora_on_dequantized_weights(flavor, quant):
    qlora = tiny_model(flavor, n_classes=2)
    lora = tiny_model(flavor, n_classes=2)
    with torch.no_grad():  # give the LoRA model exactly the weights the 4-bit model will see
        for parent, attr in find_targets(lora, ["all"]):
            weight = getattr(parent, attr).weight
            codes, state = quantize_4bit(weight, quant, blocksize=32)
            weight.copy_(dequantize_4bit(codes, state))
    torch.manual_seed(7)
    mp.apply(qlora, "qlora", rank=4, targets="q,v,down", quant=quant, blocksize=32)
    torch.manual_seed(7)
    mp.apply(lora, "lora", rank=4, targets="q,v,down")
    perturb_trainable(qlora), perturb_trainable(lora)
    idx, mask = tiny_batch()
    torch.testing.assert_close(qlora(idx, attention_mask=mask), lora(idx, attention_mask=mask),
                               atol=1e-5, rtol=0)


def test_every_block_linear_is_4bit_and_lora_only_on_targets():
    model = mp.apply(tiny_model("llama"), "qlora", rank=2, targets="q,v")
    block = model.blocks[0]
    assert isinstance(block.attn.q, QLoRALinear) and isinstance(block.attn.v, QLoRALinear)
    for name in ("k", "o"):
        assert type(getattr(block.attn, name)) is Linear4bit
    for name in ("up", "gate", "down"):
        assert type(getattr(block.mlp, name)) is Linear4bit
    assert not any(isinstance(m, (torch.nn.Linear, LoRALinear)) and m is not model.head
                   for m in model.blocks.modules())
    assert model.tok_emb.weight.dtype == torch.float32


def test_bits_per_parameter_with_double_quant():
    model = mp.apply(tiny_model("llama", d_model=256, n_head=4, n_kv_head=2), "qlora")
    assert bits_per_parameter(model) <= 4.13


def test_qlora_adapter_roundtrip_into_freshly_quantized_base(tmp_path):
    model = mp.apply(tiny_model("gpt2", n_classes=2), "qlora", rank=4, targets="all")
    perturb_trainable(model)
    mp.save_adapter(model, tmp_path / "a")
    fresh = mp.load_adapter(tiny_model("gpt2", n_classes=2), tmp_path / "a")
    idx, mask = tiny_batch()
    assert torch.equal(fresh(idx, attention_mask=mask), model(idx, attention_mask=mask))


def test_bad_quant_options():
    with pytest.raises(ValueError, match="int3"):
        mp.apply(tiny_model("gpt2"), "qlora", quant="int3")
    with pytest.raises(ValueError, match="block"):
        mp.apply(tiny_model("gpt2"), "qlora", blocksize=48)


def test_frozen_weight_bytes():
    """The run summary's frozen weights: all of them in fp32 under LoRA; under QLoRA the blocks' linear layers
    at about 4.127 bits a value (codes, absmax and its double quantization)."""
    lora = mp.apply(tiny_model("llama", d_model=64), "lora")
    now, fp32 = frozen_weight_bytes(lora), frozen_weight_bytes(lora, as_fp32=True)
    rope_tables = sum(b.nbytes for b in lora.buffers())
    assert now == fp32 == 4 * (lora.num_parameters() - lora.num_parameters(trainable_only=True)) + rope_tables
    qlora = mp.apply(tiny_model("llama", d_model=64), "qlora")
    now_q, fp32_q = frozen_weight_bytes(qlora), frozen_weight_bytes(qlora, as_fp32=True)
    assert fp32_q == fp32
    block_linears = sum(m.in_features * m.out_features for m in qlora.blocks.modules() if hasattr(m, "weight_codes"))
    assert now_q == pytest.approx(fp32 - 4 * block_linears + block_linears * 4.127 / 8, rel=0.01)


def test_from_pretrained_straight_into_4bit_then_qlora():
    pre, _ = mp.from_pretrained("tiny-llama", quantize="nf4")
    assert all(type(m) is not torch.nn.Linear for m in pre.blocks.modules())
    mp.apply(pre, "qlora", rank=2)
    late, _ = mp.from_pretrained("tiny-llama")
    torch.manual_seed(0), mp.apply(late, "qlora", rank=2)
    idx, mask = tiny_batch(vocab=257)
    torch.testing.assert_close(pre.encode(idx, mask), late.encode(idx, mask), atol=0, rtol=0)
    with pytest.raises(ValueError, match="already quantized as nf4"):
        mp.apply(mp.from_pretrained("tiny-llama", quantize="nf4")[0], "qlora", quant="fp4")


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_4bit_layers_still_count_as_model_weights(flavor):
    from minipeft.scale.precision import values_in_4bit_layers
    base = tiny_model(flavor)
    qlora = tiny_model(flavor)
    mp.apply(qlora, "qlora", rank=2)
    lora_params = adapted.expected_trainable_parameters(qlora)
    total = sum(p.numel() for p in qlora.parameters()) + values_in_4bit_layers(qlora)
    assert total == sum(p.numel() for p in base.parameters()) + lora_params
    base_tensors = [*base.parameters(), *base.buffers()]  # buffers: RoPE tables (llama)
    assert frozen_weight_bytes(qlora, as_fp32=True) == 4 * sum(t.numel() for t in base_tensors)


@pytest.mark.parametrize("fast", [False, True])
def test_checkpointing_rerun_hands_its_dequantized_weights_to_backward(monkeypatch, fast):
    """The core's Linear4bit dequantizes once per forward pass (autograd keeps W_hat for backward). The fast
    twin dequantizes again in backward instead, and under checkpointing the rerun's W_hat is the one backward
    uses (not forward, rerun and backward again). Same gradients either way; nothing is left behind."""
    def step(checkpointing):
        model = mp.apply(tiny_model("llama"), "qlora", rank=2, targets="all").train()
        perturb_trainable(model)
        model.checkpointing = checkpointing
        calls = []
        original = Linear4bit.dequantized_weight
        monkeypatch.setattr(Linear4bit, "dequantized_weight",
                            lambda layer, *args: calls.append(layer) or original(layer, *args))
        idx, mask = tiny_batch()
        model(idx, attention_mask=mask, shift_labels=idx).backward()
        monkeypatch.undo()
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert not any("w_hat_for_backward" in vars(m) for m in layers)
        return len(calls) / len(layers), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if fast:
        minipeft.fast.enable()
    try:
        plain_calls, plain = step(False)
        checkpointed_calls, checkpointed = step(True)
    finally:
        minipeft.fast.disable()
    if fast:  # forward, and backward where the input needs a gradient (not below the embeddings)
        assert 1 < plain_calls < 2
    else:
        assert plain_calls == 1
    assert checkpointed_calls == 2
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)
