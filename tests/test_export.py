"""mp.export, checked by the programs that load its files (no imitation of them):

- hf: transformers' own class for each family loads the folder; logits (decoders) or hidden states
  (encoders) within 1e-4 of minipeft's merged model, on a right-padded batch; decoder classifiers as
  …ForSequenceClassification; shards; SmolLM2 and Gemma 3 270M with their tokenizer and chat template.
- the check every export runs before it reports done, and the bad input it refuses.

    python -m pytest tests/test_export.py -s      # prints each family's largest |difference|
"""
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

import minipeft as mp
from minipeft.core.model import FAMILIES
from minipeft.exporters import check, hf as hf_writer
from minipeft.exporters.merged import base_weights
from minipeft.formats import chat
from minipeft.formats.assets import asset_path
from minipeft.formats.tokenization import byte_level_bpe, byte_tokenizer, bytes_to_unicode
from conftest import perturb_trainable, tiny_batch, tiny_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ENCODERS = ("bert", "roberta", "distilbert")
# what transformers' config of the family cannot hold: DistilBERT's epsilon is fixed, and Phi-3's head_dim is
# d_model / n_head (conftest's tiny phi3 sets 16 to test minipeft's own switches)
FAMILY_OVERRIDES = {"distilbert": dict(norm_eps=1e-12), "phi3": dict(head_dim=8)}


def tuned(flavor, n_classes=None, method="lora", config=None, **options):
    """A tiny model of the family (`config`: settings of its ModelConfig) with a trained-looking adapter
    (moved off its initialization)."""
    model = tiny_model(flavor, n_classes=n_classes, **{**FAMILY_OVERRIDES.get(flavor, {}), **(config or {})})
    mp.apply(model, method, **{**({"rank": 2, "targets": ["all"]} if method == "lora" else {}), **options})
    perturb_trainable(model)
    return model.eval()


def transformers_model(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def largest_difference(model, hf, flavor, n_classes=None) -> float:
    """max |minipeft − transformers| over the real tokens of a right-padded batch, and of the same rows
    unpadded (no token is the padding id then: RoBERTa derives positions from it)."""
    idx, mask = tiny_batch(vocab=model.cfg.vocab_size)
    runs = [(idx, mask)] if n_classes else [(idx.clamp(min=1), None), (idx, mask)]  # classifiers: the last real token
    diffs = []
    with torch.no_grad():
        for ids, attention_mask in runs:
            real = (attention_mask if attention_mask is not None else torch.ones_like(mask)).bool()
            theirs = hf(input_ids=ids, attention_mask=attention_mask)
            if flavor in ENCODERS:
                ours, theirs = model.encode(ids, attention_mask=attention_mask)[real], theirs.last_hidden_state[real]
            elif n_classes:
                ours, theirs = model(ids, attention_mask=attention_mask), theirs.logits
            else:
                ours, theirs = model(ids, attention_mask=attention_mask)[real], theirs.logits[real]
            diffs.append((ours - theirs).abs().max().item())
    return max(diffs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_export_of_every_family_runs_in_transformers(family, tmp_path):
    model = tuned(family)
    report = mp.export(model, tmp_path / "out", format="hf")
    assert report.check.largest_difference < 1e-5 and report.check.adapter_change > 1e-3
    hf = transformers_model(tmp_path / "out")
    diff = largest_difference(model, hf, family)
    print(f"\n{family}: {type(hf).__name__}, largest |difference| from minipeft's model: {diff:.2e}")
    assert diff < 1e-4
    pooling = ["1_Pooling"] if family in ENCODERS else []  # tiny encoders pool by the mean
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(["config.json", "generation_config.json", "model.safetensors", *pooling])
    hf.save_pretrained(tmp_path / "theirs")  # the names and shapes transformers itself writes for the model
    theirs = tensor_shapes(tmp_path / "theirs" / "model.safetensors")
    if family in ("bert", "roberta"):  # BertModel's pooler, which minipeft has no use for (it loads untrained)
        theirs = {name: shape for name, shape in theirs.items() if not name.startswith("pooler.")}
    assert tensor_shapes(tmp_path / "out" / "model.safetensors") == theirs


def tensor_shapes(path) -> dict[str, list[int]]:
    with safe_open(path, "pt") as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_a_decoder_classifier_exports_as_sequence_classification(family, tmp_path):
    model = tuned(family, n_classes=3)
    with torch.no_grad():
        model.head.bias.zero_()  # transformers' score layer has no bias
    report = mp.export(model, tmp_path / "out", format="hf")
    assert report.check.adapter_change > 0  # the fresh head counts as the method's: the base is still compared
    hf = transformers_model(tmp_path / "out")
    assert type(hf).__name__.endswith("ForSequenceClassification") and hf.config.num_labels == 3
    assert largest_difference(model, hf, family, n_classes=3) < 1e-4


@pytest.mark.parametrize("family, pooler, class_name", [
    ("bert", "dense_tanh", "BertForSequenceClassification"),
    ("roberta", "drop_dense_tanh", "RobertaForSequenceClassification"),
    ("distilbert", "dense_relu", "DistilBertForSequenceClassification"),
])
def test_a_fine_tuned_encoder_classifier_exports_as_sequence_classification(family, pooler, class_name, tmp_path):
    """An encoder classifier with its family's pooler (a fine-tuned checkpoint's) is that family's
    …ForSequenceClassification, with the same logits (it was refused), and reads back with its pooler."""
    model = tuned(family, n_classes=3, config=dict(pooler=pooler, pool="cls"))
    mp.export(model, tmp_path / "out", format="hf")
    hf = transformers_model(tmp_path / "out")
    assert type(hf).__name__ == class_name and hf.config.num_labels == 3
    idx, mask = tiny_batch(vocab=model.cfg.vocab_size)
    with torch.no_grad():
        assert (model(idx, attention_mask=mask) - hf(input_ids=idx, attention_mask=mask).logits).abs().max() < 1e-5
    assert mp.from_pretrained(tmp_path / "out")[0].cfg.pooler == pooler


def test_a_classifier_head_with_a_bias_or_on_an_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="score layer has no bias"):
        mp.export(tuned("llama", n_classes=2), tmp_path / "llama", format="hf")
    with pytest.raises(ValueError, match="bert classifier with pooler 'none' has no transformers class"):
        mp.export(tuned("bert", n_classes=2), tmp_path / "bert", format="hf")
    with pytest.raises(ValueError, match="bert classifier with pooler 'dense_relu' has no transformers class"):
        mp.export(tuned("bert", n_classes=2, config=dict(pooler="dense_relu", pool="cls")), tmp_path / "bert",
                  format="hf")
    assert not any(tmp_path.iterdir())  # nothing half-written stays


def test_large_exports_are_sharded_and_load(tmp_path):
    model = tuned("qwen3")
    report = mp.export(model, tmp_path / "out", format="hf", max_shard_bytes=20_000)
    shards = [f for f in report.files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in report.files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    nbytes = {}  # tensor -> its bytes, from the shard the index names
    for shard in shards:
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            nbytes.update({name: f.get_tensor(name).nbytes for name in f.keys()})
            assert all(index["weight_map"][name] == shard for name in f.keys())
    assert nbytes.keys() == index["weight_map"].keys() and index["metadata"]["total_size"] == sum(nbytes.values())
    in_order = [[n for n in index["weight_map"] if index["weight_map"][n] == shard] for shard in shards]  # as written
    for names, following in zip(in_order, in_order[1:]):  # each shard took tensors until the next did not fit
        size = sum(nbytes[n] for n in names)
        assert size <= 20_000 < size + nbytes[following[0]]
    assert sum(nbytes[n] for n in in_order[-1]) <= 20_000
    assert largest_difference(model, transformers_model(tmp_path / "out"), "qwen3") < 1e-4


def test_token_ids_the_model_does_not_record_come_from_its_tokenizer(tmp_path):
    tokenizer = byte_tokenizer()  # id 256 is <|endoftext|>: the end-of-text token, so the eos
    tokenizer.bos_token = "<|endoftext|>"  # and the bos, as a loader would record it
    model = tuned("llama", config=dict(vocab_size=tokenizer.get_vocab_size(), pad_token_id=256))
    assert "bos_token_id" not in model.cfg.extra and "eos_token_id" not in model.cfg.extra
    mp.export(model, tmp_path / "out", format="hf", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == generation["eos_token_id"] == 256
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.eos_token_id == theirs.pad_token_id == 256
    text = "Well , I 'm here . Are n't you ?"  # what clean_up_tokenization_spaces would rewrite
    assert theirs.decode(theirs(text)["input_ids"]) == tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.parametrize("dtype, held_in", [
    ("bf16", torch.float32), ("fp16", torch.float32),
    ("fp32", torch.bfloat16),  # a model cast by hand (not set_precision): checked within its own bf16 rounding
])
def test_an_export_holds_the_dtype_asked_for(dtype, held_in, tmp_path):
    model = tuned("llama").to(held_in)
    report = mp.export(model, tmp_path / "out", format="hf", dtype=dtype)
    hf = transformers_model(tmp_path / "out")
    assert hf.config.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert report.check.largest_difference < 0.1 * report.check.scale


@pytest.mark.parametrize("method", ["dora", "ia3", "vera", "loha", "lokr"])
def test_every_mergeable_method_exports_merged(method, tmp_path):
    model = tuned("llama", method=method)
    mp.export(model, tmp_path / "out", format="hf")
    assert largest_difference(model, transformers_model(tmp_path / "out"), "llama") < 1e-4


def test_a_model_merged_in_memory_exports_as_before_and_is_still_checked_against_its_base(tmp_path):
    model = tuned("llama")
    unmerged = mp.export(model, tmp_path / "unmerged", format="hf")
    mp.merge(model)
    merged = mp.export(model, tmp_path / "merged", format="hf")
    assert merged.check.adapter_change == pytest.approx(unmerged.check.adapter_change, rel=1e-4)
    assert largest_difference(model, transformers_model(tmp_path / "merged"), "llama") < 1e-4


@pytest.mark.parametrize("family, method, n_classes, frozen", [
    ("gpt2", "bitfit", None, False),  # the biases of the base itself train: no copy of the base is kept
    ("llama", "head", None, False),  # an untied LM head is the base's own
    ("llama", "head", 2, False),  # a fresh classifier head alone: no base model to compare with
    ("llama", "full", None, True),  # trained, then frozen for serving: still no base kept
])
def test_a_method_that_trains_base_parameters_exports_without_a_base_to_compare(family, method, n_classes, frozen,
                                                                                tmp_path):
    model = tuned(family, n_classes=n_classes, method=method)
    if n_classes:
        with torch.no_grad():
            model.head.bias.zero_()
    if frozen:
        model.requires_grad_(False)
    report = mp.export(model, tmp_path / "out", format="hf")
    assert report.check.adapter_change is None
    assert largest_difference(model, transformers_model(tmp_path / "out"), family, n_classes) < 1e-4
    with pytest.raises(ValueError, match=f"{method} trains the base model's own parameters, which a peft adapter"):
        mp.export(model, tmp_path / "peft", format="peft")


def test_a_method_no_weight_can_hold_is_refused_naming_the_formats_that_can(tmp_path):
    with pytest.raises(ValueError, match="prefix adds modules of its own .* format 'peft'"):
        mp.export(tuned("llama", method="prefix"), tmp_path / "prefix", format="hf")
    with pytest.raises(ValueError, match="adapter adds modules .* no other format has this method"):
        mp.export(tuned("llama", method="adapter"), tmp_path / "adapter", format="hf")


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="llama.cpp's llama applies RoPE to whole heads, and this model to 0.5 of "
                                         "each; format 'gguf' cannot hold it"):
        mp.export(tuned("llama", config=dict(rope_fraction=0.5, rope_scaling=None)), tmp_path / "a", format="gguf")
    with pytest.raises(ValueError, match="llama.cpp's gemma3 needs layers with a sliding window .* and this model has "
                                         "none; format 'gguf' cannot hold it, format 'hf' can"):
        mp.export(tuned("gemma3", config=dict(layer_pattern="F", rope_scaling=None)), tmp_path / "b", format="gguf")
    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"Ġt": 256}
    tokenizer = byte_level_bpe(vocab, [("Ġ", "t")])  # llama.cpp's vocabulary needs merges
    for family, settings, message in [
            ("qwen2", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
             "llama.cpp reads Llama 3's RoPE scaling in llama files only, and this is a qwen2 model"),
            ("gemma3", dict(rope_scaling=None), "llama.cpp scales Gemma 3's attention by head_dim\\^-0.5, and this "
                                                "model by 12.0\\^-0.5"),
            ("qwen2", dict(final_softcap=3.0), "a GGUF qwen2 file cannot hold final_softcap=3.0")]:
        with pytest.raises(ValueError, match=message):
            mp.export(tuned(family, config=dict(settings, vocab_size=257)), tmp_path / family, format="gguf",
                      tokenizer=tokenizer)
    # a split regex of which the export knows no llama.cpp name (Llama 3's is one)
    other_split = byte_level_bpe(vocab, [("Ġ", "t")], split=r"\p{N}{1,3}| ?\p{L}+|\s+")
    with pytest.raises(ValueError, match="the tokenizer's pre-tokenizer is not one llama.cpp names"):
        mp.export(tuned("qwen2", config=dict(vocab_size=257)), tmp_path / "split", format="gguf",
                  tokenizer=other_split)
    assert not any(tmp_path.iterdir())


def test_gguf_lora_refuses_what_llama_cpps_lora_cannot_apply(tmp_path):
    refused = [(tuned("gpt2"), "format 'gguf-lora' holds llama, qwen2, qwen3, gemma3 models .* not gpt2; export it "
                               "with format 'hf'"),
               (tuned("llama", method="dora"), "format 'gguf-lora' holds LoRA and QLoRA adapters .* not dora; export "
                                               "the merged model with format 'gguf'"),
               (tuned("llama", init="pissa"), "a pissa LoRA rewrote the base weights it sits on"),
               (tuned("llama", n_classes=2), "this one has a classifier head; format 'gguf-lora' cannot hold it"),
               (tuned("qwen2", config=dict(rope_fraction=0.5)), "llama.cpp's qwen2 applies RoPE to whole heads, and "
                                                               "this model to 0.5 of each; format 'gguf-lora' cannot")]
    for i, (model, message) in enumerate(refused):
        with pytest.raises(ValueError, match=message):
            mp.export(model, tmp_path / str(i), format="gguf-lora")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options", [{}, {"rslora": True, "targets": ["q", "v"]}])
def test_a_gguf_lora_export_read_back_is_the_model_in_memory(options, tmp_path):
    """The file's pairs, mapped onto a plain base and applied as a LoRA of the file's α (with rsLoRA: s·r),
    give the model's logits; llama.cpp itself runs it in test_export_llama_cpp.py."""
    model = tuned("llama", **options)
    report = mp.export(model, tmp_path / "out", format="gguf-lora")
    assert set(report.files) == {"adapter.gguf", "Modelfile"}
    assert report.check.largest_difference < 1e-5 and report.check.adapter_change > 1e-3


def test_the_check_holds_an_export_to_the_model_within_the_rounding_of_its_dtype():
    """check.compare's rules on logits made up to sit either side of each bound (largest logit 4):
    max |reloaded − memory| ≤ TOLERANCES[dtype] · 4, where the wider of the dtype written and the precision
    trained in counts; an update the rounding took away, and one that changes nothing, are refused."""
    memory = [torch.tensor([[1.0, -4.0, 2.0], [1.0, 1.05, -1.0]], dtype=torch.float64)]  # one probe, two positions
    base = [memory[0] - 0.3]

    def compare(difference, dtype, precision="fp32", base=base):
        """reloaded = memory with `difference` added to one logit (a number) or to all (a tensor)."""
        if not torch.is_tensor(difference):
            difference, shift = torch.zeros_like(memory[0]), difference
            difference[0, 2] = shift
        return check.compare(["probe"], [memory[0] + difference], memory, base, dtype, precision)

    passed = compare(3e-4, "fp32")
    assert (passed.largest_difference, passed.scale, passed.argmax_agreement) == (pytest.approx(3e-4), 4.0, 1.0)
    assert passed.adapter_change == pytest.approx(0.3) and "the adapter changes them by up to 0.3" in str(passed)
    for dtype, allowed, refused in (("fp32", 3e-4, 5e-4), ("fp16", 0.07, 0.09), ("bf16", 0.35, 0.45),
                                    ("q8_0", 0.35, 0.45)):
        compare(allowed, dtype)
        with pytest.raises(ValueError, match="the export, read back, does not compute the model in memory"):
            compare(refused, dtype)
    compare(0.07, "fp32", precision="fp16-mixed")  # trained in fp16: its rounding is allowed in an fp32 file
    flipped = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]], dtype=torch.float64)  # position 2: 1.1 > 1.05
    assert compare(flipped, "bf16").argmax_agreement == 0.5
    with pytest.raises(ValueError, match="the adapter's change is lost in the rounding"):
        compare(base[0] - memory[0], "bf16")  # the file holds the base: within bf16's bound, no nearer the model
    with pytest.raises(ValueError, match="leaves its logits equal to the base model's"):
        compare(0.0, "fp32", base=memory)
    without_base = compare(0.0, "fp32", base=None)
    assert without_base.adapter_change is None and "adapter" not in str(without_base)
    with pytest.raises(ValueError, match="the export, read back, computes nan or inf logits on 'probe': a weight"):
        compare(float("nan"), "fp16")  # nan passed every bound: no comparison with it is true
    with pytest.raises(ValueError, match="the model in memory computes nan or inf logits on 'probe': its weights"):
        check.compare(["probe"], memory, [memory[0] * float("nan")], None, "fp32", "fp32")


def test_a_weight_beyond_fp16_is_named_not_written_as_inf(tmp_path):
    model = tuned("llama")
    with torch.no_grad():
        model.blocks[0].ln1.weight[0] = 1e5  # fp16 holds at most 65504
    with pytest.raises(ValueError, match=r"model.layers.0.input_layernorm.weight holds 1e\+05, beyond fp16's largest "
                                         "value 65504, so the file would hold inf; export in bf16 or fp32"):
        mp.export(model, tmp_path / "out", format="hf", dtype="fp16")
    assert not any(tmp_path.iterdir())
    mp.export(model, tmp_path / "bf16", format="hf", dtype="bf16")


@pytest.mark.parametrize("dtype, lost", [("bf16", "blocks.0.mlp.down"), ("bf16", "blocks.1.attn.q"),
                                         ("fp16", "blocks.1.attn.q")])
def test_files_that_lose_a_layers_update_are_refused_in_any_dtype(dtype, lost, tmp_path, monkeypatch):
    """A writer that drops one layer's update (made up here) stays within a half dtype's bound of the model
    in memory, and nearer it than the base; the files are checked against the merged weights they should hold."""
    model = tuned("llama")
    base, write = base_weights(model), hf_writer.hf_tensors
    monkeypatch.setattr(hf_writer, "hf_tensors", lambda cfg, weights: write(cfg, {**weights, f"{lost}.weight":
                                                                            base[f"{lost}.weight"]}))
    with pytest.raises(ValueError, match="the files, read back, do not hold the merged weights written"):
        mp.export(model, tmp_path / "out", format="hf", dtype=dtype)
    assert not any(tmp_path.iterdir())


def test_a_model_left_in_training_mode_with_dropout_is_checked_without_it(tmp_path):
    model = tuned("llama", dropout=0.5).train()  # LoRA's dropout: training-mode logits would differ every call
    report = mp.export(model, tmp_path / "out", format="hf")
    assert model.training and report.check.largest_difference < 1e-4
    batch = check.probes(model, None)  # no tokenizer: seeded random ids, one right-padded batch
    assert [len(logits) for logits in check.logits_on(model, batch)] == batch.mask.sum(1).tolist() == [12, 14, 16]


def test_an_untrained_adapter_is_an_error_not_a_file(tmp_path):
    model = tiny_model("llama")
    mp.apply(model, "lora")  # B = 0: the model is its base
    with pytest.raises(ValueError, match="leaves its logits equal to the base model's"):
        mp.export(model, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("family, n_classes, settings", [
    ("gemma2", None, dict(attn_scale=None, attn_softcap=None, final_softcap=None)),  # head_dim, no caps
    ("gemma2", None, dict(attn_softcap=0.0, final_softcap=0.0)),  # 0: off
    ("gemma2", None, dict(layer_pattern="F", sliding_window=None)),  # Gemma's configs need a window all the same
    ("gemma3", None, dict(layer_pattern="F")),
    ("mistral", None, dict(sliding_window=None, rope_local_theta=100.0)),  # no sliding layer uses it
    ("llama", 3, dict(pool="cls")),  # a decoder classifier reads the last token, whatever pool says
])
def test_settings_that_change_nothing_or_that_the_config_holds_export(family, n_classes, settings, tmp_path):
    model = tuned(family, n_classes=n_classes, config=settings)
    if n_classes:
        with torch.no_grad():
            model.head.bias.zero_()
    mp.export(model, tmp_path / "out", format="hf")
    assert largest_difference(model, transformers_model(tmp_path / "out"), family, n_classes) < 1e-4


@pytest.mark.parametrize("family, settings, lost", [
    ("llama", dict(sliding_window=4, layer_pattern="S"), "windows=[4, 4]"),  # transformers' Llama has no window
    ("llama", dict(rope_fraction=0.5), "rope_fraction=0.5"),  # partial RoPE: Phi-3's attention only
    ("qwen2", dict(rope_fraction=0.5), "rope_fraction=0.5"),
    ("mistral", dict(rope_local_theta=100.0), "rope_local_theta=100.0"),  # its sliding layers would use it
    ("gemma2", dict(rope_local_theta=100.0), "rope_local_theta=100.0"),
    ("llama", dict(attn_scale=12.0), "attn_scale=12.0"),
    ("llama", dict(final_softcap=3.0), "final_softcap=3.0"),
])
def test_settings_the_family_config_cannot_hold_are_named(family, settings, lost, tmp_path):
    with pytest.raises(ValueError, match=f"a {family} config.json cannot hold {re.escape(lost)} "):
        mp.export(tuned(family, config=settings), tmp_path / "out", format="hf")
    assert not any(tmp_path.iterdir())


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    model = tuned("llama")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists; give a new folder"):
        mp.export(model, tmp_path / "taken", format="hf")
    with pytest.raises(ValueError, match=r"format 'hf' takes dtype fp32, bf16, fp16, not 'q8_0' \(formats that take "
                                         r"q8_0: gguf, gguf-lora\)"):
        mp.export(model, tmp_path / "out", format="hf", dtype="q8_0")
    with pytest.raises(ValueError, match="unknown export format 'onnx'; choose one of hf, gguf, gguf-lora, peft"):
        mp.export(model, tmp_path / "out", format="onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


@pytest.mark.parametrize("options, message", [
    (dict(max_shard_bytes="2GB"), "max_shard_bytes must be a whole number of bytes >= 1, not '2GB'"),
    (dict(max_shard_bytes=0), "max_shard_bytes must be a whole number of bytes >= 1, not 0"),
    (dict(tokenizer="gpt2"), "tokenizer must be the tokenizers.Tokenizer that mp.from_pretrained returned with the "
                             "model, not a str"),
    (dict(chat_template="chat.jinja"), "a chat_template is written with the tokenizer, and this export writes none"),
    (dict(format="peft", tokenizer="bytes", chat_template="chat.jinja"), "a chat_template is written with the"),
    (dict(tokenizer="bytes", chat_template="chat.jinja"), "chat_template chat.jinja: no such file; give a jinja2"),
    (dict(name="a"), "this model has no adapters loaded by name, so none is called 'a'; leave name out"),
    (dict(tokenizer="bytes"), r"the tokenizer gives token id \d+, past the model's 97 embeddings, so it is not this"),
])
def test_export_options_it_cannot_use_are_refused_in_one_sentence(options, message, tmp_path):
    """Each was a TypeError, AttributeError or IndexError, an option silently dropped, or (a missing template
    file) a message about a full disk."""
    if options.get("tokenizer") == "bytes":
        options["tokenizer"] = byte_tokenizer()  # 257 tokens: another model's (this one has 97)
    with pytest.raises(ValueError, match=message):
        mp.export(tuned("llama"), tmp_path / "out", **options)
    assert not any(tmp_path.iterdir())


def test_an_adapter_loaded_by_name_exports_as_if_alone(tmp_path):
    """name= picks one of the adapters side by side (default: the active one); the others and the active
    choice stay as they were."""
    alone = {n: tuned("llama", method=m) for n, m in (("a", "lora"), ("d", "dora"))}
    model = tiny_model("llama", **FAMILY_OVERRIDES.get("llama", {}))
    for n, single in alone.items():
        mp.save_adapter(single, tmp_path / n)
        mp.load_adapter(model, tmp_path / n, name=n)
    idx, mask = tiny_batch()
    mp.export(model, tmp_path / "d-out", format="hf", name="d")
    mp.export(model, tmp_path / "active-out", format="hf")
    for folder, n in (("d-out", "d"), ("active-out", "a")):
        exported = mp.from_pretrained(tmp_path / folder)[0].eval()
        torch.testing.assert_close(exported(idx, attention_mask=mask), alone[n](idx, attention_mask=mask),
                                   atol=1e-5, rtol=0)
    assert model.adapters.active == "a"
    for name in ("", "b"):  # "" named no adapter and exported the active one
        with pytest.raises(ValueError, match=f"unknown adapter '{name}'; loaded: a, d"):
            mp.export(model, tmp_path / "out", format="hf", name=name)
    assert not (tmp_path / "out").exists()


def test_the_model_in_memory_is_not_touched(tmp_path):
    model = tuned("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mp.export(model, tmp_path / "out", format="hf")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(getattr(m, "merged", False) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# the real models


@pytest.fixture(scope="module")
def smollm2_lora():
    model, tokenizer = mp.from_pretrained("smollm2")
    mp.apply(model, "lora", rank=8, targets=["all"])
    perturb_trainable(model, seed=5)
    return model.eval(), tokenizer


def real_model_parity(model, tokenizer, folder, text) -> tuple[float, float]:
    """transformers on the export against (minipeft's merged model, the model in memory, unmerged): the
    largest |logit difference| from each; and its tokenizer and chat template give ours."""
    hf = transformers_model(folder)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Is this review positive? 'A delight.'"}]
    ids = tokenizer.encode(text).ids
    assert theirs_tok(text)["input_ids"] == ids
    # every named special token the loader read (bos, eos, unk, pad), as transformers reads the source (test_chat.py)
    assert theirs_tok.special_tokens_map == {name: token for name, token in chat.special_tokens(tokenizer).items()
                                             if token}
    assert theirs_tok.pad_token_id == model.cfg.pad_token_id  # batches pad as the model was trained
    assert theirs_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        mp.apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=False)
    merged, _ = mp.from_pretrained(folder)  # minipeft's merged model: the export read back
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
        return tuple((ours(torch.tensor([ids])) - theirs).abs().max().item() for ours in (merged, model))


HAMLET_LINE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def test_smollm2_with_lora_exports_to_transformers(smollm2_lora, tmp_path):
    model, tokenizer = smollm2_lora
    report = mp.export(model, tmp_path / "out", format="hf", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 2
    merged, memory = real_model_parity(model, tokenizer, tmp_path / "out", HAMLET_LINE)
    print(f"\nSmolLM2 + LoRA, hf export in transformers: largest |difference| from minipeft's merged model "
          f"{merged:.2e}, from the unmerged one in memory {memory:.2e}; check: {report.check}")
    assert merged < 1e-4 and memory < 1e-3


def test_gemma3_270m_with_lora_exports_to_transformers(tmp_path):
    model, tokenizer = mp.from_pretrained("gemma3-270m")
    mp.apply(model, "lora", rank=4, targets=["q", "v", "down"])
    perturb_trainable(model, seed=5)
    report = mp.export(model, tmp_path / "out", format="hf", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    merged, memory = real_model_parity(model, tokenizer, tmp_path / "out", HAMLET_LINE)
    print(f"\nGemma 3 270M + LoRA, hf export in transformers: largest |difference| from minipeft's merged model "
          f"{merged:.2e}, from the unmerged one in memory {memory:.2e}; check: {report.check}")
    assert merged < 1e-4 and memory < 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi3"])  # GPT-2's and Phi-3's fused q, k, v too
def test_the_peft_export_runs_in_peft_on_the_hf_export_of_its_base(family, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model(family, **FAMILY_OVERRIDES.get(family, {}))
    mp.export(base, tmp_path / "base", format="hf")  # the base alone: nothing to merge
    model = tuned(family)  # the same base (same seed) with a LoRA
    report = mp.export(model, tmp_path / "peft", format="peft")
    assert report.check.largest_difference < 1e-5
    hf = peft.PeftModel.from_pretrained(transformers_model(tmp_path / "base"), tmp_path / "peft").eval()
    diff = largest_difference(model, hf, family)
    print(f"\n{family}: peft on transformers' model of the hf export, largest |difference| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_lora_that_rewrote_its_base_exports_merged_as_peft_merges_it(init, tmp_path):
    """peft, given the adapter and the original base, recomputes the residual and merges: the hf export gives
    its logits. The peft export cannot be checked on the residual base the model holds: refused, not failed."""
    peft = pytest.importorskip("peft")
    mp.export(tiny_model("llama"), tmp_path / "base", format="hf")  # the original base, before the residual
    model = tuned("llama", init=init)
    mp.export(model, tmp_path / "merged", format="hf")
    mp.save_adapter(model, tmp_path / "adapter", format="peft")
    theirs = peft.PeftModel.from_pretrained(transformers_model(tmp_path / "base"), tmp_path / "adapter")
    ours, theirs = transformers_model(tmp_path / "merged"), theirs.merge_and_unload().eval()
    idx, mask = tiny_batch()
    with torch.no_grad():
        assert (ours(idx, attention_mask=mask).logits - theirs(idx, attention_mask=mask).logits).abs().max() < 1e-5
    with pytest.raises(ValueError, match=f"this {init} LoRA rewrote the base weights it sits on, .* save it "
                                         "unchecked with mp.save_adapter"):
        mp.export(model, tmp_path / "peft", format="peft")


def test_the_peft_export_of_a_named_model_names_its_hub_id(smollm2_lora, tmp_path):
    model, tokenizer = smollm2_lora
    mp.export(model, tmp_path / "out", format="peft", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_qlora_model_exports_merged_in_full_precision(tmp_path):
    model = tuned("llama", method="qlora", rank=2, targets=["all"])  # LoRA on an NF4 base
    report = mp.export(model, tmp_path / "out", format="hf")
    assert report.check.largest_difference < 1e-5  # dequantize(W) + ΔW, written in fp32
    assert largest_difference(model, transformers_model(tmp_path / "out"), "llama") < 1e-4


def test_the_requantization_report_shows_how_much_of_the_update_survives_4_bits():
    from minipeft.exporters.merged import requantization_report
    model = tuned("llama", method="qlora", rank=2, targets=["q", "v"])
    large = dict(requantization_report(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.mul_(1e-3)  # an update far below one step of the 4-bit grid
    small = dict(requantization_report(model))
    assert sorted(large) == [f"blocks.{i}.attn.{t}" for i in (0, 1) for t in "qv"]
    assert all(0.8 < r < 1.2 for r in large.values()) and all(r < 0.5 for r in small.values())


# ---------------------------------------------------------------------------------------------
# export.py


ROOT = Path(__file__).resolve().parent.parent


def export_py(*args, cwd, limit_file_size=None):
    def limited():  # a disk that fills: writes past the limit fail with "File too large"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, preexec_fn=limited if limit_file_size else None)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny-llama LoRA saved as a training run saves it (run/adapter), and a tiny-gpt2 one."""
    folder = tmp_path_factory.mktemp("adapters")
    for name, run in (("tiny-llama", folder / "run" / "adapter"), ("tiny-gpt2", folder / "gpt2")):
        model, _ = mp.from_pretrained(name)
        mp.apply(model, "lora", targets=["all"])
        perturb_trainable(model)
        mp.save_adapter(model, run)
    return folder


def test_export_py_exports_a_run_folder_against_the_base_its_adapter_records(adapters, tmp_path):
    result = export_py("--adapter", adapters / "run", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exported hf (fp32)" in result.stdout and "checked: largest |logit difference|" in result.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny-llama", "--adapter", "gpt2"], "was trained on another base model"),
    (["--model", "tiny-gpt2", "--adapter", "gpt2", "--format", "gguf"],
     "format 'gguf' holds llama, qwen2, qwen3, gemma3 models .* not gpt2; export it with format 'hf'"),
    (["--adapter", "run", "--format", "peft", "--dtype", "bf16"], "format 'peft' takes dtype fp32, not 'bf16'"),
    (["--adapter", "run", "--format", "gguf-lora", "--dtype", "q4_0"], "invalid choice: 'q4_0'"),
])
def test_export_py_refuses_bad_input_in_one_sentence(adapters, args, message, tmp_path):
    result = export_py(*args, "--out", tmp_path / "out", cwd=adapters)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr
    assert not (tmp_path / "out").exists()


def test_export_py_refuses_an_existing_out_before_loading(adapters, tmp_path):
    (tmp_path / "out").mkdir()
    result = export_py("--adapter", adapters / "run", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'out'} exists; give a new " \
                                                                  "folder (an export never overwrites)"


def test_a_disk_that_fills_during_the_write_leaves_nothing_behind(adapters, tmp_path):
    result = export_py("--adapter", adapters / "run", "--out", tmp_path / "out", cwd=tmp_path,
                       limit_file_size=100_000)  # the weights take 0.5 MB
    assert result.returncode == 2, result.stderr
    assert "failed" in result.stderr and "File too large" in result.stderr and "nothing was kept" in result.stderr
    assert not any(tmp_path.iterdir())


def test_minilm_from_its_hf_folder_exports_to_transformers(tmp_path):
    model, tokenizer = mp.from_pretrained("minilm")
    mp.apply(model, "lora", rank=4, targets=["q", "v", "up"])
    perturb_trainable(model, seed=5)
    mp.export(model, tmp_path / "out", format="hf", tokenizer=tokenizer)
    pooling = json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())
    source = json.loads((asset_path("minilm") / "1_Pooling" / "config.json").read_text())  # sentence-transformers'
    assert pooling["pooling_mode_mean_tokens"] and pooling == {key: source[key] for key in pooling}
    hf = transformers_model(tmp_path / "out")
    text = "A gripping, beautifully shot film; the ending falls flat."
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    encoded = theirs(text, return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == tokenizer.encode(text).ids
    # [CLS], [SEP], [MASK], ... as transformers names them in the source folder (a fill-mask pipeline needs them),
    # and a pair's token types (0 for the first text, 1 for the second), which BertModel would otherwise take as 0s
    original = transformers.AutoTokenizer.from_pretrained(asset_path("minilm"))
    assert theirs.special_tokens_map == original.special_tokens_map
    assert theirs(text, "It is a film.") == original(text, "It is a film.")
    with torch.no_grad():
        diff = (model.encode(encoded["input_ids"]) - hf(**encoded).last_hidden_state).abs().max().item()
    print(f"\nMiniLM + LoRA, hf export in BertModel: largest |hidden-state difference| {diff:.2e}")
    assert type(hf).__name__ == "BertModel" and diff < 1e-4
