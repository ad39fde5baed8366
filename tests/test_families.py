"""Every family against transformers (the reference, no mocks): tiny random models built with
transformers' own classes, saved with save_pretrained, loaded with from_pretrained; LM logits (decoders)
or hidden states (encoders) must agree within 1e-4, with and without right padding, with grouped-query
attention, untied heads, sliding windows shorter than the batch, soft-caps and head_dim != d / heads.

    python -m pytest tests/test_families.py -s -k matches_transformers    # prints each family's largest |Δ|

Also: KV-cache decoding equals recomputation (sliding windows included), what each switch changes,
the family table in model.py's docstring against FAMILIES, GGUF files of each GGUF architecture,
classifier checkpoints, sharded and .bin weights, tokenizers rebuilt from vocabulary files, and the
errors for bad input.
"""
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import minipeft as mp
from minipeft.core import families
from minipeft.core import model as model_module
from minipeft.formats.pretrained import HF_PREFIXES, from_pretrained, hf_module_names, read_hf_config
from minipeft.formats.tokenization import NoTokenizer, byte_tokenizer, bytes_to_unicode
from conftest import tiny_batch, tiny_model
from test_pretrained import gguf_writer, llama_cpp_permute, write_out

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()

V, PAD = 97, 0
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V,
             max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
DECODER = dict(SIZES, num_key_value_heads=2)
TWO_TYPES = ["sliding_attention", "full_attention"]


def rope(theta: float, rope_type: str = "default", **fields) -> dict:
    """A rope_parameters entry (transformers 5's layout of rope_theta and rope scaling)."""
    return {"rope_type": rope_type, "rope_theta": theta, **fields}


def hf_configs():
    """family -> (transformers config, model class): every family's switches on, sliding windows (4)
    shorter than the 12-token batch, GQA everywhere it exists, tied and untied heads both present. Every
    field minipeft reads from config.json is set to a value that is neither transformers' default nor
    minipeft's fallback for a missing field (norm eps, RoPE base and scaling, head_dim, activation, tied
    head, biases, windows and layer types, soft-caps, query scale), so parity fails if one is not read.
    Llama's RoPE scaling puts its rotation speeds in all three of llama3's regimes: kept (pair 0), blended
    (pairs 1 and 2) and slowed by the factor (the rest)."""
    t = transformers
    return {
        "gpt2": (t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, vocab_size=V,
                              pad_token_id=PAD, layer_norm_epsilon=1e-3, activation_function="silu",
                              tie_word_embeddings=False), t.GPT2LMHeadModel),
        "bert": (t.BertConfig(**SIZES, layer_norm_eps=1e-3, hidden_act="swish", type_vocab_size=3),
                 t.BertModel),
        "roberta": (t.RobertaConfig(**dict(SIZES, pad_token_id=2, max_position_embeddings=67), layer_norm_eps=2e-3,
                                    hidden_act="silu", type_vocab_size=1), t.RobertaModel),
        "distilbert": (t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V,
                                          max_position_embeddings=64, pad_token_id=PAD,
                                          activation="silu"), t.DistilBertModel),
        "llama": (t.LlamaConfig(**DECODER, rms_norm_eps=1e-3, head_dim=16, attention_bias=True, mlp_bias=True,
                                hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, rope_parameters=rope(
                                    500.0, "llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=32)), t.LlamaForCausalLM),
        "mistral": (t.MistralConfig(**DECODER, rms_norm_eps=2e-3, head_dim=16, sliding_window=4, hidden_act="gelu",
                                    tie_word_embeddings=True, rope_parameters=rope(300.0)), t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config(**DECODER, rms_norm_eps=3e-3, head_dim=16, tie_word_embeddings=True,
                                use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                hidden_act="gelu_pytorch_tanh", rope_parameters=rope(700.0, "linear", factor=3.0)),
                  t.Qwen2ForCausalLM),
        "qwen3": (t.Qwen3Config(**DECODER, rms_norm_eps=4e-3, head_dim=16, attention_bias=True, hidden_act="gelu",
                                tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                                max_window_layers=1, rope_parameters=rope(400.0)), t.Qwen3ForCausalLM),
        "phi3": (t.Phi3Config(**DECODER, rms_norm_eps=5e-3, head_dim=16, sliding_window=5, hidden_act="gelu",
                              tie_word_embeddings=True, rope_parameters=rope(600.0, partial_rotary_factor=0.5)),
                 t.Phi3ForCausalLM),
        "gemma": (t.GemmaConfig(**DECODER, rms_norm_eps=6e-3, head_dim=16, attention_bias=True, hidden_act="silu",
                                tie_word_embeddings=False, rope_parameters=rope(200.0)), t.GemmaForCausalLM),
        "gemma2": (t.Gemma2Config(**DECODER, rms_norm_eps=7e-3, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attention_bias=True,
                                  hidden_activation="gelu", layer_types=TWO_TYPES[::-1], tie_word_embeddings=False,
                                  rope_parameters=rope(250.0)), t.Gemma2ForCausalLM),
        "gemma3": (t.Gemma3TextConfig(**DECODER, rms_norm_eps=8e-3, head_dim=16, sliding_window=4,
                                      query_pre_attn_scalar=12, attn_logit_softcapping=6.0,
                                      final_logit_softcapping=4.0, attention_bias=True, hidden_activation="silu",
                                      layer_types=TWO_TYPES, tie_word_embeddings=False, rope_parameters={
                                          "full_attention": rope(100.0, "linear", factor=2.0),
                                          "sliding_attention": rope(50.0)}),
                   t.Gemma3ForCausalLM),
    }


ENCODERS = ("bert", "roberta", "distilbert")


QUERY_KEY = re.compile(r".*\.(q_proj|k_proj|query|key|q_lin|k_lin|c_attn|qkv_proj)\.weight")  # fused: v too


def perturbed(hf):
    """Random norm weights and biases too (transformers initialises them to 1 / 0 / 0, which would hide
    a (1 + w) or a missing bias), and query and key weights 20 times larger: at transformers' init the
    attention scores are near 0 and attention near uniform, so what acts on the scores alone (RoPE's base
    and scaling, the query scale, soft-caps) would hardly change an output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            if QUERY_KEY.fullmatch(name):
                p.mul_(20)
    return hf


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (transformers model in eval mode, its saved folder with a byte-level tokenizer.json)."""
    out = {}
    for family, (config, cls) in hf_configs().items():
        torch.manual_seed(0)
        hf = perturbed(cls(config)).eval()
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        byte_tokenizer().save(str(folder / "tokenizer.json"))
        out[family] = hf, folder
    return out


def batch(T=12):
    """(B, T) ids and a right-padded mask with rows of 12, 9 and 6 tokens; padding is PAD."""
    idx, mask = tiny_batch(vocab=V, T=T)
    return idx.clamp(min=3).masked_fill(mask == 0, PAD), mask


def outputs(family, hf, model, idx, mask):
    """(ours, theirs): hidden states for encoders, LM logits for decoders."""
    with torch.no_grad():
        if family in ENCODERS:
            return model.encode(idx, attention_mask=mask), hf(input_ids=idx, attention_mask=mask).last_hidden_state
        return model(idx, attention_mask=mask), hf(input_ids=idx, attention_mask=mask).logits


def largest_difference(family, hf, model) -> float:
    idx, mask = batch()
    diffs = []
    for attention_mask in (None, mask):
        ours, theirs = outputs(family, hf, model, idx, attention_mask)
        real = (attention_mask if attention_mask is not None else torch.ones_like(mask)).bool()
        diffs.append((ours[real] - theirs[real]).abs().max().item())
    return max(diffs)


@pytest.mark.parametrize("family", list(model_module.FAMILIES))
def test_family_matches_transformers(family, folders):
    hf, folder = folders[family]
    model, tokenizer = from_pretrained(folder)
    # the byte vocabulary (257), and the special tokens transformers' tokenizer class for the family adds to a
    # vocabulary that lacks them (BertTokenizer's [UNK], [SEP], [PAD], [CLS], [MASK]; GemmaTokenizer's <pad>, ...)
    assert model.cfg.flavor == family
    assert tokenizer.get_vocab_size() == len(transformers.AutoTokenizer.from_pretrained(folder))
    diff = largest_difference(family, hf, model)
    print(f"\n{family}: largest |difference| with and without right padding: {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_encoders_match_transformers_left_padded_at_every_position(family, folders):
    """Left padding (a user's batch; ours pad on the right): RoBERTa numbers the non-pad tokens only, and a
    padding query attends to the real tokens as in transformers, so position 0 of a left-padded row (what a
    [CLS] pooler reads there) is transformers' too. Also pad ids without a mask, which RoBERTa skips too."""
    hf, folder = folders[family]
    model, _ = from_pretrained(folder)
    idx, mask = batch()
    idx, mask = idx.flip(1), mask.flip(1)  # rows of 12, 9 and 6 tokens, right-aligned
    for attention_mask in (mask, None):
        ours, theirs = outputs(family, hf, model, idx, attention_mask)
        assert (ours - theirs).abs().max() < 1e-4, attention_mask


def test_a_gpt2_config_without_n_inner_has_a_feed_forward_four_times_n_embd(tmp_path):
    """GPT-2's own config.json has "n_inner": null (transformers then uses 4 · n_embd); the configs above
    all set it."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=V, pad_token_id=PAD)
    assert config.n_inner is None
    torch.manual_seed(0)
    hf = perturbed(transformers.GPT2LMHeadModel(config)).eval()
    hf.save_pretrained(tmp_path)
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model, _ = from_pretrained(tmp_path)
    assert model.cfg.d_ff == 128 and largest_difference("gpt2", hf, model) < 1e-4


def test_the_switches_are_read_from_each_config(folders):
    cfg = {family: from_pretrained(folder)[0].cfg for family, (_, folder) in folders.items()}
    assert cfg["roberta"].pos_offset == 3 and cfg["roberta"].max_seq_len == 64
    assert (cfg["gpt2"].norm_eps, cfg["gpt2"].act, cfg["gpt2"].d_ff, cfg["gpt2"].tie_embeddings) == (1e-3, "silu", 48, False)
    assert cfg["llama"].rope_scaling["rope_type"] == "llama3" and cfg["llama"].tie_embeddings
    assert (cfg["llama"].qkv_bias, cfg["llama"].o_bias, cfg["llama"].mlp_bias) == (True, True, True)
    assert (cfg["mistral"].sliding_window, cfg["mistral"].layer_pattern, cfg["mistral"].rope_theta) == (4, "S", 300)
    assert cfg["qwen2"].layer_pattern == "FS" and cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias
    assert (cfg["qwen3"].head_dim, cfg["qwen3"].rope_theta, cfg["qwen3"].norm_eps) == (16, 400, 4e-3)
    assert cfg["phi3"].rope_fraction == 0.5 and cfg["phi3"].sliding_window == 5
    assert (cfg["gemma"].act, cfg["gemma2"].act, cfg["gemma3"].act) == ("silu", "gelu", "silu")
    assert (cfg["gemma2"].attn_softcap, cfg["gemma2"].final_softcap, cfg["gemma2"].attn_scale) == (5.0, 3.0, 12)
    assert cfg["gemma2"].layer_pattern == "FS"
    assert (cfg["gemma3"].rope_theta, cfg["gemma3"].rope_local_theta, cfg["gemma3"].layer_pattern) == (100, 50, "SF")
    assert cfg["gemma3"].rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (cfg["gemma3"].attn_softcap, cfg["gemma3"].final_softcap) == (0, 4.0)  # transformers ignores the first


def test_older_gemma3_config_layout(folders, tmp_path):
    """Gemma 3's config.json as transformers 4 wrote it: rope_theta and rope_scaling (the full layers') at the
    top level, rope_local_base_freq (the sliding layers', unscaled) and sliding_window_pattern instead of
    layer_types. The same model as the transformers 5 layout, and the same logits as transformers'."""
    hf, folder = folders["gemma3"]
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"], config["layer_types"]
    config.update(rope_theta=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=50.0,
                  sliding_window_pattern=2)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = from_pretrained(tmp_path)
    assert (model.cfg.rope_theta, model.cfg.rope_local_theta, model.cfg.layer_pattern) == (100, 50, "SF")
    assert model.cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    reread = transformers.Gemma3TextConfig.from_pretrained(tmp_path)  # transformers reads it so too
    assert reread.rope_parameters == hf.config.rope_parameters and reread.layer_types == hf.config.layer_types
    assert largest_difference("gemma3", hf, model) < 1e-4


# config.json fields left out (transformers then takes its config class's default) -> our field holding it
LEFT_OUT = {"pad_token_id": "pad_token_id", "rms_norm_eps": "norm_eps", "sliding_window": "sliding_window",
            "query_pre_attn_scalar": "attn_scale", "attn_logit_softcapping": "attn_softcap",
            "final_logit_softcapping": "final_softcap", "use_sliding_window": None, "layer_types": None,
            "rope_parameters": None, "tie_word_embeddings": None}
EDITED_CONFIGS = [  # (family, fields left out of config.json, fields set in it)
    ("roberta", ["pad_token_id"], {}),  # positions start after RobertaConfig's pad id 1
    ("phi3", ["rms_norm_eps"], {}),  # 1e-5 for Phi-3, 1e-6 for the others
    ("mistral", ["sliding_window"], {}),
    ("qwen2", ["use_sliding_window", "layer_types"], {}),  # Qwen's window is off unless asked for
    ("gemma2", ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"], {}),
    ("gemma3", ["query_pre_attn_scalar", "sliding_window", "rope_parameters"], {}),  # sliding layers: local RoPE
    # fields a family's transformers class does not read: its biases are fixed, its layers all slide
    ("mistral", [], {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", [], {"attention_bias": False, "mlp_bias": True}),
    ("phi3", [], {"attention_bias": True, "mlp_bias": True, "layer_types": TWO_TYPES[::-1]}),
    ("gemma2", ["layer_types"], {"mlp_bias": True, "sliding_window_pattern": 3}),  # Gemma 3 reads the pattern
    # a tied head (GPT-2's and Gemma's default) where the checkpoint has its own: transformers keeps that one
    ("gpt2", ["tie_word_embeddings"], {}),
    ("gemma", ["tie_word_embeddings"], {}),
    ("gemma3", [], {"tie_word_embeddings": True}),
    ("bert", [], {"is_decoder": True}),  # causal attention
    ("roberta", [], {"is_decoder": True}),
]


@pytest.mark.parametrize("family, removed, added", EDITED_CONFIGS,
                         ids=[f"{family}-{'-'.join([*removed, *added])}" for family, removed, added in EDITED_CONFIGS])
def test_an_edited_config_loads_as_transformers_reads_it(family, removed, added, folders, tmp_path):
    """A config.json with fields left out (a file written by hand or an older tool) or set where our tiny
    models do not set them: the same logits as transformers' Auto class on the folder, and each field left
    out holds transformers' default (a default the 12-token batch cannot show, like a window of 4096)."""
    _, folder = folders[family]
    config = json.loads((folder / "config.json").read_text())
    for field in removed:
        del config[field]
    (tmp_path / "config.json").write_text(json.dumps({**config, **added}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    auto = transformers.AutoModel if family in ENCODERS else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(tmp_path).eval()
    model, _ = from_pretrained(tmp_path)
    for field in removed:
        if LEFT_OUT[field]:
            assert (getattr(model.cfg, LEFT_OUT[field]) or None) == getattr(hf.config, field), field
    assert largest_difference(family, hf, model) < 1e-4


def test_qwen_slides_from_layer_28_when_config_json_says_not_where(tmp_path):
    """Qwen2's sliding layers are those from max_window_layers on: 28 in transformers when config.json has
    neither it nor layer_types (too many layers to compare logits here; the pattern is the point)."""
    transformers.Qwen2Config(**dict(DECODER, num_hidden_layers=30), use_sliding_window=True,
                             sliding_window=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["max_window_layers"], config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).layer_types
    assert read_hf_config(tmp_path)[1]["layer_pattern"] == "".join(
        "S" if kind == "sliding_attention" else "F" for kind in theirs) == "F" * 28 + "SS"


def test_hf_module_names_are_transformers_modules(folders):
    """The rules peft_format.py names peft's modules with name real modules of every family."""
    for family, (hf, _) in folders.items():
        body = hf.get_submodule(HF_PREFIXES[family].rstrip(".")) if family not in ENCODERS else hf
        for ours, theirs in hf_module_names(family).items():
            owner = hf if ours == "head" else body
            assert isinstance(owner.get_submodule(theirs.format(i=1)), torch.nn.Module), (family, ours)
    phi3 = hf_module_names("phi3")
    assert [phi3[f"blocks.{{i}}.attn.{t}"] for t in "qkv"] == ["layers.{i}.self_attn.qkv_proj"] * 3
    assert list(phi3).index("blocks.{i}.mlp.gate") + 1 == list(phi3).index("blocks.{i}.mlp.up")  # gate rows first


# ---------------------------------------------------------------------------------------------
# what the switches do


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "phi3"])
def test_kv_cache_decoding_equals_recomputation_past_the_window(family):
    model = tiny_model(family).eval()
    idx, _ = tiny_batch(B=1, T=12)
    full = model(idx)
    cache = mp.KVCache(model.cfg.n_layer)
    steps = [model(idx[:, :3], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(3, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(idx[:, :2], 14), model.generate(idx[:, :2], 14, use_cache=False))


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_a_sliding_window_changes_logits_only_past_its_length(family):
    windowed = tiny_model(family).eval()
    full = tiny_model(family, sliding_window=64).eval()  # as long as the model: nothing falls out
    idx, _ = tiny_batch(B=1, T=12)
    w = windowed.cfg.sliding_window
    torch.testing.assert_close(windowed(idx)[:, :w], full(idx)[:, :w], atol=0, rtol=0)
    assert not torch.allclose(windowed(idx)[:, w:], full(idx)[:, w:])


def test_soft_caps_always_change_logits():
    capped = tiny_model("gemma2").eval()
    plain = tiny_model("gemma2", attn_softcap=0.0, final_softcap=0.0).eval()
    idx, _ = tiny_batch(B=1, T=3)
    ours, theirs = capped(idx), plain(idx)
    assert not torch.allclose(ours, theirs) and ours.abs().max() < 3.0  # final logits capped at 3
    no_attention_cap = tiny_model("gemma2", attn_softcap=0.0).eval()
    assert not torch.allclose(no_attention_cap(idx)[:, 1:], ours[:, 1:])  # the first token sees itself only


def test_the_rows_numbers_are_transformers_config_defaults():
    """What a row fixes beyond the checkpoint's config (soft-caps, the sliding/full layer pattern, Gemma 3's
    local RoPE base) is what transformers assumes for the family when a config leaves it out."""
    def pattern(layer_types):
        return "".join("S" if kind == "sliding_attention" else "F" for kind in layer_types)

    gemma2, gemma3 = transformers.Gemma2Config(), transformers.Gemma3TextConfig()
    row2, row3 = families.FAMILIES["gemma2"], families.FAMILIES["gemma3"]
    assert (row2["attn_softcap"], row2["final_softcap"]) == (gemma2.attn_logit_softcapping,
                                                             gemma2.final_logit_softcapping)
    assert row3["rope_local_theta"] == gemma3.rope_parameters["sliding_attention"]["rope_theta"]
    for row, config in ((row2, gemma2), (row3, gemma3)):
        n = len(config.layer_types)
        assert pattern(config.layer_types) == (row["layer_pattern"] * n)[:n]


def test_the_docstring_table_is_the_family_rows():
    """families.py's docstring tables (the lesson) say exactly what FAMILIES (the data) holds."""
    shown = {"yes": True, "-": None, "0": 0}
    rows = {}
    for line in families.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| family"):
            header = cells
        elif line.startswith("| ") and cells[0] in families.FAMILIES:
            rows.setdefault(cells[0], {}).update(zip(header[1:], cells[1:]))
    assert set(rows) == set(families.FAMILIES)
    for family, row in rows.items():
        for switch, text in row.items():
            value = families.FAMILIES[family][switch]
            expected = shown.get(text, text)
            if isinstance(value, bool) or value is None:
                assert (value or None) == expected, (family, switch)
            else:
                assert str(value).removesuffix(".0") == str(expected), (family, switch)


@pytest.mark.parametrize("kw, message", [
    (dict(flavor="t5"), "unknown flavor 't5'; choose one of gpt2, bert, roberta, distilbert, llama"),
    (dict(flavor="bert", sliding_window=4, layer_pattern="S"), "a sliding window needs causal attention"),
    (dict(flavor="gpt2", rope_fraction=0.5), "contradict learned positions"),
    (dict(flavor="llama", pos_offset=2), "pos_offset is for learned positions"),
    (dict(flavor="llama", norm="batchnorm"), "norm must be one of layernorm, rmsnorm, rmsnorm"),
    (dict(flavor="gemma3", layer_pattern="SX"), "layer_pattern is a string of S"),
    (dict(flavor="llama", rope_scaling={"rope_type": "yarn", "factor": 2}), "rope_scaling 'yarn' is not supported"),
    (dict(flavor="phi3", d_model=32, n_head=4, rope_fraction=0.375), "even number of rotated dimensions"),
    (dict(flavor="mistral", sliding_window=0, layer_pattern="S"), "sliding_window must be >= 1, not 0"),
    (dict(flavor="gemma2", attn_softcap=-1.0), "soft-caps must be positive"),
    (dict(flavor="bert", pool="max"), "pool must be 'cls' or 'mean', not 'max'"),
])
def test_contradictory_switches_are_one_sentence(kw, message):
    with pytest.raises(ValueError, match=message):
        mp.ModelConfig(**kw)


def test_the_smallest_settings_the_checks_allow_build():
    """The bounds themselves pass: a window of one token (each token sees itself), soft-caps of 0 (off)."""
    cfg = mp.ModelConfig(flavor="mistral", sliding_window=1, layer_pattern="S", attn_softcap=0.0, final_softcap=0.0)
    assert cfg.window(0) == 1


# ---------------------------------------------------------------------------------------------
# classifier checkpoints, sharded and .bin weights


@pytest.mark.parametrize("family, cls", [("qwen2", "Qwen2ForSequenceClassification"),
                                         ("gemma3", "Gemma3TextForSequenceClassification"),
                                         ("phi3", "Phi3ForSequenceClassification")])
def test_sequence_classification_checkpoint_loads_its_classifier(family, cls, folders, tmp_path):
    config = hf_configs()[family][0]
    config.num_labels = 3
    torch.manual_seed(0)
    hf = perturbed(getattr(transformers, cls)(config)).eval()
    hf.save_pretrained(tmp_path)
    model, _ = from_pretrained(tmp_path)
    assert model.cfg.n_classes == 3
    idx, mask = batch()
    with torch.no_grad():
        diff = (model(idx, attention_mask=mask) - hf(input_ids=idx, attention_mask=mask).logits).abs().max()
    print(f"\n{cls}: largest |class logit difference|, right-padded batch: {diff:.2e}")
    assert diff < 1e-4
    with pytest.raises(ValueError, match="its trained classifier has 3 classes, not n_classes=5"):
        from_pretrained(tmp_path, n_classes=5)  # another task: a fresh head is asked for by add_classifier
    assert model.add_classifier(5).head.weight.shape == (5, 32)


def test_sharded_safetensors_and_a_missing_shard(folders, tmp_path):
    hf, _ = folders["qwen3"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    model, tokenizer = from_pretrained(tmp_path / "sharded")
    assert isinstance(tokenizer, NoTokenizer) and not tokenizer  # no tokenizer files: loads anyway
    assert largest_difference("qwen3", hf, model) < 1e-4
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(ValueError, match=f"names shard\\(s\\) {re.escape(shards[-1])}, which the folder does not have"):
        from_pretrained(tmp_path / "sharded")


def test_pytorch_model_bin(folders, tmp_path):
    hf, _ = folders["gemma2"]
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert largest_difference("gemma2", hf, from_pretrained(tmp_path)[0]) < 1e-4


def test_unknown_model_type_lists_the_families(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type 't5' is not supported; supported: gpt2, bert, roberta, "
                                         "distilbert, llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text"):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# GGUF files of every GGUF architecture, written here from the tiny transformers models


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_tensors(hf, architecture):
    """llama.cpp's names for a transformers model's weights (Gemma 3: norms as 1 + w, its four norms; Llama: q
    and k rows as llama.cpp's RoPE pairs them, and Llama 3's RoPE scaling as each speed's divisor)."""
    sandwich = architecture == "gemma3"
    names = dict(GGUF_NAMES, post_attention_layernorm="post_attention_norm" if sandwich else "ffn_norm",
                 pre_feedforward_layernorm="ffn_norm", post_feedforward_layernorm="post_ffw_norm")
    tensors = {"token_embd.weight": hf.model.embed_tokens.weight, "output_norm.weight": hf.model.norm.weight}
    for key, value in hf.model.layers.state_dict().items():
        i, rest = key.split(".", 1)
        module, kind = rest.rsplit(".", 1)
        tensors[f"blk.{i}.{names[module]}.{kind}"] = value
    if not hf.config.tie_word_embeddings:
        tensors["output.weight"] = hf.lm_head.weight
    if architecture == "llama":
        c = hf.config
        for i in range(c.num_hidden_layers):
            for name, heads in (("attn_q", c.num_attention_heads), ("attn_k", c.num_key_value_heads)):
                tensors[f"blk.{i}.{name}.weight"] = llama_cpp_permute(tensors[f"blk.{i}.{name}.weight"], heads)
        if c.rope_parameters["rope_type"] == "llama3":  # transformers' own speeds, unscaled over scaled
            rotary = hf.model.rotary_emb
            tensors["rope_freqs.weight"] = type(rotary).compute_default_rope_parameters(c)[0] / rotary.inv_freq
    return {k: (v + 1 if sandwich and "norm" in k else v).detach().float().numpy() for k, v in tensors.items()}


def write_gguf(path, hf, architecture):
    c = hf.config
    writer = gguf_writer(path, architecture, c, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    if architecture == "gemma3":  # as llama.cpp's converter writes them: a flag per layer, true = sliding
        writer.add_sliding_window(c.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        writer.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([bytes_to_unicode()[b] for b in range(V)])
    for name, values in gguf_tensors(hf, architecture).items():
        writer.add_tensor(name, values)
    return write_out(writer, path)


LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)  # speeds kept (pair 0), blended (1, 2), slowed (the rest)
# Llama 3's scaling with other regimes: (high_freq_factor, original_max_position_embeddings), the wavelengths of
# heads of 16 at base 500 being 6.3, 13.4, 28.6, 61, ...; how many parameters give the same divisors varies
LLAMA3_REGIMES = {"llama": (4.0, 32),
                  "llama-one-blended": (2.0, 20),  # the slowed speeds bound the line through the blended one
                  "llama-one-blended-near-slow": (2.0, 15),  # the kept one bounds it
                  "llama-none-blended": (1.5, 12),  # pair 0 kept, the rest slowed
                  "llama-all-slowed": (4.0, 4),  # linear scaling
                  "llama-none-slowed": (4.0, 10 ** 6)}  # no scaling


@pytest.mark.parametrize("case", [*LLAMA3_REGIMES, "qwen2", "qwen3", "gemma3"])
def test_gguf_architectures_match_transformers(case, tmp_path):
    """Every metadata key minipeft reads holds a value that is neither transformers' default nor minipeft's
    fallback for a missing key (RoPE bases and scaling, norm eps, head_dim, Gemma 3's layer pattern and
    soft-cap). Llama 3's RoPE scaling comes as the divisor of each speed, in each of its regimes."""
    t, architecture = transformers, case.split("-")[0]
    high, original = LLAMA3_REGIMES.get(case, (4.0, 32))
    llama3 = dict(LLAMA3_ROPE, high_freq_factor=high, original_max_position_embeddings=original)
    config = {"llama": t.LlamaConfig(**DECODER, rms_norm_eps=1e-3, head_dim=16, tie_word_embeddings=False,
                                     rope_parameters=dict(llama3, rope_theta=500.0)),
              "qwen2": t.Qwen2Config(**DECODER, rms_norm_eps=2e-3, head_dim=16, rope_parameters=rope(300.0),
                                     tie_word_embeddings=False),
              "qwen3": t.Qwen3Config(**DECODER, rms_norm_eps=3e-3, head_dim=16, rope_parameters=rope(400.0),
                                     tie_word_embeddings=True),
              # llama.cpp scales Gemma 3's queries by head_dim^-0.5 (no metadata key): query_pre_attn_scalar = head_dim
              "gemma3": t.Gemma3TextConfig(**dict(DECODER, num_hidden_layers=3), rms_norm_eps=4e-3, head_dim=16,
                                           sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                           rope_parameters={"full_attention": rope(100.0, "linear", factor=3.0),
                                                            "sliding_attention": rope(50.0)})}[architecture]
    torch.manual_seed(0)
    cls = {"llama": t.LlamaForCausalLM, "qwen2": t.Qwen2ForCausalLM, "qwen3": t.Qwen3ForCausalLM,
           "gemma3": t.Gemma3ForCausalLM}[architecture]
    hf = perturbed(cls(config)).eval()
    model, _ = from_pretrained(write_gguf(tmp_path / f"{architecture}.gguf", hf, architecture))
    assert model.cfg.flavor == architecture
    if architecture == "gemma3":  # not the defaults (every sixth layer full, local RoPE base 10k, no soft-cap)
        assert (model.cfg.layer_pattern, model.cfg.rope_local_theta, model.cfg.final_softcap) == ("SSF", 50.0, 5.0)
        assert model.cfg.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    if case in ("llama", "llama-all-slowed", "llama-none-slowed"):  # the same parameters, or the same speeds'
        assert model.cfg.rope_scaling == {"llama": LLAMA3_ROPE, "llama-none-slowed": None,
                                          "llama-all-slowed": {"rope_type": "linear", "factor": 4.0}}[case]
    diff = largest_difference(architecture, hf, model)
    print(f"\n{case} GGUF (F32): largest |difference| with and without right padding: {diff:.2e}")
    assert diff < 1e-4


def test_gguf_of_an_architecture_we_do_not_have(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    write_out(writer, tmp_path / "mamba.gguf")
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported; supported: llama, qwen2, qwen3, "
                                         "gemma3"):
        from_pretrained(tmp_path / "mamba.gguf")


# ---------------------------------------------------------------------------------------------
# tokenizers from vocabulary files (no tokenizer.json)


TEXTS = ["The quick brown fox, 1234 times!", "naïve café — Zürich  and  spaces\n\nnew lines",
         "<s>special</s> tokens and ÜPPER case"]


def trained_bpe(tmp_path):
    """vocab.json + merges.txt of a small byte-level BPE trained on Hamlet (with RoBERTa's specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from minipeft.formats.assets import asset_path
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([asset_path("hamlet").read_text(encoding="utf-8")[:40_000]], trainer)
    tokenizer.model.save(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("family", ["gpt2", "roberta", "qwen2"])
def test_byte_level_bpe_from_vocab_files_matches_transformers(family, folders, tmp_path):
    hf, folder = folders[family]
    hf.save_pretrained(tmp_path)
    trained_bpe(tmp_path)
    _, ours = from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], (family, text)


def test_wordpiece_from_vocab_txt_matches_transformers(folders, tmp_path):
    from minipeft.formats.assets import asset_path
    hf, _ = folders["distilbert"]
    hf.save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((asset_path("minilm") / name).read_bytes())
    _, ours = from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(asset_path("minilm"))  # its own tokenizer.json
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text


def _tokenizer_files(files, tmp_path):
    """A folder with only the tokenizer's files: trained vocab.json + merges.txt ("bpe"), MiniLM's vocab.txt and
    tokenizer_config.json ("vocab.txt"), or MiniLM's tokenizer.json ("tokenizer.json"); and its settings."""
    from minipeft.formats.assets import asset_path
    if files == "bpe":
        trained_bpe(tmp_path)
        return {}
    name = "vocab.txt" if files == "vocab.txt" else "tokenizer.json"
    (tmp_path / name).write_bytes((asset_path("minilm") / name).read_bytes())
    return json.loads((asset_path("minilm") / "tokenizer_config.json").read_text()) if files == "vocab.txt" else {}


def _saved(content, **flags):  # a special token as transformers 4 wrote it into tokenizer_config.json
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, **flags}


@pytest.mark.parametrize("files, family, settings", [
    ("bpe", "gpt2", {"tokenizer_class": "GPT2Tokenizer"}),  # its <|endoftext|> is a special token
    ("bpe", "gpt2", {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True, "add_bos_token": True,
                     "add_eos_token": True, "bos_token": _saved("<s>"), "eos_token": "</s>"}),
    ("bpe", "gpt2", {"tokenizer_class": "GPT2Tokenizer", "pad_token": "<new>", "additional_special_tokens": ["<x>"]}),
    ("bpe", "roberta", {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": True}),
    ("bpe", "qwen2", {"tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": True, "add_bos_token": True}),
    ("vocab.txt", "bert", {"cls_token": _saved("[CLS]"), "additional_special_tokens": ["[unused1]"]}),
    ("tokenizer.json", "bert", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "[unused2]",
                                "extra_special_tokens": ["[unused1]"]}),
])
def test_tokenizer_config_settings_apply_as_in_transformers(files, family, settings, tmp_path):
    """tokenizer_config.json's special tokens (named, additional, written as AddedTokens), add_prefix_space
    and add_bos_token / add_eos_token, on a tokenizer rebuilt from vocabulary files or read from tokenizer.json."""
    from minipeft.formats.tokenization import folder_tokenizer
    settings = {**_tokenizer_files(files, tmp_path), **settings}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    ours = folder_tokenizer(tmp_path, family)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, "a<|endoftext|>b <new> <x>[unused1] [unused2]"]:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special).ids == \
                theirs(text, add_special_tokens=special)["input_ids"], (text, special)


def test_a_folder_without_tokenizer_loads_and_says_what_is_missing(folders, tmp_path):
    hf, _ = folders["llama"]
    hf.save_pretrained(tmp_path)
    model, tokenizer = from_pretrained(tmp_path)
    assert model(torch.tensor([[5, 6, 7]])).shape == (1, 3, V)
    with pytest.raises(ValueError, match="has no tokenizer \\(tokenizer.json, vocab.txt, or vocab.json"):
        tokenizer.encode("text")


# ---------------------------------------------------------------------------------------------
# every method on every family: the conformance suite's own checks (tests/test_methods.py) on each
# method's default options with the LM head, for the families the default suite leaves out (conftest
# FLAVORS; the full product runs under -m exhaustive)

import test_methods  # noqa: E402  (the conformance checks themselves, not copies)
from conftest import FLAVORS  # noqa: E402

CHECKS = ("test_output_equals_base_at_init", "test_trainable_count_matches_formula",
          "test_frozen_parameters_bit_identical_after_a_step", "test_save_load_roundtrip",
          "test_padded_batch_equals_rows_alone")
EVERY_METHOD = [pytest.param(method, family, id=f"{method}-{family}") for method in mp.METHODS
                for family in model_module.FAMILIES
                if family in mp.METHODS[method].flavors and family not in FLAVORS]


@pytest.mark.parametrize("method, family", EVERY_METHOD)
def test_every_method_works_on_every_family(method, family, tmp_path):
    test_methods.test_exactly_the_trainable_parameters_get_gradients(method, 0, family, "lm", "none")
    for check in CHECKS:
        if check == "test_save_load_roundtrip":
            test_methods.test_save_load_roundtrip(method, 0, family, "lm", tmp_path)
        elif check != "test_output_equals_base_at_init" or mp.METHODS[method].exact_at_init:
            getattr(test_methods, check)(method, 0, family, "lm")


@pytest.mark.parametrize("add_bos, add_eos", [(None, None), (False, True)])  # None: the key is not written
def test_gguf_sentencepiece_vocabulary_matches_llama_cpp_and_transformers(add_bos, add_eos, tmp_path):
    """A Llama 2 style GGUF vocabulary (tokenizer.ggml.model "llama": pieces with scores, <0x..> byte
    tokens, no merges): our rebuilt tokenizer gives llama.cpp's ids, <s> and </s> added where
    tokenizer.ggml.add_bos_token / add_eos_token say (<s> by default), and transformers' GGUF tokenizer's
    ids and decoded text. (transformers puts no ▁ before a text that starts with a space, nor before the
    text after a token matched whole (<s>x -> <s> x, not <s> ▁x), unlike llama.cpp and SentencePiece.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from minipeft.formats.assets import asset_path
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator([asset_path("hamlet").read_text(encoding="utf-8")[:30_000]],
                                trainers.BpeTrainer(vocab_size=700, show_progress=False))
    pieces = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *[p for p, _ in pieces]]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
        writer.add_add_eos_token(add_eos)
    writer.add_tensor("token_embd.weight", torch.zeros(len(tokens), 4).numpy())
    write_out(writer, tmp_path / "spm.gguf")
    from minipeft.formats.gguf_file import GGUFFile
    from minipeft.formats.tokenization import gguf_tokenizer
    ours = gguf_tokenizer(GGUFFile(tmp_path / "spm.gguf").metadata, tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in [*TEXTS[:2], "Ü ✓ 😀 tab\tend"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=True) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True)
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=str(tmp_path / "spm.gguf"), vocab_only=True, verbose=False)
    for text in [*TEXTS, " leading space", "  two", "<s>[INST] hi [/INST]</s>", ""]:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special).ids == \
                vocab.tokenize(text.encode(), add_bos=special, special=True), (text, special)


@pytest.mark.parametrize("pre, ends", [("gpt-2", {}), ("qwen2", {}), ("smollm", {"add_eos_token": True}),
                                       ("llama-bpe", {"add_bos_token": True})])
def test_gguf_byte_level_vocabulary_matches_llama_cpp(pre, ends, tmp_path):
    """A GGUF "gpt2" vocabulary (byte-level BPE, its merges, tokenizer.ggml.pre naming the split): our rebuilt
    tokenizer gives llama.cpp's ids, with the <s> / </s> that add_bos_token / add_eos_token ask for, <|im_start|>
    and the user-defined <tool> matched whole, and Llama 3's whole-token rule ("Ġzqxv" is a token its merges do
    not reach: llama-bpe takes it whole, the others spell it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    trained_bpe(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    tokens = [*sorted(vocab, key=vocab.get), "<|im_start|>", "<tool>", "Ġzqxv"]
    writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 5 + [1] * (len(tokens) - 8) + [3, 4, 1])  # control, normal, user-defined
    writer.add_token_merges([m for m in (tmp_path / "merges.txt").read_text().splitlines() if m and m[0] != "#"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    for key, value in ends.items():
        writer.add_bool(f"tokenizer.ggml.{key}", value)
    writer.add_tensor("token_embd.weight", torch.zeros(len(tokens), 4).numpy())
    write_out(writer, tmp_path / "bpe.gguf")
    from minipeft.formats.gguf_file import GGUFFile
    from minipeft.formats.tokenization import gguf_tokenizer
    ours = gguf_tokenizer(GGUFFile(tmp_path / "bpe.gguf").metadata, tmp_path / "bpe.gguf")
    theirs = llama_cpp.Llama(model_path=str(tmp_path / "bpe.gguf"), vocab_only=True, verbose=False)
    for text in [*TEXTS, "<|im_start|>user\nx  1, 12345 zqxv<tool>\r\n\n", ""]:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special).ids == \
                theirs.tokenize(text.encode(), add_bos=special, special=True), (text, special)
