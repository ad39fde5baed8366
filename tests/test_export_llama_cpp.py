"""GGUF exports run by llama.cpp itself (llama-cpp-python, built from source; .ci/run builds and caches it):

- gguf: the merged fp32 / f16 export of a LoRA-tuned SmolLM2 agrees with minipeft on the argmax at every
  position of a teacher-forced Hamlet passage and on 16 greedy tokens; tiny llama, qwen2, qwen3 and gemma3
  models (sliding window, q/k norms, biases) give llama.cpp minipeft's logits, and their vocabularies (each
  pre-tokenizer the export names) minipeft's tokens;
- gguf-lora: on the unmodified Q4_1 SmolLM2 base GGUF, the adapter changes llama.cpp's logits as it changes
  minipeft's (correlation ≥ 0.9, the same size), and llama.cpp's own convert_lora_to_gguf.py, run on
  minipeft's peft export, gives the same logits as minipeft's file; on a tiny fp32 base, llama.cpp's logits
  are minipeft's (rsLoRA, an odd rank, some targets only);
- what llama.cpp cannot run (a weight or setting its architecture lacks, virtual tokens) is refused in one
  sentence naming the format that holds it.

    python -m pytest tests/test_export_llama_cpp.py -s     # prints the agreement figures
"""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, processors

import minipeft as mp
from minipeft.formats.assets import asset_path
from minipeft.exporters.check import plain_model
from minipeft.exporters.hf import hf_config
from minipeft.exporters.merged import base_weights
from minipeft.formats.gguf_file import GGUFFile
from minipeft.formats.tokenization import END_OF_TEXT, GGUF_PRE_TOKENIZERS, byte_level_bpe, bytes_to_unicode

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp's Python converters, from the llama-cpp-python source package (.ci/run unpacks them here)
CONVERTERS = Path(os.environ.get("MINIPEFT_LLAMA_CPP_SCRIPTS",
                                 Path.home() / ".cache" / "minipeft-wheels" / f"llama.cpp-{llama_cpp.__version__}"))
HAMLET = asset_path("hamlet").read_text(encoding="utf-8")
F32 = 0  # GGML_TYPE_F32: a KV cache in fp32 (llama.cpp keeps it in fp16 by default)


def llama_logits(path, ids, lora=None) -> torch.Tensor:
    """llama.cpp's logits (T, vocab) for the token ids, teacher-forced."""
    llm = llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=256,
                          logits_all=True, n_threads=2, verbose=False, type_k=F32, type_v=F32)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]))
    finally:
        llm.close()


def llama_vocabulary(path, text: str) -> tuple[list[int], dict]:
    """llama.cpp's token ids for `text` (<bos> first if the file asks for it) and the file's metadata, from
    the vocabulary alone; the ids read back (detokenized) must give the text again."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        body = ids[1:] if ids[:1] == [llm.token_bos()] else ids
        assert llm.detokenize(body, special=True).decode() == text
        return ids, dict(llm.metadata)
    finally:
        llm.close()


def llama_greedy(path, ids, n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, type_k=F32,
                          type_v=F32)
    try:
        out = []
        llm.eval(ids)
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out
    finally:
        llm.close()


@pytest.fixture(scope="module")
def smollm2_lora():
    """SmolLM2 with a LoRA whose B moved well off zero (as training moves it: an effect of several logits)."""
    model, tokenizer = mp.from_pretrained("smollm2")
    torch.manual_seed(0)  # A's init
    mp.apply(model, "lora", rank=8, alpha=16, targets=["all"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def passage(smollm2_lora):
    return smollm2_lora[1].encode(HAMLET[30_000:30_600]).ids[:96]


@pytest.fixture(scope="module")
def lora_file(smollm2_lora, tmp_path_factory):
    model, tokenizer = smollm2_lora
    return mp.export(model, tmp_path_factory.mktemp("lora") / "out", format="gguf-lora", tokenizer=tokenizer)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_merged_gguf_export_agrees_with_minipeft_in_llama_cpp(smollm2_lora, passage, dtype, tmp_path):
    model, tokenizer = smollm2_lora
    report = mp.export(model, tmp_path / "out", format="gguf", dtype=dtype, tokenizer=tokenizer)
    path = tmp_path / "out" / "model.gguf"
    theirs = llama_logits(path, passage)
    with torch.no_grad():
        ours = model(torch.tensor([passage]))[0]
        greedy = model.generate(torch.tensor([passage[:32]]), 16)[0, 32:].tolist()
    agree = theirs.argmax(-1) == ours.argmax(-1)
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1  # fp16 moves logits by up to ~0.09: closer calls may flip
    llama_greedy_tokens = llama_greedy(path, passage[:32], 16)
    same = next((i for i, (a, b) in enumerate(zip(greedy, llama_greedy_tokens)) if a != b), 16)
    print(f"\nSmolLM2 + LoRA, gguf {dtype} ({sum(report.files.values()) / 2**20:.0f} MiB) in llama.cpp: argmax agrees "
          f"at {int(agree.sum())} of {len(passage)} positions ({int((~clear).sum())} with a top-2 gap under 0.1), "
          f"largest |logit difference| {(theirs - ours).abs().max():.3g}, {same} of 16 greedy tokens the same")
    assert same == 16 and (agree.all() if dtype == "fp32" else agree[clear].all())
    text = HAMLET[40_000:40_400] + "\n<|im_start|>user\nHi 2024!<|im_end|>"
    ids, metadata = llama_vocabulary(path, text)
    assert ids == tokenizer.encode(text).ids and metadata["tokenizer.chat_template"] == tokenizer.chat_template
    vocabulary = [{k: v for k, v in GGUFFile(file).metadata.items() if k.startswith("tokenizer.")}
                  for file in (path, asset_path("smollm2"))]
    assert vocabulary[0] == vocabulary[1]  # the source file's vocabulary, as it was


def test_gguf_lora_on_the_quantized_base_does_what_the_adapter_does(smollm2_lora, passage, lora_file):
    model, _ = smollm2_lora
    base_file = asset_path("smollm2")  # Q4_1, as it is
    theirs = (llama_logits(base_file, passage, lora_file.path / "adapter.gguf") - llama_logits(base_file, passage))
    with torch.no_grad():
        ids = torch.tensor([passage])
        ours = model(ids)[0] - plain_model(model.cfg, base_weights(model))(ids)[0]
    correlation = torch.corrcoef(torch.stack([theirs.flatten(), ours.flatten()]))[0, 1].item()
    ratio = (theirs.norm() / ours.norm()).item()
    print(f"\ngguf-lora on the Q4_1 base in llama.cpp: the adapter's effect correlates {correlation:.3f} with "
          f"minipeft's, size ratio {ratio:.3f} (effect up to {ours.abs().max():.2f} logits)")
    assert correlation >= 0.9 and 0.8 <= ratio <= 1.25


@pytest.mark.skipif(not (CONVERTERS / "convert_lora_to_gguf.py").exists(),
                    reason=f"llama.cpp's converters are not unpacked at {CONVERTERS} (.ci/run does it)")
def test_llama_cpps_converter_on_the_peft_export_gives_the_same_logits(smollm2_lora, passage, lora_file, tmp_path):
    model, tokenizer = smollm2_lora
    mp.export(model, tmp_path / "peft", format="peft", tokenizer=tokenizer)
    base = tmp_path / "base"  # the converter reads the base model's config.json (no weights)
    base.mkdir()
    (base / "config.json").write_text(json.dumps(hf_config(model.cfg, "fp32", {"bos": 1, "eos": 2})))
    converted = tmp_path / "converted.gguf"
    subprocess.run([sys.executable, str(CONVERTERS / "convert_lora_to_gguf.py"), "--base", str(base),
                    "--outfile", str(converted), str(tmp_path / "peft")], check=True, capture_output=True)
    base_file = asset_path("smollm2")
    ours = llama_logits(base_file, passage, lora_file.path / "adapter.gguf")
    theirs = llama_logits(base_file, passage, converted)
    print(f"\nconvert_lora_to_gguf.py on the peft export against the gguf-lora export: largest |logit difference| "
          f"{(ours - theirs).abs().max():.2e}")
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def tiny_tokenizer(pre: str = "gpt-2", bos: bool = False) -> Tokenizer:
    """Byte-level BPE with three merges ("Ġ" + "t", "1" + "2", "(" + "t": ids 256-258) and <|endoftext|> (259):
    the smallest vocabulary llama.cpp loads (it needs merges), cut into pieces by the pre-tokenizer llama.cpp
    calls `pre` (gpt-2, smollm or qwen2). Whether "12" or "(t" merge shows how the text was cut. `bos`: it
    puts <|endoftext|> before what it encodes, as Gemma's and Llama 3's put their <bos>."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({"Ġt": 256, "12": 257, "(t": 258})
    tokenizer = byte_level_bpe(vocab, [("Ġ", "t"), ("1", "2"), ("(", "t")])
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    tokenizer.eos_token = END_OF_TEXT
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{END_OF_TEXT} $A",
                                                                 special_tokens=[(END_OF_TEXT, 259)])
        tokenizer.bos_token = END_OF_TEXT
    return tokenizer


def tiny_decoder(flavor, pre: str = "gpt-2", bos: bool = False, **overrides):
    """A tiny model with tiny_tokenizer's 260 tokens."""
    sizes = dict(vocab_size=260, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128, pad_token_id=259)
    cfg = mp.ModelConfig(**{**sizes, "extra": {"source": f"tiny-{flavor}"}, "flavor": flavor, **overrides})
    torch.manual_seed(0)
    model = mp.Transformer(cfg).eval()
    with torch.no_grad():  # norms off their init (1 or 0), so a wrong offset shows
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape))
    return model, tiny_tokenizer(pre, bos)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # heads of 16: speed 0 kept, 1 and 2 blended, the rest slowed
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("flavor, pre, bos, overrides", [  # each pre-tokenizer the export names, with and without <bos>
    ("llama", "smollm", False, dict(tie_embeddings=False)),
    ("llama", "smollm", False, dict(rope_scaling=LLAMA3_ROPE)),
    ("qwen2", "qwen2", False, dict(rope_scaling=LINEAR_ROPE)),
    ("qwen3", "gpt-2", False, dict(head_dim=32)),
    ("gemma3", "gpt-2", True, dict(head_dim=32, sliding_window=6, layer_pattern="SF", rope_theta=1e6,
                                   rope_local_theta=1e4, rope_scaling=LINEAR_ROPE, final_softcap=3.0)),
    ("gemma3", "gpt-2", False, dict(head_dim=32, sliding_window=6, layer_pattern="SF", rope_fraction=0.5)),  # partial
])
def test_tiny_models_of_each_gguf_architecture_run_in_llama_cpp(flavor, pre, bos, overrides, tmp_path):
    model, tokenizer = tiny_decoder(flavor, pre, bos, **overrides)
    mp.apply(model, "lora", rank=2, targets=["all"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    mp.export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    ids = tokenizer.encode(HAMLET[1000:1040]).ids  # 40 tokens: past gemma3's window of 6
    theirs = llama_logits(tmp_path / "out" / "model.gguf", ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    print(f"\ntiny {flavor} in llama.cpp: largest |logit difference| {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() < 1e-3  # Gemma: llama.cpp's GELU reads a table of fp16 inputs
    text = HAMLET[:300] + " In 1212,\n(they said) it's 12:12."  # gpt-2 merges "12", qwen2 "(t", smollm neither
    ids, metadata = llama_vocabulary(tmp_path / "out" / "model.gguf", text)
    assert metadata["tokenizer.ggml.pre"] == pre and ids == tokenizer.encode(text).ids  # <bos> as ours adds it
    # the model records no bos or eos id: they come from the tokenizer (end-of-text the eos; a bos if it has one)
    assert metadata["tokenizer.ggml.eos_token_id"] == "259" and metadata.get("tokenizer.ggml.bos_token_id") == \
        ("259" if bos else None) and (ids[0] == 259) == bos
    # llama-cpp-python renders chats with the file's template, as minipeft does (a base model: the plain one)
    messages = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."},
                {"role": "user", "content": "Long live the king!"}]
    prompt = llama_cpp.llama_chat_format.Jinja2ChatFormatter(metadata["tokenizer.chat_template"], END_OF_TEXT, "")
    assert prompt(messages=messages).prompt == mp.apply_chat_template(tokenizer, messages, add_generation_prompt=True,
                                                                      tokenize=False)


@pytest.mark.parametrize("d_model", [64, 48])  # 48: rows that do not split into q8_0's blocks of 32
def test_a_q8_0_export_runs_in_llama_cpp_as_minipeft_reads_it(d_model, tmp_path):
    """llama.cpp on the q8_0 file gives the logits of minipeft's model read from that file (the same rounded
    weights), up to its own rounding of activations; matrices whose rows do not split into blocks of 32 are
    stored fp16 instead."""
    import gguf
    model, tokenizer = tiny_decoder("qwen2", d_model=d_model)
    mp.apply(model, "lora", rank=2, targets=["all"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    path = tmp_path / "out" / "model.gguf"
    mp.export(model, tmp_path / "out", format="gguf", dtype="q8_0", tokenizer=tokenizer)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    for name, kind in kinds.items():
        rows = model.cfg.d_ff if name.endswith("ffn_down.weight") else d_model  # the length of a weight's rows
        expected = "F32" if not name.endswith(".weight") or "norm" in name else "Q8_0" if rows % 32 == 0 else "F16"
        assert kind == expected, name
    ids = tokenizer.encode(HAMLET[1000:1040]).ids
    read_back, _ = mp.from_pretrained(path)
    with torch.no_grad():
        ours = read_back(torch.tensor([ids]))[0]
    theirs = llama_logits(path, ids)
    # llama.cpp also rounds the activations a q8_0 matrix meets to 8 bits: measured 2.6 % of the largest logit
    # at d_model 64 (0.4 % at 48, mostly fp16), correlation 0.9998
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
    assert torch.corrcoef(torch.stack([theirs.flatten(), ours.flatten()]))[0, 1] > 0.999


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return mp.from_pretrained("smollm2")[1]


@pytest.mark.skipif(not (CONVERTERS / "convert_hf_to_gguf.py").exists(),
                    reason=f"llama.cpp's converters are not unpacked at {CONVERTERS} (.ci/run does it)")
@pytest.mark.parametrize("flavor, overrides", [
    ("llama", dict(rope_scaling=LLAMA3_ROPE)),  # written as the rope_freqs tensor: each speed's divisor
    ("gemma3", dict(head_dim=32, sliding_window=6, layer_pattern="SSSSSF", n_layer=6, rope_scaling=LINEAR_ROPE,
                    final_softcap=3.0)),  # the converter writes no layer pattern: llama.cpp's default, every 6th
])
def test_llama_cpps_converter_on_the_hf_export_reads_back_as_the_model(flavor, overrides, smollm2_tokenizer,
                                                                       tmp_path):
    """What users do with a model of the hub: llama.cpp's convert_hf_to_gguf.py on its folder (here the hf
    export of a tiny model with SmolLM2's vocabulary, which the converter knows), then the GGUF file into
    minipeft: the model's logits, and llama.cpp's on the same file."""
    model, _ = tiny_decoder(flavor, vocab_size=smollm2_tokenizer.get_vocab_size(), pad_token_id=2, **overrides)
    mp.export(model, tmp_path / "hf", format="hf", tokenizer=smollm2_tokenizer)
    converted = tmp_path / "converted.gguf"
    subprocess.run([sys.executable, str(CONVERTERS / "convert_hf_to_gguf.py"), str(tmp_path / "hf"), "--outtype",
                    "f32", "--outfile", str(converted)], check=True, capture_output=True)
    ids = smollm2_tokenizer.encode(HAMLET[1000:1040]).ids
    read, _ = mp.from_pretrained(converted)
    with torch.no_grad():
        ours, back = model(torch.tensor([ids]))[0], read(torch.tensor([ids]))[0]
    theirs = llama_logits(converted, ids)
    print(f"\nconvert_hf_to_gguf.py on a tiny {flavor}: read back, largest |logit difference| "
          f"{(back - ours).abs().max():.2e}; in llama.cpp {(theirs - ours).abs().max():.2e}")
    assert read.cfg.rope_scaling == overrides["rope_scaling"] and (back - ours).abs().max() < 1e-5
    assert (theirs - ours).abs().max() < 1e-3
    # the gguf export writes the vocabulary and its special tokens' ids (unk too) as the converter does
    mp.export(model, tmp_path / "gguf", format="gguf", tokenizer=smollm2_tokenizer)
    written, converter_wrote = ({k: v for k, v in GGUFFile(file).metadata.items() if k.startswith("tokenizer.")}
                                for file in (tmp_path / "gguf" / "model.gguf", converted))
    key = "tokenizer.ggml.add_bos_token"  # the converter leaves it out for gemma3: llama.cpp adds no <bos> then
    assert written.pop(key) == converter_wrote.pop(key, False)
    assert written == converter_wrote and converter_wrote.get("tokenizer.ggml.unknown_token_id") == 0


@pytest.mark.parametrize("flavor, overrides, options", [
    ("llama", dict(tie_embeddings=False), dict(rank=3, alpha=5, rslora=True, targets=["q", "v"])),  # α/√r, odd rank
    ("gemma3", dict(head_dim=32, sliding_window=6, layer_pattern="SF"), dict(rank=1, alpha=7, targets=["k", "gate"])),
])
def test_gguf_lora_on_a_tiny_base_gives_minipefts_logits_in_llama_cpp(flavor, overrides, options, tmp_path):
    """The adapter on the fp32 base GGUF (the base's own gguf export): llama.cpp's logits are minipeft's, whatever
    the scale (rsLoRA's α/√r is written as α = s·r) and whichever targets carry a LoRA."""
    model, tokenizer = tiny_decoder(flavor, **overrides)
    base = plain_model(model.cfg, {k: v.clone() for k, v in model.state_dict().items()})
    mp.apply(model, "lora", **options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    mp.export(base, tmp_path / "base", format="gguf", tokenizer=tokenizer)
    mp.export(model, tmp_path / "lora", format="gguf-lora")
    ids = tokenizer.encode(HAMLET[1000:1040]).ids
    theirs = llama_logits(tmp_path / "base" / "model.gguf", ids, tmp_path / "lora" / "adapter.gguf")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < 1e-3  # Gemma: llama.cpp's GELU reads a table of fp16 inputs


@pytest.mark.parametrize("flavor, overrides, method, fmt, message", [
    ("llama", dict(o_bias=True), "lora", "gguf", r"a GGUF llama file has no tensor for this model's "
                                                 r"blocks.0.attn.o.bias \(llama.cpp's llama architecture has no such "
                                                 r"weight\), so format 'gguf' cannot hold it"),
    ("llama", dict(norm="layernorm"), "lora", "gguf", r"a GGUF llama file has no tensor for this model's "
                                                      r"blocks.0.ln1.bias"),
    # the way out is the hf export only where transformers' config holds the setting (its Llama has no soft-cap)
    ("llama", dict(attn_softcap=20.0), "lora", "gguf", r"a GGUF llama file cannot hold attn_softcap=20.0 .*; keep it "
                                                       r"as an adapter on its base \(mp.save_adapter\)"),
    ("llama", dict(act="gelu"), "lora", "gguf", r"a GGUF llama file cannot hold act='gelu' .*; export it with format "
                                                r"'hf'"),
    # llama.cpp has no virtual tokens: the merged gguf refuses them too, so gguf-lora names the formats that hold them
    ("llama", {}, "prefix", "gguf-lora", r"prefix adds modules of its own .* so format 'gguf-lora' cannot carry it; "
                                         r"export it with format 'peft'"),
    ("qwen2", {}, "adapter", "gguf-lora", r"adapter adds modules of its own .* so format 'gguf-lora' cannot carry it; "
                                          r"keep it as minipeft's own adapter"),
])
def test_a_model_llama_cpp_cannot_run_is_refused_in_one_sentence(flavor, overrides, method, fmt, message, tmp_path):
    model, tokenizer = tiny_decoder(flavor, **overrides)
    mp.apply(model, method)
    with pytest.raises(ValueError, match=message):
        mp.export(model, tmp_path / "out", format=fmt, tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
