"""peft's adapter format (minipeft/peft_format/), both ways, against the real transformers + peft (no mocks).

Tiny random transformers models (and the real minilm asset) are saved to folders and loaded into
minipeft with from_pretrained. An adapter trained a few steps on one side must give the same outputs on
the other, within 1e-5 over real tokens: LM logits (GPT2LMHeadModel, LlamaForCausalLM), hidden states
(BertModel), class logits (GPT2ForSequenceClassification). An adapter exported to peft must also get
the same gradients there, for every tensor it trains, on one batch with the adapter off its
initialization (gradient_differences). Adapters either side cannot represent exactly must be refused
with a ValueError saying what differs.
"""
import copy
import importlib.util
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every base model is a local folder; never ask the hub

import pytest
import torch
from safetensors.torch import load_file, save_file

import minipeft as mp
from minipeft.formats.assets import asset_path
from minipeft import peft_format
from minipeft.formats.pretrained import HF_PREFIXES, byte_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = [  # notes peft prints while the tests build adapters with it (not about our files)
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
PAD = 256  # the byte tokenizer's <|endoftext|>, the tiny models' pad token

_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=257, max_position_embeddings=64, pad_token_id=PAD)
TINY_CONFIGS = {  # 2 layers, d 32; the decoders have grouped-query attention (4 heads, 2 KV heads)
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=257,
                                            pad_token_id=PAD),
    "bert": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64, vocab_size=257),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, vocab_size=257,
                                              max_position_embeddings=64, rope_theta=5000.0, pad_token_id=PAD),
    "roberta": lambda: transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=64, max_position_embeddings=66, vocab_size=257),
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                        max_position_embeddings=64, vocab_size=257),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER, tie_word_embeddings=True),
    "phi3": lambda: transformers.Phi3Config(**_DECODER, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_DECODER, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
                                                    layer_types=["sliding_attention", "full_attention"]),
}
FLAVOR = {**{name: name for name in TINY_CONFIGS}, "minilm": "bert"}
ENCODER_MODELS = {"bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel"}
DECODER_CLASSES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
                   "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
                   "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
                   "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
                   "gemma3": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification")}


def hf_class(flavor: str, classifier: bool):
    if flavor in ENCODER_MODELS and not classifier:
        return getattr(transformers, ENCODER_MODELS[flavor])
    if flavor in ENCODER_MODELS:
        return getattr(transformers, f"{ENCODER_MODELS[flavor].removesuffix('Model')}ForSequenceClassification")
    return getattr(transformers, DECODER_CLASSES[flavor][classifier])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> HF folder: the three tiny models (fixed seeds, with a byte tokenizer.json) and minilm."""
    out = {"minilm": asset_path("minilm")}
    for name, make_config in TINY_CONFIGS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        hf_class(name, False)(make_config()).save_pretrained(folder)
        byte_tokenizer().save(str(folder / "tokenizer.json"))
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def ours_base(folders):
    """make(name, n_classes) -> a fresh minipeft base model (deep copies of one load per name)."""
    loaded = {}

    def make(name, n_classes=None):
        if (name, n_classes) not in loaded:
            torch.manual_seed(1)  # the fresh classifier head
            loaded[(name, n_classes)] = mp.from_pretrained(folders[name], n_classes=n_classes, dropout=0.0)[0]
        return copy.deepcopy(loaded[(name, n_classes)])
    return make


def theirs_base(folders, name, classifier=False):
    """The transformers model an adapter for base `name` runs on (a 2-class one for classifiers)."""
    extra = {"num_labels": 2} if classifier else {}
    return hf_class(FLAVOR[name], classifier).from_pretrained(folders[name], **extra).eval()


def batch(seed=0, B=3, T=10):
    """Ids (B, T) and a right-padded mask whose rows have 10, 7 and 4 real tokens; padding is PAD."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 250, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(1, B):
        mask[row, T - 3 * row:] = 0
    return idx.masked_fill(mask == 0, PAD), mask


def ours_out(model, idx, mask):
    """Class logits (B, C), encoder hidden states (B, T, d) (what BertModel returns), else LM logits."""
    if not model.cfg.causal and not model.cfg.n_classes:
        return model.encode(idx, attention_mask=mask)
    return model(idx, attention_mask=mask)


def theirs_out(model, idx, mask, virtual=0):
    """The same from a transformers/peft model; prompt tuning's `virtual` leading outputs dropped."""
    out = model(input_ids=idx, attention_mask=mask)
    if "logits" in out and out.logits.dim() == 2:
        return out.logits
    tokens = out.logits if "logits" in out else out.last_hidden_state
    return tokens[:, virtual:]


def max_diff(a, b, mask) -> float:
    """Largest |a - b| over real tokens of (B, T, ...) outputs, or over all of (B, C) class logits."""
    if a.dim() == 2:
        return (a - b).abs().max().item()
    return (a - b)[mask.bool()].abs().max().item()


GRADIENT_RTOL = 1e-5  # ‖ours − peft's‖ / ‖peft's‖ per trainable tensor, both sides in float64


def probe_loss(out, mask):
    """The loss the gradients are compared on: `train`'s fixed linear functional of the outputs, over real
    tokens only (what the two libraries compute at padding positions is nobody's output)."""
    weighted = out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    return weighted.mean() if out.dim() == 2 else weighted[mask.bool()].mean()


def peft_file_key(name: str) -> str:
    """A trainable parameter of a PeftModel -> the key its adapter file holds it under: the adapter's name
    (default) dropped, a classifier's copy (modules_to_save) named as the module, DoRA's magnitude module
    named by its vector, the prompt encoder's table as prompt_embeddings."""
    if name.startswith("prompt_encoder."):
        return "prompt_embeddings"
    key = name.replace(".default", "").replace(".modules_to_save", "")
    return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key


def gradient_differences(model, path, base, virtual=0, peft_lacks=()) -> dict[str, float]:
    """Our trainable tensor -> ‖ours − peft's‖ / ‖peft's‖: the gradients of probe_loss on batch(), ours from
    `model`, peft's from `model`'s adapter exported to `path` and run by peft on the transformers `base`.
    peft's gradients, keyed as its file keys the tensors, are carried back to our parameters by the chain
    rule through the export (to_peft's vector-Jacobian product), which maps a fused layout (GPT-2's
    c_attn, a prefix MLP folded into its table) exactly as the export does. Both sides run in float64:
    in fp32 the rounding of attention's backward drowns the smallest gradients (minilm's last q layers',
    10³ times smaller than the rest, differ by 1 % there). `peft_lacks`: our trainable tensors peft has no
    counterpart of (the export checks they hold nothing: a classifier head's bias, which is 0)."""
    idx, mask = batch()
    prompt_learning = model.peft_config["method"] in ("prompt", "prefix")  # peft loads these frozen only
    theirs = peft.PeftModel.from_pretrained(base, path, is_trainable=not prompt_learning).double().eval()
    if prompt_learning:  # the prompt table and a classifier's copy (modules_to_save)
        for name, p in theirs.named_parameters():
            p.requires_grad_(name.startswith("prompt_encoder.") or ".modules_to_save." in name)
    trained = {peft_file_key(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    loss = probe_loss(theirs_out(theirs, idx, mask, virtual), mask)
    peft_grads = dict(zip(trained, torch.autograd.grad(loss, list(trained.values()))))
    model = copy.deepcopy(model).double()
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(probe_loss(ours_out(model, idx, mask), mask), list(ours.values()))
    exported, _ = peft_format.to_peft(model, path)
    assert peft_grads.keys() <= exported.keys(), f"peft trains {peft_grads.keys() - exported.keys()}, not exported"
    keys = [k for k in peft_grads if exported[k].requires_grad]
    carried = torch.autograd.grad([exported[k] for k in keys], list(ours.values()),
                                  [peft_grads[k] for k in keys], allow_unused=True)
    differences = {}
    for name, grad, via_peft in zip(ours, grads, carried):
        if name in peft_lacks:
            continue
        assert via_peft is not None and via_peft.norm() > 0, f"peft's gradients do not reach {name}"
        differences[name] = ((grad - via_peft).norm() / via_peft.norm()).item()
    return differences


def train(model, forward, steps=3, lr=5e-2):
    """A few AdamW steps on a made-up loss (a fixed linear functional of the outputs: unlike their
    squares, not flat after a LayerNorm), so every trained tensor moves away from its init."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    idx, mask = batch(seed=5)
    for _ in range(steps):
        out = forward(model, idx, mask).float()
        (out * torch.linspace(-1, 1, out.shape[-1])).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# minipeft -> peft

TO_PEFT = [  # (base, method, options); every pair that is exact
    ("gpt2", "lora", dict(rank=4, alpha=8, targets="q,v")),  # the fused c_attn export
    ("gpt2", "lora", dict(rank=4, alpha=8, targets="q,v,o,down")),  # + rank_pattern / alpha_pattern
    ("bert", "lora", dict(rank=4, alpha=8, targets="q,v")),
    ("bert", "lora", dict(rank=2, alpha=4, targets="k,o,up,down")),  # bert's FFN output by full path
    ("llama", "lora", dict(rank=4, alpha=8, targets="q,v")),  # grouped-query attention
    ("llama", "lora", dict(rank=2, alpha=8, targets="all", dropout=0.1)),  # loaded back for inference: dropout off
    ("minilm", "lora", dict(rank=4, alpha=8, targets="q,v")),
    ("gpt2", "prompt", dict(length=4)),
    ("llama", "prompt", dict(length=4)),
    ("gpt2", "prefix", dict(length=4)),
    ("bert", "prefix", dict(length=4)),
    ("llama", "prefix", dict(length=4, mlp_hidden=16)),  # exported as the MLP's output
    ("minilm", "prefix", dict(length=4)),
    ("phi3", "lora", dict(rank=4, alpha=8, targets="q,v")),  # the fused qkv_proj, as gpt2's c_attn
    ("phi3", "lora", dict(rank=2, alpha=4, targets="all")),  # qkv_proj 3r, gate_up_proj 2r: rank_pattern
    ("qwen2", "lora", dict(rank=4, alpha=8, targets="q,k,v,o")),  # q, k, v with biases
    ("gemma3", "lora", dict(rank=2, alpha=4, targets="all")),
    ("gemma3", "prompt", dict(length=4)),  # a soft prompt beside the √d-scaled embeddings
    ("gemma3", "prefix", dict(length=4)),  # prefix keys inside the sliding window
    ("roberta", "lora", dict(rank=4, alpha=8, targets="q,v,down")),
    ("distilbert", "lora", dict(rank=4, alpha=8, targets="q,o,up")),
]


@pytest.mark.parametrize("name, method, options", TO_PEFT,
                         ids=[f"{n}-{m}-" + ",".join(map(str, o.values())) for n, m, o in TO_PEFT])
def test_minipeft_adapter_runs_in_peft_and_comes_back(name, method, options, folders, ours_base, tmp_path):
    model = train(mp.apply(ours_base(name), method, **options), ours_out)
    mp.save_adapter(model, tmp_path / "a", format="peft")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    idx, mask = batch()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = ours_out(model, idx, mask)
        in_peft = peft.PeftModel.from_pretrained(theirs_base(folders, name), tmp_path / "a").eval()
        virtual = options["length"] if method == "prompt" else 0
        theirs = theirs_out(in_peft, idx, mask, virtual)
        base = theirs_out(theirs_base(folders, name), idx, mask)
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]  # peft finds nothing odd
    assert max_diff(ours, base, mask) > 1e-3, "the adapter should change the outputs"
    assert max_diff(ours, theirs, mask) < ATOL
    back = mp.load_adapter(ours_base(name), tmp_path / "a")  # and back into minipeft
    with torch.no_grad():
        assert max_diff(ours_out(back, idx, mask), ours, mask) < ATOL
    gradients = gradient_differences(model, tmp_path / "a", theirs_base(folders, name), virtual)
    assert max(gradients.values()) < GRADIENT_RTOL, gradients


def test_fused_c_attn_export_is_block_structured_and_splits_back_exactly(ours_base, tmp_path):
    model = train(mp.apply(ours_base("gpt2"), "lora", rank=4, alpha=8, targets="q,v"), ours_out)
    mp.save_adapter(model, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["target_modules"]) == ("LORA", "CAUSAL_LM", ["c_attn"])
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (8, 16, True)  # 16/8 = 8/4
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    attn = model.blocks[1].attn
    A = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]  # (2r, d)
    B = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]  # (3d, 2r)
    assert torch.equal(A, torch.cat([attn.q.lora_A, attn.v.lora_A]))
    assert torch.equal(B[:32, :4], attn.q.lora_B) and torch.equal(B[64:, 4:], attn.v.lora_B)
    assert not B[:32, 4:].any() and not B[32:64].any() and not B[64:, :4].any()  # zeros off the blocks
    back = mp.load_adapter(ours_base("gpt2"), tmp_path / "a")
    assert back.peft_config["options"] == model.peft_config["options"]  # q,v rank 4 alpha 8 again
    assert all(torch.equal(a, b) for a, b in zip(mp.trainable_state_dict(back).values(),
                                                 mp.trainable_state_dict(model).values()))

    mixed = train(mp.apply(ours_base("gpt2"), "lora", rank=4, alpha=8, targets="q,v,o,down"), ours_out)
    mp.save_adapter(mixed, tmp_path / "b", format="peft")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert (config["rank_pattern"], config["alpha_pattern"]) == ({"c_attn": 8}, {"c_attn": 16})
    assert config["target_modules"] == ["c_attn", "attn.c_proj", "mlp.c_proj"]


def test_phi3_fused_qkv_and_gate_up_export_exactly_and_split_back(ours_base, tmp_path):
    """Phi-3's qkv_proj (rows [q | k | v] by head counts) and gate_up_proj ([gate | up]) are written as
    gpt2's c_attn is: one block-structured LoRA per fused module, of rank r per target it holds."""
    model = train(mp.apply(ours_base("phi3"), "lora", rank=2, alpha=4, targets="q,k,v,o,up,gate,down"), ours_out)
    mp.save_adapter(model, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert (config["r"], config["rank_pattern"]) == (2, {"qkv_proj": 6, "gate_up_proj": 4})
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.1"
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    A, B = tensors[f"{layer}.self_attn.qkv_proj.lora_A.weight"], tensors[f"{layer}.self_attn.qkv_proj.lora_B.weight"]
    assert torch.equal(A, torch.cat([attn.q.lora_A, attn.k.lora_A, attn.v.lora_A]))  # (3r, d)
    assert torch.equal(B[:32, :2], attn.q.lora_B) and torch.equal(B[32:48, 2:4], attn.k.lora_B)  # 4 q, 2 kv heads of 8
    assert torch.equal(B[48:, 4:], attn.v.lora_B) and not B[:32, 2:].any() and not B[32:48, 4:].any()
    B = tensors[f"{layer}.mlp.gate_up_proj.lora_B.weight"]  # (2f, 2r): gate rows first
    assert torch.equal(B[:64, :2], mlp.gate.lora_B) and torch.equal(B[64:, 2:], mlp.up.lora_B)
    back = mp.load_adapter(ours_base("phi3"), tmp_path / "a")
    assert back.peft_config["options"] == model.peft_config["options"]
    assert all(torch.equal(a, b) for a, b in zip(mp.trainable_state_dict(back).values(),
                                                 mp.trainable_state_dict(model).values()))


# ---------------------------------------------------------------------------------------------
# peft -> minipeft

FROM_PEFT = [  # (base, classifier?, peft config); trained with peft, loaded into minipeft
    pytest.param("gpt2", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                        task_type="CAUSAL_LM"), id="gpt2-lora-c_attn"),
    pytest.param("gpt2", False, lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], rank_pattern={"c_fc": 2},
        alpha_pattern={"c_attn": 4}, use_rslora=True, task_type="CAUSAL_LM"), id="gpt2-lora-patterns-rslora"),
    pytest.param("gpt2", True, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                       task_type="SEQ_CLS"), id="gpt2-lora-classifier"),
    pytest.param("bert", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                        task_type="FEATURE_EXTRACTION"), id="bert-lora-q,v"),
    pytest.param("llama", False, lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         layers_to_transform=[1], task_type="CAUSAL_LM"),
                 id="llama-lora-q,v-layer1"),
    pytest.param("llama", False, lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"), id="llama-lora-all-linear"),
    pytest.param("llama", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.3, task_type="CAUSAL_LM"),
                 id="llama-lora-dropout"),  # loaded into an eval model: its dropout stays off
    pytest.param("llama", True, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        task_type="SEQ_CLS"), id="llama-lora-classifier"),
    pytest.param("minilm", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          task_type="FEATURE_EXTRACTION"), id="minilm-lora-q,v"),
    pytest.param("gpt2", False, lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                 id="gpt2-prompt"),
    pytest.param("llama", False, lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                 id="llama-prompt"),
    pytest.param("gpt2", False, lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                 id="gpt2-prefix"),
    pytest.param("bert", False, lambda: peft.PrefixTuningConfig(num_virtual_tokens=4,
                                                                task_type="FEATURE_EXTRACTION"), id="bert-prefix"),
    pytest.param("llama", False, lambda: peft.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16, task_type="CAUSAL_LM"),
        id="llama-prefix-mlp"),
    pytest.param("llama", True, lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"),
                 id="llama-prefix-classifier"),  # prompt learning keys the classifier base_model.score.weight
    pytest.param("phi3", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"],
                                                        task_type="CAUSAL_LM"), id="phi3-lora-fused"),
    pytest.param("qwen2", True, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        task_type="SEQ_CLS"), id="qwen2-lora-classifier"),
    pytest.param("gemma3", False, lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                          task_type="CAUSAL_LM"), id="gemma3-lora-all-linear"),
    pytest.param("roberta", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           task_type="FEATURE_EXTRACTION"), id="roberta-lora-q,v"),
    pytest.param("distilbert", False, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin", "lin2"],
                                                              task_type="FEATURE_EXTRACTION"), id="distilbert-lora"),
]


def peft_forward(model, idx, mask):
    virtual = model.peft_config["default"].num_virtual_tokens \
        if model.peft_config["default"].peft_type == "PROMPT_TUNING" else 0
    return theirs_out(model, idx, mask, virtual)


@pytest.mark.parametrize("name, classifier, make_config", FROM_PEFT)
def test_peft_adapter_loads_into_minipeft(name, classifier, make_config, folders, ours_base, tmp_path):
    torch.manual_seed(0)
    config = make_config()
    trained = train(peft.get_peft_model(theirs_base(folders, name, classifier), config), peft_forward)
    trained.save_pretrained(tmp_path / "a")
    n_classes = 2 if classifier else None
    model = mp.load_adapter(ours_base(name, n_classes), tmp_path / "a")
    idx, mask = batch()
    with torch.no_grad():
        theirs = peft_forward(trained, idx, mask)
        ours = ours_out(model, idx, mask)
        base = ours_out(ours_base(name, n_classes), idx, mask)
    assert max_diff(ours, base, mask) > 1e-3, "the adapter should change the outputs"
    assert max_diff(ours, theirs, mask) < ATOL
    if classifier:  # the head came from peft (no bias), so it exports back: peft -> minipeft -> peft
        mp.save_adapter(model, tmp_path / "b", format="peft")
        again = peft.PeftModel.from_pretrained(theirs_base(folders, name, classifier), tmp_path / "b").eval()
        with torch.no_grad():
            assert max_diff(theirs_out(again, idx, mask), theirs, mask) < ATOL
        gradients = gradient_differences(model, tmp_path / "b", theirs_base(folders, name, classifier),
                                         peft_lacks=("head.bias",))
        assert "head.weight" in gradients and max(gradients.values()) < GRADIENT_RTOL, gradients


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "phi3", "distilbert"])
def test_derived_peft_names_select_exactly_their_module_in_peft(name, folders):
    """The target_modules name peft_format derives for each target (from pretrained.py's rules) makes
    peft itself adapt exactly the transformers module holding that target: in every layer, or in the
    named layer for a full path (bert's FFN output)."""
    n_layer = 2
    body = "" if name in ENCODER_MODELS else HF_PREFIXES[name]
    expected_names = {"gpt2": {"q": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"},
                      "bert": {"o": "attention.output.dense", "down": "encoder.layer.{i}.output.dense"},
                      "llama": {"q": "q_proj", "gate": "gate_proj"},
                      "phi3": {"q": "qkv_proj", "v": "qkv_proj", "gate": "gate_up_proj", "up": "gate_up_proj"},
                      "distilbert": {"o": "out_lin", "up": "lin1"}}[name]
    modules = peft_format.MODULES[name]
    assert {t: modules[t][1] for t in expected_names} == expected_names
    for target, (module, peft_name) in modules.items():
        config = peft.LoraConfig(target_modules=[peft_name.format(i=1)])
        in_peft = peft.get_peft_model(theirs_base(folders, name), config)
        adapted = {n.removeprefix(peft_format.ROOT + body) for n, m in in_peft.named_modules() if hasattr(m, "lora_A")}
        layers = [1] if "{i}" in peft_name else range(n_layer)
        assert adapted == {module.format(i=i) for i in layers}, (target, peft_name)


def test_general_c_attn_lora_becomes_q_k_v_sharing_a(folders, ours_base, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    trained = train(peft.get_peft_model(theirs_base(folders, "gpt2"), config), peft_forward)
    trained.save_pretrained(tmp_path / "a")
    model = mp.load_adapter(ours_base("gpt2"), tmp_path / "a")
    options = model.peft_config["options"]
    assert {k: options[k] for k in ("rank", "alpha", "dropout", "targets")} == \
        {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "k", "v"]}
    attn = model.blocks[0].attn
    assert torch.equal(attn.q.lora_A, attn.k.lora_A) and torch.equal(attn.k.lora_A, attn.v.lora_A)


def test_eval_reads_a_peft_adapter(folders, ours_base, tmp_path, capsys):
    """eval.py --adapter takes either format; n_classes comes from the peft folder's score layer."""
    rows = ["text,label"] + [f"\"{'great' if i % 2 else 'awful'} film {i}\",{i % 2}" for i in range(60)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="SEQ_CLS")
    trained = train(peft.get_peft_model(theirs_base(folders, "gpt2", True), config), peft_forward)
    trained.save_pretrained(tmp_path / "peft")
    ours = mp.load_adapter(ours_base("gpt2", n_classes=2), tmp_path / "peft")
    mp.save_adapter(ours, tmp_path / "mine")
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    printed = []
    for adapter in ("peft", "mine"):
        eval_cli.main(["--model", str(folders["gpt2"]), "--task", str(tmp_path / "reviews.csv"),
                       "--adapter", str(tmp_path / adapter), "--max-len", "32"])
        printed.append(capsys.readouterr().out.strip().rsplit(":", 1)[-1])
    assert printed[0] == printed[1] and "accuracy" in printed[0]


# ---------------------------------------------------------------------------------------------
# refused, with a message naming what differs


def peft_adapter(folders, path, name, config, classifier=False, base=None):
    """Save peft's adapter for `config` on the named base (or on the transformers model `base`)."""
    torch.manual_seed(0)
    peft.get_peft_model(base or theirs_base(folders, name, classifier), config).save_pretrained(path)
    return path


@pytest.mark.parametrize("name, make_config, message", [
    ("gpt2", lambda: peft.AdaLoraConfig(total_step=10, target_modules=["c_attn"], task_type="CAUSAL_LM"),
     "peft ADALORA adapter, a method minipeft does not have"),
    ("gpt2", lambda: peft.LoraConfig(target_modules=["c_attn"], bias="all"), "uses trained base biases"),
    ("bert", lambda: peft.LoraConfig(target_modules=["query", "pooler.dense"]),
     "adapts pooler.dense, which minipeft does not map"),
    ("phi3", lambda: peft.LoraConfig(target_modules=["qkv_proj", "embed_tokens"]),
     "embed_tokens.*minipeft cannot load it"),
], ids=["adalora", "lora-bias", "bert-pooler", "phi3-embeddings"])
def test_methods_minipeft_lacks_are_refused(name, make_config, message, folders, ours_base, tmp_path):
    peft_adapter(folders, tmp_path / "a", name, make_config())
    with pytest.raises(ValueError, match=message):
        mp.load_adapter(ours_base(name), tmp_path / "a")


def test_adapter_for_another_base_model_is_refused(folders, ours_base, tmp_path):
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    peft_adapter(folders, tmp_path / "llama", "llama", lora)
    with pytest.raises(ValueError, match="trained on a llama model .*this model is a gpt2"):
        mp.load_adapter(ours_base("gpt2"), tmp_path / "llama")

    torch.manual_seed(0)  # a wider llama saved to its own folder, named in the adapter's config
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=257, max_position_embeddings=64))
    wider.save_pretrained(tmp_path / "wider")
    peft_adapter(folders, tmp_path / "w", "llama", lora,
                 base=transformers.LlamaForCausalLM.from_pretrained(tmp_path / "wider"))
    with pytest.raises(ValueError, match="another base model .*d_model 48 there, 32 here"):
        mp.load_adapter(ours_base("llama"), tmp_path / "w")

    deeper = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4,
                                                                  n_positions=64, vocab_size=257))
    peft_adapter(folders, tmp_path / "p", "gpt2", peft.PrefixTuningConfig(num_virtual_tokens=4,
                                                                          task_type="CAUSAL_LM"), base=deeper)
    with pytest.raises(ValueError, match=r"num_layers 3 there, 2 here.*prompt_embeddings \(4, 192\) there"):
        mp.load_adapter(ours_base("gpt2"), tmp_path / "p")


def test_what_cannot_be_exact_is_refused(folders, ours_base, tmp_path):
    with pytest.raises(ValueError, match=r"soft prompt after \[CLS\], peft before it"):
        mp.save_adapter(mp.apply(ours_base("bert"), "prompt", length=4), tmp_path / "x", format="peft")
    peft_adapter(folders, tmp_path / "bp", "bert",
                 peft.PromptTuningConfig(num_virtual_tokens=4, task_type="FEATURE_EXTRACTION"))
    with pytest.raises(ValueError, match=r"before \[CLS\]"):
        mp.load_adapter(ours_base("bert"), tmp_path / "bp")

    with pytest.raises(ValueError, match="pooler"):
        mp.save_adapter(mp.apply(ours_base("bert", n_classes=2), "lora"), tmp_path / "x", format="peft")
    bert_cls = transformers.BertForSequenceClassification.from_pretrained(folders["bert"], num_labels=2)
    peft_adapter(folders, tmp_path / "bc", "bert",
                 peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"), base=bert_cls)
    with pytest.raises(ValueError, match="pooler"):
        mp.load_adapter(ours_base("bert", n_classes=2), tmp_path / "bc")

    with pytest.raises(ValueError, match="DistilBertModel as past key values, which it does not take"):
        mp.save_adapter(mp.apply(ours_base("distilbert"), "prefix", length=4), tmp_path / "x", format="peft")
    peft_adapter(folders, tmp_path / "dp", "distilbert", peft.PrefixTuningConfig(
        num_virtual_tokens=4, token_dim=32, num_layers=2, num_attention_heads=4, task_type="FEATURE_EXTRACTION"))
    with pytest.raises(ValueError, match="prefix tuning on distilbert is not exchangeable with peft"):
        mp.load_adapter(ours_base("distilbert"), tmp_path / "dp")

    peft_adapter(folders, tmp_path / "pc", "llama", peft.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"),
                 classifier=True)
    with pytest.raises(ValueError, match="prompt tuning with a classifier .* last position, padding or not"):
        mp.load_adapter(ours_base("llama", n_classes=2), tmp_path / "pc")
    with pytest.raises(ValueError, match="prompt tuning with a classifier is not exchangeable"):
        mp.save_adapter(mp.apply(ours_base("llama", n_classes=2), "prompt", length=4), tmp_path / "x", format="peft")

    trained_head = train(mp.apply(ours_base("gpt2", n_classes=2), "lora"), ours_out)
    with pytest.raises(ValueError, match="score layer has no bias, but this classifier head's bias is non-zero"):
        mp.save_adapter(trained_head, tmp_path / "x", format="peft")
    with pytest.raises(ValueError, match="format='peft' writes lora, .*prefix, prompt.* adapters, not 'adapter'"):
        mp.save_adapter(mp.apply(ours_base("gpt2"), "adapter"), tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()  # nothing half-written

    peft_adapter(folders, tmp_path / "cls", "gpt2", peft.LoraConfig(target_modules=["c_attn"], task_type="SEQ_CLS"),
                 classifier=True)
    with pytest.raises(ValueError, match="load the base model with n_classes=2"):
        mp.load_adapter(ours_base("gpt2"), tmp_path / "cls")
    with pytest.raises(ValueError, match="already has method 'lora'; load a peft adapter into a fresh base"):
        mp.load_adapter(mp.apply(ours_base("gpt2", n_classes=2), "lora"), tmp_path / "cls")


def lower_rank(tensors):
    """Layer 0's q_proj LoRA cut from rank 4 to 2, which the config (r=4, no rank_pattern) does not say."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    tensors[key + "A.weight"] = tensors[key + "A.weight"][:2].contiguous()
    tensors[key + "B.weight"] = tensors[key + "B.weight"][:, :2].contiguous()


@pytest.mark.parametrize("config_edit, tensor_edit, message", [
    ({"r": 8}, None, "q_proj has rank 4 in its tensors but 8 in its config"),
    ({}, lower_rank, "layers.0.self_attn.q_proj has rank 2 in its tensors but 4 in its config"),
    ({"r": "4"}, None, "corrupt: r is '4', where peft writes an integer"),
    ({"lora_alpha": "8"}, None, "corrupt: lora_alpha is '8', where peft writes a number"),
    ({"use_rslora": "false"}, None, "corrupt: use_rslora is 'false', where peft writes true or false"),
    ({"alpha_pattern": ["q_proj"]}, None, r"corrupt: alpha_pattern is \['q_proj'\], where peft writes an object"),
], ids=["r-not-the-tensors", "a-module-of-another-rank", "r-string", "alpha-string", "rslora-string", "pattern-list"])
def test_malformed_peft_folders_are_refused(config_edit, tensor_edit, message, folders, ours_base, tmp_path):
    """A config that disagrees with its tensors (which peft refuses to load) or holds a field of another JSON type
    is refused with a ValueError naming the field: loaded, it would get a scale peft never computes."""
    path = peft_adapter(folders, tmp_path / "a", "llama",
                        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **config_edit}))
    if tensor_edit:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=message):
        mp.load_adapter(ours_base("llama"), path)


def test_a_users_method_gets_a_peft_hook_of_its_own(folders, ours_base, tmp_path):
    """The peft half of a method is registered beside it, by the method's name: a user's method (here LoRA
    under another name, with its own options) saves in peft's format once peft_format.register gives it a
    hook, and the file runs in peft as it does here. Hooks lacking peft's half, or a second hook for a name,
    are refused."""
    from minipeft.core.lora import LORA_OPTIONS, RSLORA, apply_lora, lora_parameter_count
    from minipeft.peft_format.lora import LoRAInPeft
    mp.register(mp.Method("my_lora", "LoRA under another name", apply_lora, lora_parameter_count,
                          LORA_OPTIONS + (RSLORA,)))
    try:
        model = train(mp.apply(ours_base("llama"), "my_lora", rank=2, alpha=4, targets="q,v"), ours_out)
        with pytest.raises(ValueError, match="format='peft' writes lora, .* adapters, not 'my_lora'"):
            mp.save_adapter(model, tmp_path / "a", format="peft")
        peft_format.register("my_lora", LoRAInPeft())
        mp.save_adapter(model, tmp_path / "a", format="peft")
        idx, mask = batch()
        with torch.no_grad():
            in_peft = peft.PeftModel.from_pretrained(theirs_base(folders, "llama"), tmp_path / "a").eval()
            assert max_diff(ours_out(model, idx, mask), theirs_out(in_peft, idx, mask), mask) < ATOL
        with pytest.raises(ValueError, match="has a peft hook already; pass replace=True"):
            peft_format.register("my_lora", LoRAInPeft())
        with pytest.raises(ValueError, match="lacks to_peft, from_peft"):
            peft_format.register("other", type("Half", (), {"peft_type": "LORA"})())
    finally:
        peft_format.HOOKS.pop("my_lora", None)
        mp.core.registry.METHODS.pop("my_lora")


def test_pickled_peft_adapter_is_refused(folders, ours_base, tmp_path):
    model = peft.get_peft_model(theirs_base(folders, "gpt2"), peft.LoraConfig(target_modules=["c_attn"]))
    model.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="adapter_model.bin is a pickle"):
        mp.load_adapter(ours_base("gpt2"), tmp_path / "a")
