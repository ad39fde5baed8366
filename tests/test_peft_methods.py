"""peft's format for the LoRA family and the LyCORIS-style methods (DoRA, rsLoRA, PiSSA / OLoRA, IA³,
VeRA, LoHa, LoKr), both ways, against the real transformers + peft, with test_peft_format.py's tiny
models and helpers: an adapter trained a few steps on one side gives the same outputs on the other (within
1e-5 over real tokens), and comes back; exported, it gets the same gradient from peft for every tensor it
trains (within 1e-5 relative, test_peft_format.gradient_differences). With -s the module ends by printing
the largest differences it measured, method × family, as a Markdown table:

    python -m pytest tests/test_peft_methods.py -s -k "runs_in_peft or loads_into_minipeft"
"""
import json

import pytest
import torch

import minipeft as mp
from test_peft_format import (ATOL, GRADIENT_RTOL, batch, folders, gradient_differences, max_diff, ours_base,  # noqa: F401
                              ours_out, peft, peft_adapter, peft_forward, theirs_base, theirs_out, train)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

FIGURES = []  # table rows the round-trip tests add: (method, family, what, minipeft -> peft, back, gradients,
#               peft -> minipeft)


@pytest.fixture(scope="module", autouse=True)
def round_trip_table():
    """After the module's tests: the largest output differences they measured, as Markdown (seen with -s)."""
    yield
    if FIGURES:
        rows = ["| method | family | options / peft config | minipeft -> peft | back | gradients (relative) "
                "| peft -> minipeft |", "|---|---|---|---:|---:|---:|---:|"]
        rows += ["| " + " | ".join(f"{c:.1e}" if isinstance(c, float) else c for c in row) + " |" for row in FIGURES]
        print("\n" + "\n".join(rows))


TO_PEFT = [  # (base, method, options): trained here, run by peft, loaded back
    ("gpt2", "dora", dict(rank=4, alpha=8, targets="q,v,o")),  # the fused c_attn: block-structured, ‖W_k‖
    ("bert", "dora", dict(rank=4, alpha=8, targets="q,v", rslora=True)),
    ("llama", "dora", dict(rank=2, alpha=4, targets="all")),
    ("gpt2", "lora", dict(rank=4, alpha=8, targets="q,v", rslora=True)),  # fused with α' = √2·α
    ("gpt2", "lora", dict(rank=4, alpha=8, targets="o,up", init="pissa")),
    ("bert", "lora", dict(rank=4, alpha=8, targets="q,v", init="olora")),
    ("llama", "lora", dict(rank=4, alpha=8, targets="q,v,down", init="pissa", rslora=True)),
    ("gpt2", "ia3", {}),  # k, v scaled in the fused c_attn (q's rows 1), down's input
    ("bert", "ia3", dict(targets="k,v,o,down", feedforward="o,down")),
    ("llama", "ia3", dict(targets="all", feedforward="down,gate")),
    ("gpt2", "vera", dict(rank=16, targets="o,up,down")),
    ("bert", "vera", dict(rank=16, targets="q,v", projection_seed=3)),
    ("llama", "vera", dict(rank=16, targets="q,v,down", d_initial=0.5)),
    ("bert", "loha", dict(rank=2, alpha=4, targets="q,v,down")),
    ("llama", "loha", dict(rank=4, alpha=8, targets="all")),
    ("bert", "lokr", dict(rank=4, alpha=8, targets="q,v,up")),
    ("llama", "lokr", dict(rank=1, alpha=2, targets="all", decompose_both=True, decompose_factor=4)),
]


def to_peft_and_back(name, method, options, folders, ours_base, path) -> tuple[float, float, float, float]:
    """(ours vs base, ours vs peft, ours vs ours loaded back) largest differences, and the largest relative
    difference of a trainable tensor's gradient between ours and peft's."""
    model = train(mp.apply(ours_base(name), method, **options), ours_out)
    mp.save_adapter(model, path, format="peft")
    idx, mask = batch()
    with torch.no_grad():
        ours = ours_out(model, idx, mask)
        theirs = theirs_out(peft.PeftModel.from_pretrained(theirs_base(folders, name), path).eval(), idx, mask)
        base = theirs_out(theirs_base(folders, name), idx, mask)
        back = ours_out(mp.load_adapter(ours_base(name), path), idx, mask)
    gradients = max(gradient_differences(model, path, theirs_base(folders, name)).values())
    return max_diff(ours, base, mask), max_diff(ours, theirs, mask), max_diff(ours, back, mask), gradients


@pytest.mark.parametrize("name, method, options", TO_PEFT,
                         ids=[f"{n}-{m}-" + ",".join(map(str, o.values())) for n, m, o in TO_PEFT])
def test_minipeft_adapter_runs_in_peft_and_comes_back(name, method, options, folders, ours_base, tmp_path):
    moved, in_peft, back, gradients = to_peft_and_back(name, method, options, folders, ours_base, tmp_path / "a")
    FIGURES.append((method, name, ", ".join(f"{k}={v}" for k, v in options.items()), in_peft, back, gradients, ""))
    assert moved > 1e-3, "the adapter should change the outputs"
    assert in_peft < ATOL and back < ATOL
    assert gradients < GRADIENT_RTOL


FROM_PEFT = [  # (base, peft config): trained with peft, loaded here
    pytest.param("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True),
                 id="gpt2-dora-c_attn"),
    pytest.param("bert", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
                                                 use_rslora=True), id="bert-dora-rslora"),
    pytest.param("llama", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True),
                 id="llama-dora-all"),
    pytest.param("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="pissa"),
                 id="gpt2-pissa-c_attn"),
    pytest.param("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights="olora"), id="llama-olora"),
    pytest.param("bert", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                 init_lora_weights="gaussian"), id="bert-lora-gaussian"),
    pytest.param("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights="mica"), id="llama-lora-mica"),  # a plain LoRA
    pytest.param("gpt2", lambda: peft.IA3Config(), id="gpt2-ia3-default"),
    pytest.param("bert", lambda: peft.IA3Config(), id="bert-ia3-default"),
    pytest.param("llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]), id="llama-ia3"),
    pytest.param("gpt2", lambda: peft.VeraConfig(r=16, target_modules=["c_proj", "c_fc"]), id="gpt2-vera"),
    pytest.param("bert", lambda: peft.VeraConfig(r=8, target_modules=["query", "value"], projection_prng_key=5),
                 id="bert-vera"),
    pytest.param("llama", lambda: peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], d_initial=0.3),
                 id="llama-vera"),
    pytest.param("bert", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["query", "value"]), id="bert-loha"),
    pytest.param("llama", lambda: peft.LoHaConfig(r=4, alpha=8, target_modules="all-linear"), id="llama-loha"),
    pytest.param("bert", lambda: peft.LoKrConfig(r=1, alpha=4, target_modules=["query", "value"], decompose_both=True),
                 id="bert-lokr"),
    pytest.param("llama", lambda: peft.LoKrConfig(r=8, alpha=8, target_modules="all-linear", decompose_factor=4),
                 id="llama-lokr"),
]


def from_peft(name, make_config, folders, ours_base, path) -> tuple[float, float]:
    """(ours vs base, ours vs peft) largest differences for an adapter peft trained."""
    torch.manual_seed(0)
    config = make_config()
    config.task_type = "FEATURE_EXTRACTION" if name == "bert" else "CAUSAL_LM"
    trained = train(peft.get_peft_model(theirs_base(folders, name), config), peft_forward)
    trained.save_pretrained(path)
    model = mp.load_adapter(ours_base(name), path)
    idx, mask = batch()
    with torch.no_grad():
        theirs = peft_forward(trained, idx, mask)
        ours = ours_out(model, idx, mask)
        base = ours_out(ours_base(name), idx, mask)
    return max_diff(ours, base, mask), max_diff(ours, theirs, mask)


@pytest.mark.parametrize("name, make_config", FROM_PEFT)
def test_peft_adapter_loads_into_minipeft(name, make_config, folders, ours_base, tmp_path, request):
    moved, difference = from_peft(name, make_config, folders, ours_base, tmp_path / "a")
    config = request.node.callspec.id
    FIGURES.append((config.split("-")[1], name, f"peft: {config}", "", "", "", difference))
    assert moved > 1e-3, "the adapter should change the outputs"
    assert difference < ATOL


def test_vera_matrices_are_peft_s(folders, ours_base, tmp_path):
    """The same seed draws the same shared matrices as peft's projection_prng_key (saved by peft)."""
    peft_adapter(folders, tmp_path / "a", "llama", peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"],
                                                                   projection_prng_key=11))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    model = mp.apply(ours_base("llama"), "vera", rank=8, targets="q,down", projection_seed=11)
    shared = model.blocks[0].attn.q.projections
    assert torch.equal(shared.A, saved["base_model.vera_A"]) and torch.equal(shared.B, saved["base_model.vera_B"])
    assert shared is model.blocks[1].mlp.down.projections  # one pair for the whole model


@pytest.mark.parametrize("name, method, options, message", [
    ("gpt2", "vera", dict(targets="q,v"), "adapts q, k, v as one module"),
    ("gpt2", "loha", dict(targets="o"), "not GPT-2's Conv1D"),  # peft's LyCORIS layers are nn.Linear only
    ("gpt2", "lokr", dict(targets="up"), "not GPT-2's Conv1D"),
    ("gpt2", "ia3", dict(targets="q,down", feedforward="q"), "adapts q, k, v as one module"),
    ("gpt2", "lora", dict(targets="q,v", init="pissa"), "gpt2's fused c_attn .* peft factorizes q, k, v as one matrix"),
    ("phi3", "lora", dict(targets="q,o", init="pissa"), "phi3's fused qkv_proj .*; use targets o, down, or"),
    ("gpt2", "lora", dict(targets="o", init="olora"), "factorizes GPT-2's Conv1D weights transposed"),
])
def test_what_cannot_be_exact_is_refused(name, method, options, message, ours_base, tmp_path):
    with pytest.raises(ValueError, match=message):
        mp.save_adapter(mp.apply(ours_base(name), method, **options), tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, make_config, message", [
    ("gpt2", lambda: peft.VeraConfig(r=8, target_modules=["c_attn"]), "adapts q, k, v as one module"),
    ("llama", lambda: peft.LoHaConfig(target_modules=["q_proj"], rank_dropout=0.1), "uses rank dropout"),
    ("llama", lambda: peft.LoKrConfig(target_modules=["q_proj"], module_dropout=0.1), "uses module dropout"),
    ("llama", lambda: peft.LoKrConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
     "per-module ranks"),
    ("gpt2", lambda: peft.LoraConfig(target_modules=["c_fc"], init_lora_weights="pissa_niter_4"), "pissa_niter_4"),
    ("gpt2", lambda: peft.LoraConfig(target_modules=["c_fc"], init_lora_weights="olora"), "olora"),
    ("gpt2", lambda: peft.IA3Config(target_modules=["c_attn"], feedforward_modules=["c_attn"]), "as one module"),
    ("gpt2", lambda: peft.AdaLoraConfig(total_step=10, target_modules=["c_attn"]), "peft ADALORA adapter"),
    ("llama", lambda: peft.LoraConfig(target_modules=["q_proj", "v_proj"], use_bdlora=peft.BdLoraConfig(
        target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2)), "uses block-diagonal LoRA"),
    ("llama", lambda: peft.LoraConfig(target_modules=["q_proj"], kasa_config=peft.KasaConfig()), "uses KaSA"),
], ids=["vera-c_attn", "loha-rank-dropout", "lokr-module-dropout", "lokr-rank-pattern", "pissa-niter",
        "olora-gpt2", "ia3-c_attn-input", "adalora", "bdlora", "kasa"])
def test_peft_adapters_we_cannot_reproduce_are_refused(name, make_config, message, folders, ours_base, tmp_path):
    peft_adapter(folders, tmp_path / "a", name, make_config())
    model = ours_base(name)
    with pytest.raises(ValueError, match=message):
        mp.load_adapter(model, tmp_path / "a")
    assert model.peft_config is None and not any(p.requires_grad is False for p in model.parameters())


def test_dora_export_writes_use_dora_and_magnitudes(ours_base, tmp_path):
    model = train(mp.apply(ours_base("llama"), "dora", rank=2, targets="q,v"), ours_out)
    mp.save_adapter(model, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    back = mp.load_adapter(ours_base("llama"), tmp_path / "a")
    assert back.peft_config["method"] == "dora"
    assert torch.equal(back.blocks[1].attn.v.magnitude, model.blocks[1].attn.v.magnitude)
