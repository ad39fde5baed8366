"""HF folders saved in bitsandbytes 4-bit (formats/bnb_weights.py) against transformers + bitsandbytes on the
same folder: each layer's codes, absmax and dequantized weight bit for bit, the logits, QLoRA on top, and the
folders refused.

The folders are made as users get them: a tiny transformers model, saved, loaded again with a
BitsAndBytesConfig (bitsandbytes quantizes it) and saved again.

bitsandbytes' forward on the CPU takes one of two roads. Training (or an input that needs gradients)
dequantizes (code · absmax, fp32) and calls F.linear, as minipeft's Linear4bit does: the logits are compared
within the tolerance of the unquantized family parity tests (test_pretrained.py), measured 0.0 here. In
inference, on CPUs with AVX512-BF16, it repacks the weights at the first call and runs a bf16 kernel
(activations and absmax rounded to bf16): measured up to 3e-3 on logits of size 0.6, checked within 1e-2."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minipeft as mp
from minipeft.core.lora import LoRALinear
from minipeft.core.nf4 import Linear4bit
from minipeft.formats.pretrained import HF_PREFIXES, hf_module_names

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
MODELS = {  # family -> (config class, model class, extra config)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # biases on q, k, v
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(head_dim=16)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(pad_token_id=0)),
}
FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


@pytest.fixture(scope="module", autouse=True)
def eager():
    """bitsandbytes torch.compiles some CPU fallbacks; these shapes do not need them."""
    with torch._dynamo.config.patch(disable=True):
        yield


def save_4bit(family: str, folder, quant_type="nf4", double_quant=True, **bnb_options):
    """A tiny `family` model quantized by transformers + bitsandbytes and saved to folder; that model
    (as loaded, weights never used in a forward pass yet)."""
    config_class, model_class, extra = MODELS[family]
    torch.manual_seed(0)
    model_class(config_class(**SIZES, **extra)).save_pretrained(folder / "full")
    options = dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                   bnb_4bit_compute_dtype=torch.float32) | bnb_options
    hf = model_class.from_pretrained(folder / "full", quantization_config=transformers.BitsAndBytesConfig(**options),
                                     device_map="cpu", dtype=torch.float32)
    hf.save_pretrained(folder / "4bit")
    return hf, folder / "4bit"


def their_layer(hf, family: str, ours: str):
    """The transformers module of our module `ours` ("blocks.1.mlp.up" -> model.layers.1.mlp.up_proj)."""
    block, i, rest = ours.split(".", 2)
    return hf.get_submodule(HF_PREFIXES[family] + hf_module_names(family)[f"blocks.{{i}}.{rest}"].format(i=i))


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_4bit_folder_holds_the_codes_and_computes_the_logits_of_bitsandbytes(family, quant_type, double_quant,
                                                                             tmp_path):
    hf, folder = save_4bit(family, tmp_path, quant_type, double_quant)
    model, _ = mp.from_pretrained(folder)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 2 * 7 and type(model.head) is torch.nn.Linear
    for name, ours in layers.items():
        theirs = their_layer(hf, family, name)
        state = theirs.weight.quant_state
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset \
            if state.nested else state.absmax
        assert (ours.quant_type, ours.blocksize, ours.double_quant) == (quant_type, 64, double_quant)
        assert torch.equal(ours.weight_codes, theirs.weight.data.view(-1)), name
        assert torch.equal(ours.quant_state.block_absmax(), absmax), name
        assert torch.equal(ours.dequantized_weight(), bnb.functional.dequantize_4bit(theirs.weight.data, state)), name
        assert (ours.bias is None) == (theirs.bias is None)
        assert ours.bias is None or torch.equal(ours.bias, theirs.bias)
    idx = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
        dequantizing = hf.train()(idx).logits  # bitsandbytes' road through dequantize + F.linear
        inference = hf.eval()(idx).logits  # the bf16 kernel on AVX512-BF16 CPUs, else the same road
    assert (ours - dequantizing).abs().max() < 1e-4  # measured 0.0
    assert (ours - inference).abs().max() < 1e-2


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_trains_on_a_4bit_folder_without_touching_its_codes(quant_type, double_quant, tmp_path):
    _, folder = save_4bit("qwen2", tmp_path, quant_type, double_quant)
    model, _ = mp.from_pretrained(folder)
    frozen = {name: b.clone() for name, b in model.named_buffers() if "weight_" in name}
    idx = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(idx)
    with pytest.raises(ValueError, match="already quantized"):  # qlora asks for the folder's format
        mp.apply(mp.from_pretrained(folder)[0], "qlora", quant="fp4" if quant_type == "nf4" else "nf4")
    mp.apply(model, "qlora", rank=2, quant=quant_type, double_quant=double_quant)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)  # B = 0: the folder's model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(model.eval()(idx), before)
    assert all(torch.equal(b, frozen[name]) for name, b in model.named_buffers() if "weight_" in name)


def test_skipped_layers_stay_full_precision(tmp_path):
    hf, folder = save_4bit("llama", tmp_path, llm_int8_skip_modules=["lm_head", "down_proj"])
    model, _ = mp.from_pretrained(folder)
    for i in range(2):
        assert type(model.blocks[i].mlp.down) is torch.nn.Linear
        assert torch.equal(model.blocks[i].mlp.down.weight, hf.model.layers[i].mlp.down_proj.weight)
        assert type(model.blocks[i].mlp.up) is Linear4bit
    # QLoRA keeps them so, as peft on the bitsandbytes model does: plain LoRA on them, the base unchanged
    idx = torch.randint(0, SIZES["vocab_size"], (2, 12))
    with torch.no_grad():
        loaded = model(idx)
    mp.apply(model, "qlora", targets=["all"])
    down = model.blocks[0].mlp.down
    assert type(down) is LoRALinear and torch.equal(down.weight, hf.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        assert torch.equal(model(idx), loaded)  # B = 0: the loaded model, full-precision layers included
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj.base_layer) is torch.nn.Linear


def edit_config(folder, **quantization):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] |= quantization
    (folder / "config.json").write_text(json.dumps(config))


def edit_layer(folder, tensor: str | None = None, change=None, **state_fields):
    """Rewrite the first layer's q_proj: its tensor `weight.<tensor>` by change(it) (no change: left out), its
    state JSON's fields."""
    tensors = load_file(folder / "model.safetensors")
    module = "model.layers.0.self_attn.q_proj.weight"
    if tensor and change is None:
        del tensors[f"{module}.{tensor}"]
    elif tensor:
        tensors[f"{module}.{tensor}"] = change(tensors[f"{module}.{tensor}"])
    key = f"{module}.quant_state.bitsandbytes__nf4"
    state = json.loads(tensors[key].numpy().tobytes()) | state_fields
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama_4bit(tmp_path_factory):
    return save_4bit("llama", tmp_path_factory.mktemp("llama"))[1]


@pytest.mark.parametrize("edit,message", [
    (lambda f: edit_config(f, quant_method="gptq"), "weights quantized with 'gptq' are not supported"),
    (lambda f: edit_config(f, load_in_4bit=False, load_in_8bit=True), "8-bit .* not supported"),
    (lambda f: edit_config(f, bnb_4bit_quant_storage="bfloat16"), "codes stored as bfloat16 are not supported"),
    (lambda f: edit_layer(f, blocksize=16), "blocksize must be a power of two .* does not take"),
    (lambda f: edit_layer(f, quant_type="int4"), "unknown quant_type 'int4'"),
    (lambda f: edit_layer(f, nested_blocksize=128), "double quantization other than bitsandbytes'"),
    (lambda f: edit_layer(f, "quant_map", lambda t: t.flip(0)), "its code book is not bitsandbytes' nf4"),
    (lambda f: edit_layer(f, "absmax", lambda t: t.float()), "packed codes torch.uint8 and absmax torch.float32"),
    (lambda f: edit_layer(f, "absmax", lambda t: t[:-1]), "q_proj: .* needs 64 values of weight_absmax_codes, got 63"),
    (lambda f: edit_layer(f, "nested_absmax"), "incomplete or unreadable"),
    (lambda f: edit_layer(f, shape=[64, 32]), "shape mismatch"),
])
def test_4bit_folders_minipeft_cannot_hold_exactly_are_refused(edit, message, llama_4bit, tmp_path):
    folder = shutil.copytree(llama_4bit, tmp_path / "edited")
    edit(folder)
    with pytest.raises(ValueError, match=message):
        mp.from_pretrained(folder)


@pytest.mark.parametrize("family,options,message", [
    ("phi3", {}, "4-bit phi3 weights are not supported: minipeft would have to cut"),  # qkv_proj, gate_up_proj
    ("llama", dict(llm_int8_skip_modules=["down_proj"]), "lm_head is stored in 4 bits"),
])
def test_4bit_layers_minipeft_does_not_keep_in_4_bits_are_refused(family, options, message, tmp_path):
    _, folder = save_4bit(family, tmp_path, **options)
    with pytest.raises(ValueError, match=message):
        mp.from_pretrained(folder)


def test_8bit_folder_is_refused(tmp_path):
    config_class, model_class, _ = MODELS["llama"]
    torch.manual_seed(0)
    model_class(config_class(**SIZES)).save_pretrained(tmp_path / "full")
    hf = model_class.from_pretrained(tmp_path / "full", device_map="cpu",
                                     quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    hf.save_pretrained(tmp_path / "8bit")
    with pytest.raises(ValueError, match="bitsandbytes 8-bit .LLM.int8. weights are not supported"):
        mp.from_pretrained(tmp_path / "8bit")


def perturbed(model, seed=3):
    """`model` with every lora_B moved off zero, so its adapter changes the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("base", ["4-bit folder", "quantize=nf4"])
def test_qlora_adapter_moves_both_ways_in_peft_format(base, tmp_path):
    """In peft a QLoRA adapter is a LoRA on a bitsandbytes 4-bit base: ours is written so, runs on that base in
    peft (train mode: bitsandbytes dequantizes and multiplies exactly) and on the full-precision one (the usual
    serving path: that base + the same LoRA), and peft's LoRA on the 4-bit base loads here as qlora."""
    peft = pytest.importorskip("peft")
    _, folder = save_4bit("llama", tmp_path)
    full = tmp_path / "full"
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)

    def ours_4bit():
        return mp.from_pretrained(folder)[0] if base == "4-bit folder" else mp.from_pretrained(full, quantize="nf4")[0]

    def theirs_4bit():
        source, extra = (folder, {}) if base == "4-bit folder" else (full, dict(quantization_config=quantization))
        return transformers.LlamaForCausalLM.from_pretrained(source, device_map="cpu", dtype=torch.float32, **extra)

    idx = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    model = perturbed(mp.apply(ours_4bit(), "qlora", rank=4, alpha=8, targets=["all"]))
    mp.save_adapter(model, tmp_path / "ours", format="peft")
    lora_fp = mp.apply(mp.from_pretrained(full)[0], "lora", rank=4, alpha=8, targets=["all"])
    lora_fp.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" in k}, strict=False)
    with torch.no_grad():
        served_4bit = peft.PeftModel.from_pretrained(theirs_4bit(), tmp_path / "ours").train()(idx).logits
        assert (served_4bit - model(idx)).abs().max() < 1e-4  # measured 0.0
        full_precision = transformers.LlamaForCausalLM.from_pretrained(full)
        served_fp = peft.PeftModel.from_pretrained(full_precision, tmp_path / "ours").eval()(idx).logits
        assert (served_fp - lora_fp(idx)).abs().max() < 1e-5  # measured 0.0; the 4-bit rounding differs by ~0.1
        back = mp.load_adapter(ours_4bit(), tmp_path / "ours")
        assert back.peft_config["method"] == "qlora" and torch.equal(back(idx), model(idx))

    theirs = peft.get_peft_model(theirs_4bit(), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                target_modules=["q_proj", "down_proj"],
                                                                init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = mp.load_adapter(ours_4bit(), tmp_path / "theirs")
    assert loaded.peft_config["method"] == "qlora" and loaded.peft_config["options"]["targets"] == ["q", "down"]
    with torch.no_grad():
        assert (loaded(idx) - theirs.train()(idx).logits).abs().max() < 1e-4  # measured 0.0

    pissa = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(full),
                                peft.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"]))
    pissa.save_pretrained(tmp_path / "pissa")  # on a 4-bit base, peft would quantize W - s·B₀A₀ again
    with pytest.raises(ValueError, match="initialized with pissa, which on a base stored in 4 bits"):
        mp.load_adapter(ours_4bit(), tmp_path / "pissa")
    dora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(full),
                               peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    dora.save_pretrained(tmp_path / "dora")  # minipeft's 4-bit layers take LoRA only
    with pytest.raises(ValueError, match="is DoRA, which minipeft's 4-bit layers do not take"):
        mp.load_adapter(ours_4bit(), tmp_path / "dora")
