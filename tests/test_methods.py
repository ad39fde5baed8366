"""The conformance suite: every registered method, with every example option set it declares, × every
flavour it supports × LM and classifier heads, checked against what the method declares (exact at
init, mergeable, its parameter-count formula). A new method is tested here just by registering it
(DESIGN.md, "Tests that every method must pass"); a method in a file of your own joins with
`--method-file FILE` (tests/conftest.py). Which combinations run by default, and which only under
`-m exhaustive`, conftest.conformance_cases says."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minipeft as mp
from minipeft.formats import adapter_io
from minipeft.core import adapted
from minipeft.core import loop
from minipeft.core import registry
from conftest import (FLAVORS, build, case_params, conformance_cases, example_options, loss_of, perturb_trainable,
                      tiny_batch, tiny_model, tiny_tokenizer)

CASES = case_params()
ROOT = Path(__file__).resolve().parent.parent
WARMUPS = ("none", "no_grad", "eval")


def warmup_params():
    """Every case without a warm-up pass; the two warm-ups on each method's defaults with the LM head
    (the rest under `exhaustive`)."""
    params = []
    for case in conformance_cases(exhaustive=True):
        for warmup in WARMUPS:
            marks = () if case in conformance_cases() and (warmup == "none" or case[1] == 0 and case[3] == "lm") \
                else (pytest.mark.exhaustive,)
            params.append(pytest.param(*case, warmup, id=f"{case[0]}{case[1]}-{case[2]}-{case[3]}-{warmup}",
                                       marks=marks))
    return params


def applied_options(model) -> dict:
    return model.peft_config["options"]


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_output_equals_base_at_init(method, example, flavor, head):
    """Right after apply the output is the base model's exactly where the method promises it; where it
    does not (virtual tokens, a 4-bit base) the output differs, so the promise is not merely left out."""
    idx, mask = tiny_batch()
    base = tiny_model(flavor, n_classes=2 if head == "classifier" else None).eval()
    adapted = build(method, example, flavor, head).eval()
    same = torch.equal(adapted(idx, attention_mask=mask), base(idx, attention_mask=mask))
    assert same == mp.METHODS[method].exact_at_init


@pytest.mark.parametrize("method, example, flavor, head, warmup_pass", warmup_params())
def test_exactly_the_trainable_parameters_get_gradients(method, example, flavor, head, warmup_pass):
    model = build(method, example, flavor, head)
    perturb_trainable(model)
    idx, mask = tiny_batch()
    if warmup_pass == "no_grad":
        with torch.no_grad():
            model(idx, attention_mask=mask)
    elif warmup_pass == "eval":
        model.eval()
        model(idx, attention_mask=mask)
        model.train()
    loss_of(model, idx, mask).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_trainable_count_matches_formula(method, example, flavor, head):
    model = build(method, example, flavor, head)
    assert model.num_parameters(trainable_only=True) == adapted.expected_trainable_parameters(model)
    assert set(mp.trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_options_are_recorded_complete(method, example, flavor, head):
    """peft_config holds every declared option (defaults filled in), typed as declared."""
    spec = mp.METHODS[method]
    options = applied_options(build(method, example, flavor, head))
    assert set(options) == set(spec.defaults)
    for option in spec.options:
        assert options[option.name] is None or isinstance(options[option.name], option.type)
        assert options[option.name] == example_options(method, example).get(option.name, option.default)


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_frozen_parameters_bit_identical_after_a_step(method, example, flavor, head):
    model = build(method, example, flavor, head)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    idx, mask = tiny_batch()
    for _ in range(2):
        loss_of(model, idx, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} moved"
    for name, before in buffers.items():
        assert torch.equal(dict(model.named_buffers())[name], before), f"buffer {name} moved"
    assert any(not torch.equal(params[n], v) for n, v in trainable.items()), "nothing trained"


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_with_dropout_only_the_trainable_parameters_learn(method, example, flavor, head):
    """Items 2 and 3 in training mode with dropout 0.1 (model.Dropout, attention written out, the
    method's own dropout where it has one): every trainable parameter gets a gradient, nothing frozen
    does, and the frozen weights stay bit-identical through AdamW steps."""
    model = tiny_model(flavor, n_classes=2 if head == "classifier" else None, dropout=0.1)
    options = example_options(method, example)
    if "dropout" in mp.METHODS[method].defaults:
        options["dropout"] = 0.1
    mp.apply(model, method, tokenizer=tiny_tokenizer(), **options)
    perturb_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    idx, mask = tiny_batch()
    torch.manual_seed(0)
    for _ in range(2):
        loss_of(model.train(), idx, mask).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            else:
                assert p.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} moved"


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_new_tensors_go_where_the_model_is(method, example, flavor, head):
    """Every parameter and buffer a method adds sits on the device of the weights it adapts (on a GPU model,
    the GPU). The meta device stands in for a second device: nothing is computed on it, and any tensor a
    method left on the CPU shows."""
    model = tiny_model(flavor, n_classes=2 if head == "classifier" else None).to("meta")
    mp.apply(model, method, tokenizer=tiny_tokenizer(), **example_options(method, example))
    elsewhere = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not elsewhere, f"on the CPU, not with the model: {elsewhere}"


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_save_load_roundtrip(method, example, flavor, head, tmp_path):
    model = build(method, example, flavor, head)
    perturb_trainable(model)
    mp.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / adapter_io.ADAPTER_WEIGHTS))
    assert set(saved) == set(mp.trainable_state_dict(model))
    fresh = tiny_model(flavor, n_classes=2 if head == "classifier" else None)
    mp.load_adapter(fresh, tmp_path / "adapter", tokenizer=tiny_tokenizer())
    assert fresh.peft_config == model.peft_config
    idx, mask = tiny_batch()
    model.eval(), fresh.eval()
    assert torch.equal(fresh(idx, attention_mask=mask), model(idx, attention_mask=mask))


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_merge(method, example, flavor, head):
    model = build(method, example, flavor, head).eval()
    if not mp.METHODS[method].mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            mp.merge(model)
        return
    perturb_trainable(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    idx, mask = tiny_batch()
    unmerged = model(idx, attention_mask=mask)
    mp.merge(model)
    torch.testing.assert_close(model(idx, attention_mask=mask), unmerged, atol=1e-5, rtol=0)
    mp.unmerge(model)
    params = dict(model.named_parameters())
    for name, before in base.items():
        torch.testing.assert_close(params[name], before, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(idx, attention_mask=mask), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_padded_batch_equals_rows_alone(method, example, flavor, head):
    model = build(method, example, flavor, head).eval()
    perturb_trainable(model)
    idx, mask = tiny_batch()
    batched = model(idx, attention_mask=mask)
    for row in range(idx.shape[0]):
        n = int(mask[row].sum())
        alone = model(idx[row:row + 1, :n])[0]
        torch.testing.assert_close(batched[row] if head == "classifier" else batched[row, :n], alone,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, example, flavor, head",
                         case_params(flavors=("gpt2", "llama"), heads=("lm",)))
def test_cached_generation_matches_uncached(method, example, flavor, head):
    model = build(method, example, flavor, head).eval()
    perturb_trainable(model)
    idx, _ = tiny_batch(B=1, T=6)
    cached = model.generate(idx, 12)
    assert torch.equal(cached, model.generate(idx, 12, use_cache=False))
    assert cached.shape == (1, 18)


def test_every_option_has_a_type_help_and_a_valid_default():
    for method in mp.METHODS.values():
        assert method.examples and method.examples[0] == {}, f"{method.name}: example 0 is the defaults"
        for option in method.options:
            assert option.help, f"{method.name}.{option.name} has no help text"
            assert option.convert(option.default) == option.default


def test_registry_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"unknown method 'lorax' \(did you mean 'lora'\?\); valid methods are: full"):
        mp.apply(model, "lorax")
    with pytest.raises(ValueError, match="unknown option.*'rnak'.*its options are: rank, alpha"):
        mp.apply(model, "lora", rnak=4)
    with pytest.raises(ValueError, match="option 'rank' takes an integer, not 'four'"):
        mp.apply(model, "lora", rank="four")
    with pytest.raises(ValueError, match="option 'rank' takes an integer, not 2.5"):
        mp.apply(model, "lora", rank=2.5)
    with pytest.raises(ValueError, match="unknown kind 'lowrank'; choose one of houlsby, pfeiffer"):
        mp.apply(model, "adapter", kind="lowrank")
    with pytest.raises(ValueError, match="bitfit.*does not fit a llama model"):
        mp.apply(model, "bitfit")
    mp.apply(model, "lora")
    with pytest.raises(ValueError, match="already has method 'lora'"):
        mp.apply(model, "lora")


def test_option_text_converts_to_the_declared_type():
    options = {o.name: o for o in mp.METHODS["qlora"].options}
    assert options["rank"].convert("4") == 4
    assert options["alpha"].convert("8") == 8.0 and isinstance(options["alpha"].convert(8), float)
    assert options["targets"].convert("q, v,down") == ["q", "v", "down"]
    assert options["targets"].convert(("q", "v")) == ["q", "v"]
    for words, value in ((("true", "Yes", "1"), True), (("FALSE", "no", "0"), False)):
        assert all(options["double_quant"].convert(word) is value for word in words)
    init_text = next(o for o in mp.METHODS["prompt"].options if o.name == "init_text")
    assert init_text.convert("42") == "42"  # text stays text, whatever it looks like
    with pytest.raises(ValueError, match="takes true or false"):
        options["double_quant"].convert("maybe")
    for value in (float("nan"), "inf", -math.inf):  # the Python API refuses them as the command line does
        with pytest.raises(ValueError, match="option 'alpha' takes a finite number"):
            options["alpha"].convert(value)
    with pytest.raises(ValueError, match="lora: option 'dropout' takes a finite number, not nan"):
        mp.apply(tiny_model("llama"), "lora", dropout=float("nan"))


def test_register_refuses_a_clash():
    with pytest.raises(ValueError, match="registered already"):
        mp.register(mp.Method("lora", "again", lambda model: None, lambda cfg: 0))
    with pytest.raises(ValueError, match="option 'rank' of 'clash' is str, but 'lora' declares it int"):
        mp.register(mp.Method("clash", "a rank of another type", lambda model, rank: None,
                              lambda cfg, rank: 0, (mp.Option("rank", str, "8", "rank as text"),)))
    assert "clash" not in mp.METHODS
    with pytest.raises(ValueError, match="unknown option"):  # an example must use declared options
        mp.Method("typo", "bad example", lambda model: None, lambda cfg: 0, examples=({}, {"rnak": 2}))


@pytest.mark.parametrize("first", ["lora", "qlora", "selective"])
def test_methods_keep_their_order_whichever_file_is_imported_first(first):
    """A reader's `from minipeft.core.lora import LoRALinear` registers LoRA alone; the other built-ins join
    later, in the registry's order (train.py --list-methods prints it)."""
    code = (f"import minipeft.core.{first}; from minipeft.core import registry; "
            "print(list(registry.methods()) == list(registry.BUILT_IN))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "True", done.stderr


def test_a_users_method_is_checked_against_every_built_in_one():
    """Registering a method of one's own loads the built-ins first (so an option clash with one not yet
    loaded is caught, and the built-ins keep their places in front); asking for one built-in loads its
    file alone."""
    code = ("import sys, minipeft as mp; from minipeft.core import registry; mp.get_method('lora'); "
            "print(sorted(m for m in sys.modules if m.startswith('minipeft.core.') and m.split('.')[-1] in "
            "set(registry.BUILT_IN.values()))); "
            "mp.register(mp.Method('mine', 'mine', lambda model, alpha: None, lambda cfg, alpha: 0, "
            "(mp.Option('alpha', float, 1.0, 'a scale'),))); print(list(registry.METHODS)[-1], len(registry.METHODS)); "
            "mp.register(mp.Method('clash', 'clash', lambda model, blocksize: None, lambda cfg, blocksize: 0, "
            "(mp.Option('blocksize', str, '64', 'as text'),)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    loaded, registered = done.stdout.splitlines()
    assert loaded == "['minipeft.core.lora']"
    assert registered == f"mine {len(registry.BUILT_IN) + 1}"  # after every built-in
    assert "option 'blocksize' of 'clash' is str, but 'qlora' declares it int" in done.stderr


def test_a_failed_apply_leaves_the_model_as_it_was():
    """A method that refuses its options after the base was frozen unfreezes it again: the model trains
    as before and takes a method."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown target"):
        mp.apply(model, "lora", targets=["nope"])
    assert all(p.requires_grad for p in model.parameters()) and not model.peft_config
    mp.apply(model, "lora")


def test_adapter_from_another_base_model_is_refused(tmp_path):
    model = mp.apply(tiny_model("gpt2", seed=0), "lora")
    mp.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="trained on another base model"):
        mp.load_adapter(tiny_model("gpt2", seed=1), tmp_path / "a")


def fingerprint_of(vocab_size=1024, changed_row=None, **config):
    """base_fingerprint of a llama-shaped model whose token embedding holds fixed values (row changed_row
    altered), independent of any random generator."""
    from minipeft.core.fingerprint import base_fingerprint
    model = mp.Transformer(mp.ModelConfig(**{**dict(flavor="llama", vocab_size=vocab_size, n_layer=2, n_head=4,
                                                    d_model=32, max_seq_len=64), **config}))
    with torch.no_grad():
        weight = model.tok_emb.weight
        weight.copy_(torch.arange(weight.numel()).view_as(weight) % 251 / 251)
        if changed_row is not None:
            weight[changed_row] += 1
    return base_fingerprint(model)


def test_the_fingerprint_tells_bases_apart_and_keeps_its_value():
    """The fingerprint hashes the sizes, any switch set unlike the family's row, and every (vocab // 256)-th
    row of the token embedding. Its value for a fixed model is written out: saved adapters hold fingerprints
    computed this way, and a change to how it is computed would refuse every one of them."""
    base = fingerprint_of()
    assert base == "c82c5c1af1c2a729"
    assert fingerprint_of(d_ff=64) != base and fingerprint_of(qkv_bias=True) != base  # a size, a switch
    assert fingerprint_of(changed_row=4) != base  # 1024 // 256 = 4: rows 0, 4, 8, ... are hashed
    assert fingerprint_of(changed_row=5) == base  # the others are not


def test_corrupt_adapter_is_refused(tmp_path):
    model = mp.apply(tiny_model("gpt2"), "lora")
    mp.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / adapter_io.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        mp.load_adapter(tiny_model("gpt2"), tmp_path / "a")
    (tmp_path / "a" / adapter_io.ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        mp.load_adapter(tiny_model("gpt2"), tmp_path / "a")


def test_flavors_cover_the_suite():
    assert {c[2] for c in conformance_cases()} == set(FLAVORS)
