"""Several adapters on one base model (methods/multi.py): loading by name in either format, switching,
one adapter per row of a batch, saving any one of them, and the bad input that must change nothing."""
import pytest
import torch

import minipeft as mp
from minipeft.extras import multi
from conftest import perturb_trainable, tiny_batch, tiny_model

SIDE_BY_SIDE = {"l": ("lora", {"targets": ["q", "v"]}), "d": ("dora", {"rank": 2, "targets": ["k", "o"]}),
                "i": ("ia3", {}), "v": ("vera", {"rank": 8, "targets": ["q", "up"]}),
                "h": ("loha", {"rank": 2, "targets": ["v"]}), "k": ("lokr", {"rank": 2, "targets": ["down"]})}


def saved_adapters(flavor, tmp_path, names=SIDE_BY_SIDE, fmt="minipeft") -> dict:
    """name -> (folder of a trained adapter, the single-adapter model that made it)."""
    out = {}
    for seed, (name, (method, options)) in enumerate(names.items()):
        model = mp.apply(tiny_model(flavor), method, **options)
        perturb_trainable(model, seed=seed)
        mp.save_adapter(model, tmp_path / name, format=fmt)
        out[name] = (tmp_path / name, model.eval())
    return out


def output(model, idx, mask, **kw):
    return model.encode(idx, attention_mask=mask, **kw) if model.cfg.flavor == "bert" else \
        model(idx, attention_mask=mask, **kw)


@pytest.mark.parametrize("flavor", ["gpt2", "bert", "llama"])
def test_each_row_runs_its_own_adapter(flavor, tmp_path):
    adapters = saved_adapters(flavor, tmp_path)
    model = tiny_model(flavor)
    for name, (folder, _) in adapters.items():
        mp.load_adapter(model, folder, name=name)
    model.eval()
    names = [*adapters, "base", "l", "k"]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1, 97, (len(names), 10), generator=g)
    mask = torch.ones_like(idx)
    mask[2, 6:] = 0
    mixed = output(model, idx, mask, adapter_names=names)
    base = tiny_model(flavor).eval()
    for row, name in enumerate(names):
        alone = base if name == "base" else adapters[name][1]
        expected = output(alone, idx[row:row + 1], mask[row:row + 1])[0]
        torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=0, msg=f"row {row} ({name})")
    # without adapter_names every row runs the active adapter (the first loaded), as set_adapter changes it
    torch.testing.assert_close(output(model, idx, mask), output(adapters["l"][1], idx, mask), atol=1e-6, rtol=0)
    mp.set_adapter(model, "v")
    torch.testing.assert_close(output(model, idx, mask), output(adapters["v"][1], idx, mask), atol=1e-6, rtol=0)


def test_peft_folders_load_by_name_and_every_adapter_saves_as_if_alone(tmp_path):
    names = {"l": SIDE_BY_SIDE["l"], "i": SIDE_BY_SIDE["i"], "d": SIDE_BY_SIDE["d"]}
    adapters = saved_adapters("llama", tmp_path, names, fmt="peft")
    model = tiny_model("llama")
    for name, (folder, _) in adapters.items():
        mp.load_adapter(model, folder, name=name)
    assert multi.adapter_names(model) == ["l", "i", "d"] and model.peft_config["method"] == "lora"
    idx, mask = tiny_batch()
    for name, (_, alone) in adapters.items():
        mp.save_adapter(model, tmp_path / f"again-{name}", name=name)
        fresh = mp.load_adapter(tiny_model("llama"), tmp_path / f"again-{name}")
        assert fresh.peft_config["method"] == alone.peft_config["method"]
        torch.testing.assert_close(fresh.eval()(idx, attention_mask=mask), alone(idx, attention_mask=mask),
                                   atol=1e-6, rtol=0)
    assert model.peft_config["method"] == "lora"  # saving another adapter leaves the active one active


def test_only_the_active_adapter_trains(tmp_path):
    adapters = saved_adapters("gpt2", tmp_path, {"a": ("lora", {}), "b": ("lora", {"targets": ["q", "o"]})})
    model = mp.apply(tiny_model("gpt2"), "dora", rank=2)  # applied the usual way: it becomes "default"
    for name, (folder, _) in adapters.items():
        mp.load_adapter(model, folder, name=name)
    assert multi.adapter_names(model) == ["default", "a", "b"] and model.peft_config["method"] == "dora"
    mp.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.b." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx, mask = tiny_batch()
    model(idx, attention_mask=mask, adapter_names=["a", "b", "default"]).square().mean().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


def test_checkpointing_recomputes_with_the_same_rows(tmp_path):
    adapters = saved_adapters("llama", tmp_path, {"a": ("lora", {}), "b": ("ia3", {})})
    model = tiny_model("llama")
    for name, (folder, _) in adapters.items():
        mp.load_adapter(model, folder, name=name)
    model.train()
    idx, mask = tiny_batch()
    grads = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        model.zero_grad()
        model(idx, attention_mask=mask, adapter_names=["b", "a", "base"]).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_one_adapter_loaded_by_name_merges_as_if_alone(tmp_path):
    """Merging is refused only while several adapters share the base: one loaded by name merges, and the
    merged model gives the outputs of the model that trained it."""
    (folder, alone), = saved_adapters("llama", tmp_path, {"a": ("lora", {"targets": ["all"]})}).values()
    model = tiny_model("llama")
    mp.load_adapter(model, folder, name="a")
    idx, mask = tiny_batch()
    mp.merge(model)
    torch.testing.assert_close(output(model.eval(), idx, mask), output(alone, idx, mask), atol=1e-6, rtol=0)


def test_bad_input_changes_nothing(tmp_path):
    adapters = saved_adapters("gpt2", tmp_path, {"a": ("lora", {}), "b": ("ia3", {})})
    model = tiny_model("gpt2")
    mp.load_adapter(model, adapters["a"][0], name="a")
    mp.load_adapter(model, adapters["b"][0], name="b")
    idx, mask = tiny_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter_names has 2 names for a batch of 3 rows"):
        model(idx, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\] in adapter_names; loaded: a, b"):
        model(idx, adapter_names=["a", "c", "base"])
    with pytest.raises(ValueError, match=r"one adapter name \(a string\) per row .*; None is not a name"):
        model(idx, adapter_names=[None, "c", "base"])  # was sorted()'s TypeError on None and 'c'
    with pytest.raises(ValueError, match="a list of adapter names, one per row .* not a value of type str"):
        model(idx, adapter_names="aab")  # was read letter by letter
    with pytest.raises(ValueError, match="unknown adapter 'c'; loaded: a, b"):
        mp.set_adapter(model, "c")
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        mp.save_adapter(model, tmp_path / "x", name="c")
    with pytest.raises(ValueError, match="has an adapter named 'a' already"):
        mp.load_adapter(model, adapters["b"][0], name="a")
    prefix = mp.apply(tiny_model("gpt2"), "prefix", length=2)
    mp.save_adapter(prefix, tmp_path / "p")
    with pytest.raises(ValueError, match="is prefix, which cannot share a base model"):
        mp.load_adapter(model, tmp_path / "p", name="p")
    pissa = mp.apply(tiny_model("gpt2"), "lora", init="pissa")
    mp.save_adapter(pissa, tmp_path / "s")
    with pytest.raises(ValueError, match="rewrote the base weights"):
        mp.load_adapter(model, tmp_path / "s", name="s")
    with pytest.raises(ValueError, match="trained on another base model"):
        other = mp.apply(tiny_model("gpt2", seed=5), "lora")
        mp.save_adapter(other, tmp_path / "o")
        mp.load_adapter(model, tmp_path / "o", name="o")
    with pytest.raises(ValueError, match="2 adapters side by side"):
        mp.merge(model)
    assert multi.adapter_names(model) == ["a", "b"] and model.adapters.active == "a"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()
    with pytest.raises(ValueError, match="classifier head is each adapter's own"):
        mp.load_adapter(tiny_model("gpt2", n_classes=2), adapters["a"][0], name="a")
    with pytest.raises(ValueError, match="adapter_names needs adapters loaded side by side"):
        tiny_model("gpt2")(idx, adapter_names=["a", "a", "a"])


def test_generate_runs_each_row_with_its_own_adapter(tmp_path):
    """As peft's generate(adapter_names=...): prompts that share their start (whose keys would otherwise be
    computed once, under one adapter) each continue as their adapter alone continues them."""
    from minipeft.core.generate import generate
    adapters = saved_adapters("llama", tmp_path, names={n: SIDE_BY_SIDE[n] for n in ("l", "d", "h")})
    model = tiny_model("llama")
    for name, (folder, _) in adapters.items():
        mp.load_adapter(model, folder, name=name)
    names = ["h", "base", "l", "d"]
    prompts = [[5, 6, 7, 8 + row] for row in range(len(names))]
    mixed = generate(model.eval(), prompts, 6, adapter_names=names)
    base = tiny_model("llama").eval()
    alone = [generate(base if n == "base" else adapters[n][1], [p], 6)[0] for n, p in zip(names, prompts)]
    assert mixed == alone and len({tuple(a) for a in alone}) > 1
