"""from_pretrained: parity with transformers on tiny random checkpoints and on the real assets (minilm,
smollm2), the GGUF path on a file we write ourselves, and the error messages.

transformers is only a reference here; its models are built with a fixed seed and saved to tmp folders.
"""
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the real assets are local files; never ask the hub

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipeft.formats.assets import asset_path
from minipeft.formats.pretrained import (HF_PREFIXES, NAMED_MODELS, byte_tokenizer, bytes_to_unicode, from_pretrained,
    hf_module_names)

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

HAMLET = asset_path("hamlet").read_text(encoding="utf-8")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning 22.7M parameters on a CPU? Surprisingly doable in 2024!",
    "Café naïve résumé — 東京 and Zürich, priced at €3.50.",
    "Short.",
]
# real text for tokenizer parity: Hamlet, numbers, unicode, whitespace runs and code
TOKENIZER_TEXTS = [
    HAMLET[20_000:21_500],
    HAMLET[90_000:91_200],
    "In 1603, 2 quartos and 36 plays; pi is 3.14159 and 1,000,000 is a million.",
    "naïve café, Ελληνικά, 日本語のテキスト, emoji 😀🎉 and math ∑ x² ≤ ∞",
    "spaces   between    words\tand\ttabs\n\n\nand blank lines   ",
    'def add(a, b):\n    """Sum."""\n    return a + b  # x[0] != y\n\nprint(add(2, 40))\n',
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def right_padded(vocab_size: int, B: int = 3, T: int = 10, seed: int = 0):
    """Random ids (B, T) and an attention mask (B, T) where row b has T - 3b real tokens."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(1, B):
        mask[row, T - 3 * row:] = 0
    return idx, mask


def max_diff_on_real(ours, theirs, mask) -> float:
    """Largest |ours - theirs| over real (mask = 1) positions; (B, T, ...) tensors."""
    real = mask.bool()
    return (ours[real] - theirs[real]).abs().max().item()


def save_hf(model, folder):
    """save_pretrained plus a byte-level tokenizer.json (from_pretrained needs one in every folder)."""
    model.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def tiny_hf_llama(tie: bool = False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=257,
                                      max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=257)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, save_hf(hf, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    hf = tiny_hf_llama()
    return hf, save_hf(hf, tmp_path_factory.mktemp("llama"))


# ---------------------------------------------------------------------------------------------
# parity with transformers on tiny random checkpoints


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_logits_match_transformers(family, padded, gpt2_folder, llama_folder):
    hf, folder = {"gpt2": gpt2_folder, "llama": llama_folder}[family]
    model, _ = from_pretrained(folder)
    idx, mask = right_padded(257)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask).logits
        ours = model(idx, attention_mask=mask if padded else None)
    assert max_diff_on_real(ours, theirs, mask) < 1e-4


def test_config_fields_are_read(gpt2_folder, llama_folder):
    gpt2, _ = from_pretrained(gpt2_folder[1])
    assert gpt2.cfg.dropout == 0.1 and gpt2.cfg.max_seq_len == 64 and gpt2.cfg.tie_embeddings
    assert gpt2.cfg.extra["source"] == str(gpt2_folder[1])
    llama, _ = from_pretrained(llama_folder[1], dropout=0.2)
    assert (llama.cfg.n_kv_head, llama.cfg.rope_theta, llama.cfg.tie_embeddings) == (2, 5000.0, False)
    assert llama.cfg.dropout == 0.2  # the argument overrides the checkpoint's 0.0
    assert not torch.equal(llama.head.weight, llama.tok_emb.weight)


def test_hf_module_names_are_transformers_modules(gpt2_folder, llama_folder):
    """hf_module_names (which peft_format.py names peft adapters' layers with) reads the rename rules:
    each name is a module of the real transformers model, under its body prefix or (lm_head) at the top."""
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=257))
    for flavor, hf in (("gpt2", gpt2_folder[0]), ("bert", bert), ("llama", llama_folder[0])):
        body = hf.get_submodule(HF_PREFIXES[flavor].rstrip("."))
        for ours, theirs in hf_module_names(flavor).items():
            owner = hf if ours == "head" else body  # lm_head sits beside the body
            assert isinstance(owner.get_submodule(theirs.format(i=1)), torch.nn.Module), (flavor, ours)
    gpt2 = hf_module_names("gpt2")
    assert [gpt2[f"blocks.{{i}}.attn.{t}"] for t in "qkvo"] == ["h.{i}.attn.c_attn"] * 3 + ["h.{i}.attn.c_proj"]
    assert list(gpt2).index("blocks.{i}.attn.q") + 1 == list(gpt2).index("blocks.{i}.attn.k")  # row order
    assert hf_module_names("bert")["blocks.{i}.mlp.down"] == "encoder.layer.{i}.output.dense"
    assert hf_module_names("llama")["blocks.{i}.mlp.gate"] == "layers.{i}.mlp.gate_proj"


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_bert_hidden_states_match_transformers(head, tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=257, max_position_embeddings=64)
    hf = getattr(transformers, head)(config).eval()
    model, _ = from_pretrained(save_hf(hf, tmp_path))  # pooler / cls.* heads are skipped
    assert model.cfg.pool == "cls"  # no 1_Pooling/config.json
    encoder = hf if head == "BertModel" else hf.bert
    idx, mask = right_padded(257)
    types = torch.randint(0, 2, idx.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for attention_mask in (None, mask):
            theirs = encoder(input_ids=idx, attention_mask=attention_mask,
                             token_type_ids=types).last_hidden_state
            ours = model.encode(idx, attention_mask=attention_mask, token_type_ids=types)
            real = attention_mask if attention_mask is not None else torch.ones_like(mask)
            assert max_diff_on_real(ours, theirs, real) < 1e-4


def test_pytorch_model_bin_loads(gpt2_folder, tmp_path):
    hf, _ = gpt2_folder
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # includes the tied lm_head.weight
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model, _ = from_pretrained(tmp_path)
    idx, _ = right_padded(257)
    with torch.no_grad():
        assert (model(idx) - hf(input_ids=idx).logits).abs().max() < 1e-4


def test_older_llama_config_with_top_level_rope_theta(llama_folder, tmp_path):
    _, folder = llama_folder
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # transformers 4 layout
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_pretrained(tmp_path)[0].cfg.rope_theta == 5000.0
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_pretrained(tmp_path)[0].cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported; supported: default, linear, llama3"):
        from_pretrained(tmp_path)
    config["rope_scaling"] = None
    config["partial_rotary_factor"] = 0.5  # Phi-3's setting: transformers' Llama would rotate whole heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported: transformers' llama applies "
                                         "RoPE to whole heads"):
        from_pretrained(tmp_path)


def test_n_classes_builds_a_fresh_head_and_skips_the_lm_head(llama_folder):
    hf, folder = llama_folder
    model, _ = from_pretrained(folder, n_classes=3)
    assert model.head.weight.shape == (3, 64)
    idx, mask = right_padded(257)
    assert model(idx, attention_mask=mask).shape == (3, 3)
    with torch.no_grad():  # the body is still the pretrained one
        theirs = hf.model(input_ids=idx, attention_mask=mask).last_hidden_state
        assert max_diff_on_real(model.encode(idx, attention_mask=mask), theirs, mask) < 1e-4


@pytest.fixture(scope="module")
def llama_classifier_folder(tmp_path_factory):
    """A tiny LlamaForSequenceClassification (3 labels) whose pad id is the byte tokenizer's, 256."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=257, max_position_embeddings=64,
                                      pad_token_id=256, num_labels=3)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    return hf, save_hf(hf, tmp_path_factory.mktemp("llama_classifier"))


def padded(side: str, with_mask: bool = True, last_id: int | None = None):
    """right_padded's rows with padding (id 256) on `side`; the first row's last id set to last_id."""
    idx, mask = right_padded(256, T=8)
    if side == "left":
        idx, mask = idx.flip(1), mask.flip(1)
    idx = idx.masked_fill(mask == 0, 256)
    if last_id is not None:
        idx[0, -1] = last_id
    return idx, (mask if with_mask else None)


@pytest.mark.parametrize("idx, mask", [
    padded("right"),
    padded("left"),  # transformers reads the rightmost token that is not the pad id, the last one here
    padded("right", with_mask=False),  # no mask: the pad ids themselves say where the text ends
    padded("right", last_id=256),  # a text ending in the pad id (pad = eos) is read before it, mask or not
], ids=["right", "left", "right-no-mask", "ends-in-pad-id"])
def test_causal_classifier_reads_the_token_transformers_reads(idx, mask, llama_classifier_folder):
    hf, folder = llama_classifier_folder
    model, _ = from_pretrained(folder)
    with torch.no_grad():
        diff = (model(idx, attention_mask=mask) - hf(input_ids=idx, attention_mask=mask).logits).abs().max()
    assert diff < 1e-5


def test_a_classifier_without_a_pad_id_reads_the_last_token(tmp_path):
    """A config.json without pad_token_id: transformers reads the last token of a lone row (it refuses batches),
    whatever its id; ours then pads with the eos id, so a text ending in token 0 ("!" in GPT-2) keeps it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=97, eos_token_id=96)
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    model, _ = from_pretrained(save_hf(hf, tmp_path))
    assert hf.config.pad_token_id is None and model.cfg.pad_token_id == 96
    idx = torch.tensor([[5, 6, 7, 0]])
    with torch.no_grad():
        assert (model(idx) - hf(input_ids=idx).logits).abs().max() < 1e-5


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=257)
CLASSIFIERS = {  # family -> a tiny fine-tuned …ForSequenceClassification of 3 labels (pad id 256 for the decoders)
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        **SMALL, max_position_embeddings=64, num_labels=3)),
    "roberta": lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        **SMALL, max_position_embeddings=66, num_labels=3)),
    "distilbert": lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=257, max_position_embeddings=64, num_labels=3)),
    "gpt2": lambda: transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=257, pad_token_id=256, num_labels=3)),
    "llama": lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=256, num_labels=3)),
}


def fine_tuned_classifier(family: str, folder):
    """A tiny …ForSequenceClassification whose classifier layers moved off their init (as training moves them:
    an encoder's head and pooler start near 0, so a fresh head would be near them too), saved to `folder`."""
    torch.manual_seed(0)
    hf = CLASSIFIERS[family]().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith(("classifier", "pre_classifier", "score", "bert.pooler")):
                p.normal_(0, 0.5)
    return hf, save_hf(hf, folder)


@pytest.mark.parametrize("family", list(CLASSIFIERS))
def test_a_fine_tuned_classifier_gives_transformers_logits(family, tmp_path):
    """Its trained head is read (an encoder's with its pooler on the first token) and sets n_classes."""
    hf, folder = fine_tuned_classifier(family, tmp_path)
    idx, mask = padded("right")
    for n_classes in (None, 3):
        model, _ = from_pretrained(folder, n_classes=n_classes)
        assert model.cfg.n_classes == 3
        with torch.no_grad():
            diff = (model(idx, attention_mask=mask) - hf(input_ids=idx, attention_mask=mask).logits).abs().max()
        assert diff < 1e-5
    with pytest.raises(ValueError, match=r"its trained classifier has 3 classes, not n_classes=2; leave n_classes "
                                         r"out to use it, or call model.add_classifier\(2\) after loading"):
        from_pretrained(folder, n_classes=2)  # was: a fresh head of 2 classes, silently
    model, _ = from_pretrained(folder)
    model.add_classifier(2)  # a fresh last layer, the pooler kept: transformers' ignore_mismatched_sizes=True
    theirs = type(hf).from_pretrained(folder, num_labels=2, ignore_mismatched_sizes=True)
    assert model(idx, attention_mask=mask).shape == theirs(input_ids=idx, attention_mask=mask).logits.shape


@pytest.mark.parametrize("head, config, message", [
    ("BertForTokenClassification", "BertConfig", r"its classifier \(classifier.bias, classifier.weight\) is not the "
     r"…ForSequenceClassification head of a bert \(classifier.bias, classifier.weight, pooler.dense.bias, "
     r"pooler.dense.weight\), the one classifier minipeft reads; save the body alone"),
    ("RobertaForTokenClassification", "RobertaConfig", r"its classifier .* is not the …ForSequenceClassification "
     r"head of a roberta"),
], ids=["bert-token-classifier", "roberta-token-classifier"])
def test_another_classifier_is_refused_not_dropped(head, config, message, tmp_path):
    """A token classifier's head is no sequence classifier's: refused, where it was dropped and the body loaded."""
    torch.manual_seed(0)
    hf = getattr(transformers, head)(getattr(transformers, config)(**SMALL, max_position_embeddings=66, num_labels=3))
    with pytest.raises(ValueError, match=message):
        from_pretrained(save_hf(hf, tmp_path))


def test_a_trained_pooler_reads_the_first_token(tmp_path):
    """transformers' encoder classifiers read [CLS]; mean pooling would compute another classifier."""
    _, folder = fine_tuned_classifier("bert", tmp_path)
    assert from_pretrained(folder)[0].cfg.pool == "cls"
    with pytest.raises(ValueError, match="pooler 'dense_tanh' is an encoder classifier's layer on the first token: "
                                         "it needs n_classes, pool='cls' and causal off"):
        from_pretrained(folder, pool="mean")


def write_task(folder, texts: list[str], labels: list[int]):
    """A classification task folder: the same text,label rows as its train, validation and test CSV files."""
    folder.mkdir()
    rows = "".join(f"{text},{label}\n" for text, label in zip(texts, labels))
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text("text,label\n" + rows)
    return folder


def test_eval_scores_a_classification_task_with_the_checkpoints_head(tmp_path, capsys):
    """eval.py on a fine-tuned classifier uses its trained head (it put a fresh one in its place: a chance-level
    baseline whatever the checkpoint), and refuses a task of other classes or one for the LM head."""
    import eval as eval_cli
    hf, folder = fine_tuned_classifier("llama", tmp_path / "model")
    texts = ["good film", "bad plot", "so so", "a fine cast", "dull", "it was fun", "meh", "great", "long"]
    labels = [i % 3 for i in range(len(texts))]
    with torch.no_grad():
        predicted = [hf(input_ids=torch.tensor([list(text.encode())])).logits.argmax(-1).item() for text in texts]
    accuracy = sum(p == label for p, label in zip(predicted, labels)) / len(texts)
    eval_cli.main(["--model", str(folder), "--task", str(write_task(tmp_path / "task", texts, labels)),
                   "--split", "validation"])
    out = capsys.readouterr().out
    assert "freshly initialized" not in out and f"accuracy {accuracy:.4f}" in out
    with pytest.raises(ValueError, match="has 3 classes, but .* has 2; evaluate it on a task of its own classes"):
        eval_cli.main(["--model", str(folder), "--task", str(write_task(tmp_path / "two", texts, [0, 1] * 4 + [0]))])
    with pytest.raises(ValueError, match="is a classifier \\(3 classes\\) without an LM head, so it cannot score"):
        eval_cli.main(["--model", str(folder), "--task", "hamlet"])


def test_train_trains_the_checkpoints_head(tmp_path, capsys):
    """train.py keeps a fine-tuned classifier's head for a task of its classes (it put a fresh one in its place),
    puts a fresh one, saying so, for other classes, and refuses a task for the LM head."""
    from types import SimpleNamespace
    import train as train_cli
    _, folder = fine_tuned_classifier("bert", tmp_path)
    model, _ = from_pretrained(folder)
    trained = model.head.weight.clone()
    train_cli.prepare_head(model, SimpleNamespace(kind="classification", n_classes=3), "bert")
    assert torch.equal(model.head.weight, trained)
    train_cli.prepare_head(model, SimpleNamespace(kind="classification", n_classes=2), "bert")
    assert model.head.weight.shape == (2, 32) and hasattr(model, "pooler")
    assert "a fresh head takes its place" in capsys.readouterr().out
    with pytest.raises(ValueError, match="bert is a classifier \\(2 classes\\) without an LM head, so it cannot train"):
        train_cli.prepare_head(model, SimpleNamespace(kind="sft", n_classes=None), "bert")


# ---------------------------------------------------------------------------------------------
# GGUF written from a tiny transformers Llama


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: within each head, interleave the two halves."""
    out_features, d = w.shape
    return w.reshape(n_heads, 2, out_features // n_heads // 2, d).transpose(1, 2).reshape(out_features, d)


def write_gguf(path, hf, tensor_type: str = "F32", architecture: str = "llama", label_as: str | None = None,
               metadata: dict | None = None, tensors_added: dict | None = None):
    """The tiny HF Llama as a llama.cpp GGUF with a byte-level vocabulary. 2-D weights are stored as
    `tensor_type` (norms stay F32, like llama.cpp); `label_as` mislabels them with another type;
    `metadata`: more <architecture>.* keys; `tensors_added`: more tensors."""
    c, sd = hf.config, hf.state_dict()
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
               "output_norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    ours_to_gguf = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for theirs, name in ours_to_gguf.items():
            tensors[f"blk.{i}.{name}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
        for name, heads in (("attn_q", c.num_attention_heads), ("attn_k", c.num_key_value_heads)):
            tensors[f"blk.{i}.{name}.weight"] = llama_cpp_permute(tensors[f"blk.{i}.{name}.weight"], heads)
    tensors.update(tensors_added or {})
    writer = gguf_writer(path, architecture, c)
    for key, value in (metadata or {}).items():
        add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}
        add[type(value)](f"{architecture}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([bytes_to_unicode()[b] for b in range(256)] + ["<|endoftext|>"])
    writer.add_token_types([1] * 256 + [3])  # 3: control
    writer.add_pad_token_id(256)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for name, tensor in tensors.items():
        values = tensor.numpy()
        if values.ndim == 1 or tensor_type == "F32":
            writer.add_tensor(name, values)
        else:
            label = gguf.GGMLQuantizationType[label_as] if label_as else qtype
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=label)
    return write_out(writer, path)


def gguf_writer(path, architecture: str, c, head_dim: int | None = None):
    """A GGUFWriter holding a transformers decoder config's sizes under llama.cpp's names."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3: per layer type
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    return writer


def write_out(writer, path):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, llama_folder):
    hf, _ = llama_folder
    return hf, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf)


def test_gguf_llama_matches_transformers(tiny_gguf):
    hf, path = tiny_gguf
    model, tokenizer = from_pretrained(path)
    assert (model.cfg.n_kv_head, model.cfg.rope_theta, model.cfg.pad_token_id) == (2, 5000.0, 256)
    assert not model.cfg.tie_embeddings  # output.weight is in the file
    idx, mask = right_padded(257)
    with torch.no_grad():
        for attention_mask in (None, mask):
            theirs = hf(input_ids=idx, attention_mask=attention_mask).logits
            ours = model(idx, attention_mask=attention_mask)
            real = attention_mask if attention_mask is not None else torch.ones_like(mask)
            assert max_diff_on_real(ours, theirs, real) < 1e-4
    text = "héllo, wörld <|endoftext|>"
    assert tokenizer.encode(text).ids == byte_tokenizer().encode(text).ids


@pytest.mark.parametrize("tensor_type", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tensor_types_dequantize_exactly(tensor_type, tmp_path, llama_folder):
    hf, _ = llama_folder
    model, _ = from_pretrained(write_gguf(tmp_path / "q.gguf", hf, tensor_type))
    qtype = gguf.GGMLQuantizationType[tensor_type]

    def round_trip(w):  # what the file holds, back in fp32
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)).float()

    layer = hf.model.layers[1]
    # q rows were permuted before quantizing; blocks lie within rows, so unpermuting commutes
    assert torch.equal(model.blocks[1].attn.q.weight, round_trip(layer.self_attn.q_proj.weight.detach()))
    assert torch.equal(model.blocks[1].attn.k.weight, round_trip(layer.self_attn.k_proj.weight.detach()))
    assert torch.equal(model.blocks[1].mlp.down.weight, round_trip(layer.mlp.down_proj.weight.detach()))
    assert torch.equal(model.tok_emb.weight, round_trip(hf.model.embed_tokens.weight.detach()))


def test_gguf_unsupported_tensor_type_is_named(tmp_path, llama_folder):
    hf, _ = llama_folder  # Q4_0 bytes labelled IQ4_NL (same block size), a type we do not dequantize
    path = write_gguf(tmp_path / "iq.gguf", hf, "Q4_0", label_as="IQ4_NL")
    with pytest.raises(ValueError, match="IQ4_NL.*supported: F32"):
        from_pretrained(path)


def test_gguf_unsupported_architecture(tmp_path, llama_folder):
    path = write_gguf(tmp_path / "gpt2.gguf", llama_folder[0], architecture="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3, "
                                         "gemma3"):
        from_pretrained(path)


def test_gguf_with_rope_on_part_of_each_head_is_refused(tmp_path, llama_folder):
    hf, _ = llama_folder
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    whole = write_gguf(tmp_path / "whole.gguf", hf, metadata={"rope.dimension_count": head_dim})
    assert from_pretrained(whole)[0].cfg.rope_fraction == 1
    with pytest.raises(ValueError, match=f"rope.dimension_count {head_dim // 2} is not the head size {head_dim}; "
                                         "llama applies RoPE to whole heads"):
        from_pretrained(write_gguf(tmp_path / "half.gguf", hf, metadata={"rope.dimension_count": head_dim // 2}))


@pytest.mark.parametrize("architecture, metadata, tensors_added, message", [
    ("llama", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, {},
     "RoPE scaling 'yarn' is not supported; supported: linear, and Llama 3's"),
    ("llama", {"attention.key_length": 8, "attention.value_length": 4}, {},
     "attention.value_length 4 is not attention.key_length 8; minipeft's heads have one size"),
    ("llama", {"attention.causal": False}, {}, "attention.causal is false .* llama attends to the tokens before only"),
    ("llama", {}, {"rope_freqs.weight": torch.tensor([1.0, 1.0, 3.0, 1.0, 5.0, 5.0, 5.0, 5.0])},  # not falling
     "rope_freqs.weight divides RoPE's speeds otherwise than Llama 3's scaling"),
    ("llama", {}, {"rope_freqs.weight": torch.tensor([4.0, 1.0] * 4)},  # slowed, kept, ...: no line falls so
     "rope_freqs.weight divides RoPE's speeds otherwise than Llama 3's scaling"),
    ("llama", {}, {"rope_freqs.weight": torch.ones(4)}, "rope_freqs.weight has shape \\(4,\\), and RoPE turns 8 pairs"),
    ("qwen2", {}, {"rope_freqs.weight": torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 4.0, 4.0])},
     "a qwen2 file with rope_freqs.weight is not one llama.cpp's converter writes"),
], ids=["yarn", "value-length", "not-causal", "rope-freqs-not-llama3", "rope-freqs-rising", "rope-freqs-shape",
        "rope-freqs-in-qwen2"])
def test_gguf_settings_minipeft_cannot_compute_are_refused(architecture, metadata, tensors_added, message, tmp_path,
                                                           llama_folder):
    path = write_gguf(tmp_path / "m.gguf", llama_folder[0], architecture=architecture, metadata=metadata,
                      tensors_added=tensors_added)
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


def test_truncated_gguf(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf[1].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated .*delete it and download again"):
        from_pretrained(cut)


# ---------------------------------------------------------------------------------------------
# named tiny models


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "tiny-llama"])
def test_tiny_models_are_deterministic_and_leave_the_rng_alone(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model, tokenizer = from_pretrained(name)
    assert torch.equal(torch.get_rng_state(), state)
    again, _ = from_pretrained(name)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model.cfg.vocab_size == tokenizer.get_vocab_size() == 257
    assert tokenizer.token_to_id("<|endoftext|>") == model.cfg.pad_token_id == 256
    text = "Ünïcode ✓ and bytes\n"
    ids = tokenizer.encode(text).ids
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert model(torch.tensor([ids])).shape == (1, len(ids), 257)


def test_tiny_model_overrides():
    model, _ = from_pretrained("tiny-llama", n_layer=3, n_classes=2, pool="cls")
    assert (len(model.blocks), model.cfg.n_kv_head, model.head.weight.shape) == (3, 2, (2, 64))
    with pytest.raises(ValueError, match="unknown config override.*n_layers"):
        from_pretrained("tiny-gpt2", n_layers=3)
    with pytest.raises(ValueError, match="n_classes must be a whole number >= 1"):
        from_pretrained("tiny-gpt2", n_classes=0)  # not an LM: a classifier of no class


# ---------------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2 (HF folder) and SmolLM2-135M-Instruct (Q4_1 GGUF)


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained("minilm")


def test_minilm_hidden_states_and_tokens_match_transformers(minilm):
    model, tokenizer = minilm
    folder = asset_path("minilm")
    hf = transformers.BertModel.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = [e.ids for e in encodings]
    assert ids == hf_tokenizer(SENTENCES)["input_ids"]
    T = max(len(row) for row in ids)
    idx = torch.tensor([row + [0] * (T - len(row)) for row in ids])  # (B, T), right padding
    mask = torch.tensor([[1] * len(row) + [0] * (T - len(row)) for row in ids])
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask).last_hidden_state
        ours = model.encode(idx, attention_mask=mask)
    assert max_diff_on_real(ours, theirs, mask) < 1e-4
    assert model.cfg.pool == "mean"  # from 1_Pooling/config.json
    assert from_pretrained("minilm", pool="cls", n_classes=2)[0].cfg.pool == "cls"


@pytest.fixture(scope="module")
def smollm2():
    return from_pretrained("smollm2")


@pytest.fixture(scope="module")
def smollm2_gguf_reference():
    path = asset_path("smollm2")
    return dict(folder=str(path.parent), gguf_file=path.name)


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, smollm2_gguf_reference):
    model, tokenizer = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_reference["folder"], gguf_file=smollm2_gguf_reference["gguf_file"]).eval()
    ids = torch.tensor([tokenizer.encode(HAMLET[30_000:30_400]).ids])
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        ours = model(ids)
    assert (ours - theirs).abs().max() < 1e-3
    # our q/k un-permutation gives exactly the rows transformers' GGUF loader makes (GQA: 9 q, 3 kv heads)
    assert torch.equal(model.blocks[0].attn.q.weight, hf.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.blocks[29].attn.k.weight, hf.model.layers[29].self_attn.k_proj.weight)


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2, smollm2_gguf_reference):
    _, tokenizer = smollm2
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf_reference["folder"], gguf_file=smollm2_gguf_reference["gguf_file"])
    for text in TOKENIZER_TEXTS:
        assert tokenizer.encode(text).ids == hf_tokenizer(text)["input_ids"], text
    assert tokenizer.encode(HAMLET).ids == hf_tokenizer(HAMLET)["input_ids"]


def test_smollm2_splits_digits_like_llama_cpp(smollm2):
    """The file's pre-tokenizer is "smollm": every digit is cut off first, then GPT-2's regex runs on
    the rest. A whitespace run before a digit thus stays one piece ("ĠĠ", "1"), as in llama.cpp and
    SmolLM2's own tokenizer.json. (transformers 5.23's GGUF converter has no "smollm" entry and
    falls back to plain GPT-2 splitting here: "Ġ", "Ġ", "1".)"""
    _, tokenizer = smollm2
    assert tokenizer.encode("x  1").tokens == ["x", "ĠĠ", "1"]
    assert tokenizer.encode("a\n\n12").tokens == ["a", "ĊĊ", "1", "2"]


def test_smollm2_greedy_answer_is_paris(smollm2):
    model, tokenizer = smollm2
    assert model.cfg.pad_token_id == 2 and model.cfg.extra["eos_token_id"] == 2
    ids = torch.tensor([tokenizer.encode("The capital of France is").ids])
    out = model.generate(ids, max_new_tokens=3)
    assert tokenizer.decode(out[0, ids.shape[1]:].tolist()).startswith(" Paris")


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_name_lists_the_named_models():
    with pytest.raises(FileNotFoundError) as error:
        from_pretrained("gpt-5")
    assert all(name in str(error.value) for name in NAMED_MODELS)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        from_pretrained(tmp_path / "no-such-folder")


def test_folder_without_tokenizer_loads_the_model_and_names_what_is_missing(gpt2_folder, tmp_path):
    gpt2_folder[0].save_pretrained(tmp_path)
    model, tokenizer = from_pretrained(tmp_path)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 257) and not tokenizer
    with pytest.raises(ValueError, match=r"has no tokenizer \(tokenizer.json, vocab.txt, or vocab.json \+ merges.txt\)"):
        tokenizer.encode("hello")


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights(filename, gpt2_folder, tmp_path):
    hf, folder = gpt2_folder
    hf.config.save_pretrained(tmp_path)
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    if filename == "pytorch_model.bin":
        torch.save(hf.state_dict(), tmp_path / filename)
    else:
        (tmp_path / filename).write_bytes((folder / filename).read_bytes())
    data = (tmp_path / filename).read_bytes()
    (tmp_path / filename).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{filename} is corrupt or truncated"):
        from_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type 't5' is not supported; supported: gpt2, bert, roberta"):
        from_pretrained(tmp_path)


def copy_with_weights(folder, tmp_path, weights):
    tmp_path.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    save_file(weights, tmp_path / "model.safetensors")
    return tmp_path


def test_unknown_and_missing_keys_are_named(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    weights = load_file(folder / "model.safetensors")
    extra_key = {"transformer.h.0.attn.rotary": torch.ones(2)}
    extra = copy_with_weights(folder, tmp_path / "extra", {**weights, **extra_key})
    with pytest.raises(ValueError, match=r"unknown key\(s\) in the checkpoint: transformer.h.0.attn.rotary"):
        from_pretrained(extra)
    del weights["transformer.h.1.ln_2.bias"]
    missing = copy_with_weights(folder, tmp_path / "missing", weights)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: h.1.ln_2.bias"):
        from_pretrained(missing)


def test_a_layer_more_than_config_json_says_is_named(gpt2_folder, tmp_path):
    """Weights of 2 blocks under a config of 1: the second block's keys map to names our model does not
    have, and are refused by their names in the checkpoint (not dropped by a non-strict load)."""
    _, folder = gpt2_folder
    copy_with_weights(folder, tmp_path, load_file(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    assert config["n_layer"] == 2
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) in the checkpoint: transformer.h.1.attn.c_attn.bias, "):
        from_pretrained(tmp_path)


def test_shape_mismatch_is_named(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    copy_with_weights(folder, tmp_path, load_file(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_positions": 128}))
    with pytest.raises(ValueError, match=r"shape mismatch.*transformer.wpe.weight gives \(64, 64\) for "
                                         r"pos_emb.weight, which needs \(128, 64\)"):
        from_pretrained(tmp_path)


def test_loading_computes_nothing_for_the_weights_it_replaces(llama_folder, tiny_gguf):
    """The model is built as shapes only and filled: no random init, no RoPE table on the meta device (which
    would import torch's compiler stack, torch._dynamo and sympy: ~75 MiB); a model built this way is whole:
    its RoPE tables are those of a model built normally, and a Transformer built later is initialized."""
    import subprocess
    import sys
    code = ("import sys, torch; from minipeft.formats.pretrained import from_pretrained; "
            "from minipeft.core.model import Transformer, ModelConfig; "
            "model, _ = from_pretrained(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules, model.rope_cos.device.type, "
            "torch.equal(model.rope_cos, Transformer(model.cfg).rope_cos), "
            "Transformer(model.cfg).tok_emb.weight.std().item() > 0.01)")
    for path in (llama_folder[1], tiny_gguf[1]):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        assert out.stdout.split() == ["False", "cpu", "True", "True"], out.stderr
