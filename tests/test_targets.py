"""Target names: peft's module names (q_proj, c_attn, dense, ...) stand for the layers peft itself adapts
with them, and a mistyped target or method gets a "did you mean"."""
import pytest

import minipeft as mp
from minipeft.core import targets
from minipeft.formats.pretrained import HF_PREFIXES, hf_module_names
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.test_peft_format import ENCODER_MODELS, TINY_CONFIGS, hf_class  # noqa: E402 (needs both imported)

transformers.logging.set_verbosity_error()
pytestmark = [  # notes peft prints while it builds adapters (not about our code)
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]


def adapted_by_peft(flavor: str, name: str) -> set[str]:
    """Our targets of the modules peft wraps in layer 0 with target_modules=[name]."""
    model = hf_class(flavor, False)(TINY_CONFIGS[flavor]())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=[name]))
    body = "" if flavor in ENCODER_MODELS else HF_PREFIXES[flavor]
    held = {}  # a transformers module of layer 0 -> our targets in it (GPT-2's c_attn: q, k, v)
    for module, theirs in hf_module_names(flavor).items():
        if module.removeprefix("blocks.{i}.") in targets.TARGETS.values():
            held.setdefault(theirs.format(i=0), set()).add(module.rsplit(".", 1)[-1])
    names = {n.removeprefix("base_model.model.").removeprefix(body) for n, m in wrapped.named_modules()
             if hasattr(m, "lora_A")}
    return set().union(*(held[n] for n in names if n in held))


@pytest.mark.parametrize("flavor", list(targets.HF_MODULES))
def test_core_module_table_is_the_loaders(flavor):
    """core/targets.py's table of transformers' module names agrees with the weight-loading rules."""
    loaders = {module.removeprefix("blocks.{i}."): theirs.split("{i}.", 1)[-1]
               for module, theirs in hf_module_names(flavor).items() if module.startswith("blocks.{i}.")}
    assert set(targets.HF_MODULES[flavor]) == set(targets.present(tiny_config(flavor)))
    for target, module in targets.HF_MODULES[flavor].items():
        assert loaders[targets.TARGETS[target]] == module, (flavor, target)


@pytest.mark.parametrize("flavor", ["gpt2", "bert", "llama", "phi3", "distilbert"])
def test_peft_names_adapt_what_peft_adapts(flavor):
    cfg = tiny_config(flavor)
    names = targets.peft_names(flavor)
    assert names, flavor
    for name in names:
        assert set(targets.validate(cfg, [name])) == adapted_by_peft(flavor, name), (flavor, name)


def test_peft_names_apply_like_our_names():
    model = mp.apply(mp.Transformer(tiny_config("gpt2")), "lora", targets=["c_attn", "mlp.c_proj"])
    same = mp.apply(mp.Transformer(tiny_config("gpt2")), "lora", targets=["q", "k", "v", "down"])
    assert sorted(mp.trainable_state_dict(model)) == sorted(mp.trainable_state_dict(same))
    assert targets.validate(tiny_config("llama"), ["q_proj", "q", "down_proj"]) == ("q", "down")  # once each


def test_mistyped_targets_and_methods_get_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['q_prj'\] for a llama model \(did you mean "
                                         r"'q_proj'\?\); valid targets are: q, k, v, o, up, gate, down \(or 'all', or "
                                         r"peft's names: q_proj, k_proj"):
        mp.apply(mp.Transformer(tiny_config("llama")), "lora", targets=["q", "q_prj"])
    with pytest.raises(ValueError, match=r"unknown target\(s\) \['c_attn'\] for a llama model"):
        targets.validate(tiny_config("llama"), ["c_attn"])  # another family's name
    with pytest.raises(ValueError, match=r"unknown method 'lroa' \(did you mean 'lora'\?\); valid methods are"):
        mp.get_method("lroa")
