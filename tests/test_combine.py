"""combine_adapters (methods/combine.py) against peft's add_weighted_adapter on the same LoRA adapters:
the same outputs for linear, cat, svd and ties, and for DARE given the same masks; and its bad input."""
import pytest
import torch

import minipeft as mp
from minipeft.extras import combine, multi
from test_peft_format import batch, folders, max_diff, ours_base, ours_out, peft, theirs_base, theirs_out, train  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ADAPTERS = {"a": dict(rank=4, alpha=8, targets="q,v"), "b": dict(rank=4, alpha=16, targets="v,down", rslora=True),
            "c": dict(rank=2, alpha=4, targets="q,o")}
WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, folders, ours_base):
    """name -> base -> a peft folder of a LoRA trained a few steps here (the same tensors for both libraries)."""
    out = {}
    for base in ("bert", "llama"):
        for i, (name, options) in enumerate(ADAPTERS.items()):
            torch.manual_seed(i)
            model = train(mp.apply(ours_base(base), "lora", **options), ours_out)
            path = tmp_path_factory.mktemp(f"{base}-{name}")
            mp.save_adapter(model, path, format="peft")
            out[(base, name)] = path
    return out


def both(base, names, saved, folders, ours_base):
    ours = ours_base(base)
    theirs = None
    for name in names:
        mp.load_adapter(ours, saved[(base, name)], name=name)
        if theirs is None:
            theirs = peft.PeftModel.from_pretrained(theirs_base(folders, base), saved[(base, name)], adapter_name=name)
        else:
            theirs.load_adapter(saved[(base, name)], adapter_name=name)
    return ours.eval(), theirs.eval()


def compare(ours, theirs, name) -> float:
    mp.set_adapter(ours, name)
    theirs.set_adapter(name)
    idx, mask = batch()
    with torch.no_grad():
        return max_diff(ours_out(ours, idx, mask), theirs_out(theirs, idx, mask), mask)


CASES = [("linear", ["a", "b"], None, None), ("cat", ["a", "b", "c"], None, None), ("svd", ["a", "b", "c"], None, None),
         ("svd", ["c", "a"], None, 3), ("ties", ["a", "b"], 0.5, None), ("linear", ["c"], None, None),
         # one adapter: linear whatever the mode, so svd's rank and ties' density are not read
         ("svd", ["a"], None, 8), ("ties", ["c"], None, None)]


@pytest.mark.parametrize("base", ["bert", "llama"])
@pytest.mark.parametrize("how, names, density, rank", CASES, ids=[f"{h}-{''.join(n)}-{r}" for h, n, _, r in CASES])
def test_combination_equals_peft_s(base, how, names, density, rank, saved, folders, ours_base):
    ours, theirs = both(base, names, saved, folders, ours_base)
    weights = [WEIGHTS[n] for n in names]
    mp.combine_adapters(ours, names, weights, name="mix", how=how, density=density, rank=rank)
    theirs.add_weighted_adapter(names, weights, "mix", combination_type=how, density=density, svd_rank=rank)
    assert ours.adapters.configs["mix"]["options"]["rank"] == theirs.peft_config["mix"].r
    assert compare(ours, theirs, "mix") < 1e-5
    assert compare(ours, theirs, names[0]) < 1e-5  # the inputs are untouched


def fixed_mask(tensor, density):
    """A 'random' mask that depends only on the values, so both libraries draw the same one."""
    return ((tensor.abs() * 1e7).long() % 97 < density * 97).to(tensor.dtype)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_s_given_the_same_masks(how, saved, folders, ours_base, monkeypatch):
    monkeypatch.setattr(combine, "dare_mask", fixed_mask)
    monkeypatch.setattr(peft.utils.merge_utils, "random_pruning",
                        lambda tensor, density, rescale: tensor * fixed_mask(tensor, density) / density)
    ours, theirs = both("llama", ["a", "b"], saved, folders, ours_base)
    mp.combine_adapters(ours, ["a", "b"], [0.6, 0.9], name="mix", how=how, density=0.4)
    theirs.add_weighted_adapter(["a", "b"], [0.6, 0.9], "mix", combination_type=how, density=0.4)
    assert compare(ours, theirs, "mix") < 1e-5


def test_cat_is_the_weighted_sum_exactly(saved, ours_base, tmp_path):
    """Also with an rsLoRA adapter first, whose α/√r scale peft 0.21 gives the new adapter (√10 times too strong)."""
    model = ours_base("llama")
    for name in ("b", "a", "c"):
        mp.load_adapter(model, saved[("llama", name)], name=name)
    weights = {"b": -0.4, "a": 0.5, "c": 2.0}
    mp.combine_adapters(model, list(weights), list(weights.values()), name="bac", how="cat")
    for target in ("q", "v"):  # q: a and c; v: b and a
        layers = getattr(model.blocks[1].attn, target).layers
        expected = sum(w * layers[n].delta_weight() for n, w in weights.items() if n in layers)
        torch.testing.assert_close(layers["bac"].delta_weight(), expected, atol=1e-7, rtol=0)
    mp.save_adapter(model, tmp_path / "bac", name="bac")  # a combination saves and loads like any LoRA
    alone = mp.load_adapter(ours_base("llama"), tmp_path / "bac")
    options = alone.peft_config["options"]
    assert options["rank"] == 10 and options["targets"] == ["q", "v", "o", "down"] and not options["rslora"]
    idx, mask = batch()
    with torch.no_grad():
        assert max_diff(ours_out(alone, idx, mask), ours_out(mp.set_adapter(model, "bac"), idx, mask), mask) < 1e-6


def test_what_does_not_fit_is_refused(saved, ours_base, tmp_path):
    model = ours_base("llama")
    for name in ("a", "c"):
        mp.load_adapter(model, saved[("llama", name)], name=name)
    ia3 = mp.apply(ours_base("llama"), "ia3")
    mp.save_adapter(ia3, tmp_path / "i")
    mp.load_adapter(model, tmp_path / "i", name="i")
    cases = [(dict(names=["a", "c"], weights=[1, 1], how="linear"), "needs adapters of one rank"),
             (dict(names=["a", "i"], weights=[1, 1], how="cat"), "adapter 'i' is ia3"),
             (dict(names=["a", "x"], weights=[1, 1]), "unknown adapter 'x'"),
             (dict(names=["a", "c"], weights=[1]), "one weight per adapter"),
             (dict(names=["a", "c"], weights=[1, 1], how="ties"), "needs a density in"),
             (dict(names=["a", "c"], weights=[1, 1], how="mean"), "unknown how 'mean'"),
             (dict(names=["a", "c"], weights=[1, 1], how="cat", name="a"), "named 'a' already"),
             (dict(names="ac", weights=[1, 1], how="cat"), "names is a list of adapter names, not 'ac'"),
             (dict(names=["a", "c"], weights=[float("nan"), 1], how="cat"), "must be finite numbers"),
             (dict(names=["a", "c"], weights=[None, 1], how="cat"), "weights is a list of numbers"),
             (dict(names=["a", "c"], weights=[1, 1], how="svd", rank=2.5), "a whole number >= 1"),
             (dict(names=["a", "a"], weights=[1, 1], how="ties", density="0.5"), "needs a density in")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            mp.combine_adapters(model, **{"name": "new", **kwargs})
    assert multi.adapter_names(model) == ["a", "c", "i"]
    with pytest.raises(ValueError, match="no adapters loaded by name"):
        mp.combine_adapters(mp.apply(ours_base("llama"), "lora"), ["default"], [1.0], name="x")
