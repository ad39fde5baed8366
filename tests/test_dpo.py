"""Preference tuning: `mp.adapters_disabled` (extras/disable.py), preference pairs (preference.py), the DPO
and IPO losses (extras/dpo.py) and `train.py --objective dpo`.

The reference everywhere is what users would otherwise run: the base model before mp.apply for
adapters_disabled (every method of mp.METHODS that can switch off, with its adapter moved off its init),
and trl's DPOTrainer with peft (its reference is the adapter disabled) for the tokenized pairs, the loss,
the rewards and the gradients of one step.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every base model is a local folder; never ask the hub

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import minipeft as mp
import eval as eval_cli
import train as train_cli
from minipeft.run import cli
from minipeft.core import loop
from minipeft.extras import dpo
from minipeft.formats import preference
from minipeft.formats.chat import PLAIN_TEMPLATE, chat_format
from minipeft.fast.losses import lm_loss
from minipeft.formats.pretrained import byte_tokenizer
from conftest import build, case_params, example_options, perturb_trainable, tiny_batch, tiny_model

ROOT = Path(__file__).resolve().parent.parent
PAD = 256  # the byte tokenizer's <|endoftext|>

# ------------------------------------------------------------------------------ adapters_disabled


def base_for(method: str, example: int, flavor: str, head: str):
    """The base model a method runs on, as it was before mp.apply: the same tiny model (QLoRA: its 4-bit
    base, the weights QLoRA runs on)."""
    base = tiny_model(flavor, n_classes=2 if head == "classifier" else None)
    if method == "qlora":
        options = mp.get_method("qlora").resolve(example_options(method, example))
        mp.quant.quantize_blocks(base, options["quant"], options["blocksize"], options["double_quant"])
    return base.eval()


@pytest.mark.parametrize("method,example,flavor,head", case_params())
def test_adapters_disabled_gives_the_base_models_outputs(method, example, flavor, head):
    """Inside the context the logits are the base model's, for every method that adds parameters of its
    own (moved off their init); a method that trains base weights (or a fresh classifier head) is refused.
    After the context, also one left by an exception, the adapter is back: the same logits, bit for bit."""
    base = base_for(method, example, flavor, head)
    model = build(method, example, flavor, head).eval()
    perturb_trainable(model)
    idx, mask = tiny_batch()
    with torch.no_grad():
        expected, adapted = base(idx, attention_mask=mask), model(idx, attention_mask=mask)
    base_names = {name for name, _ in base.named_parameters()}
    trains_base = [n for n, p in model.named_parameters() if p.requires_grad and n in base_names]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if trains_base:
        what = "the classifier head" if head == "classifier" and all(n.startswith("head.") for n in trains_base) \
            else "weights of the base model itself"
        with pytest.raises(ValueError, match=f"^{method} trains {what}.* switching it off cannot give the base "
                                             "model's outputs"):
            with mp.adapters_disabled(model):
                pass
    else:
        with torch.no_grad(), mp.adapters_disabled(model):
            disabled = model(idx, attention_mask=mask)
        torch.testing.assert_close(disabled, expected, atol=1e-6, rtol=0)
        assert not torch.equal(disabled, adapted)  # the adapter does change the outputs
        with pytest.raises(RuntimeError, match="inside"), mp.adapters_disabled(model):
            raise RuntimeError("inside")
    with torch.no_grad():
        assert torch.equal(model(idx, attention_mask=mask), adapted)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_adapters_disabled_puts_back_what_was_trainable():
    """Whatever the code inside does to requires_grad (here: it unfreezes the base it sees), leaving the
    context puts back which parameters train."""
    model = mp.apply(tiny_model("llama"), "lora", rank=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with mp.adapters_disabled(model):
        model.requires_grad_(True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_adapters_disabled_refuses_a_rewritten_or_merged_base():
    pissa = mp.apply(tiny_model("llama"), "lora", rank=2, init="pissa")
    with pytest.raises(ValueError, match="rewrote the base weights"), mp.adapters_disabled(pissa):
        pass
    merged = mp.merge(mp.apply(tiny_model("llama"), "lora", rank=2))
    with pytest.raises(ValueError, match="mp.unmerge"), mp.adapters_disabled(merged):
        pass


def test_adapters_disabled_with_adapters_side_by_side(tmp_path):
    """Two adapters on one base (multi.py): inside, the base model; outside, each row its adapter."""
    for name, seed in (("a", 1), ("b", 2)):
        model = mp.apply(tiny_model("llama"), "lora", rank=2, targets=["all"])
        perturb_trainable(model, seed)
        mp.save_adapter(model, tmp_path / name)
    model = tiny_model("llama")
    mp.load_adapter(model, tmp_path / "a", name="a")
    mp.load_adapter(model, tmp_path / "b", name="b")
    idx, mask = tiny_batch()
    with torch.no_grad():
        mixed = model(idx, attention_mask=mask, adapter_names=["a", "b", "base"])
        with mp.adapters_disabled(model):
            disabled = model(idx, attention_mask=mask)
        torch.testing.assert_close(disabled, tiny_model("llama")(idx, attention_mask=mask), atol=1e-6, rtol=0)
        assert torch.equal(model(idx, attention_mask=mask, adapter_names=["a", "b", "base"]), mixed)


# ------------------------------------------------------------------------------ pairs and the loss


def test_per_token_losses_are_cross_entropy():
    """lm_loss(reduction="none"): each labelled token's −log p, 0 elsewhere, and its gradient (soft-cap too)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100
    for softcap in (None, 3.0):
        ours = lm_loss(hidden, weight, shift_labels=targets, softcap=softcap, reduction="none", chunk_size=3,
                       vocab_block=4)
        logits = hidden @ weight.T
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        theirs = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 5)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        scale = torch.randn(2, 5)
        for a, b in zip(torch.autograd.grad((ours * scale).sum(), (hidden, weight)),
                        torch.autograd.grad((theirs * scale).sum(), (hidden, weight))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


ROWS = [  # messages rows of varied lengths: a system turn, answers of 1 to 14 characters
    {"prompt": [{"role": "user", "content": "Is it good?"}], "chosen": [{"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "assistant", "content": "no, not at all"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "five"}]},
    {"prompt": [{"role": "user", "content": "Name a colour"}], "chosen": [{"role": "assistant", "content": "blue"}],
     "rejected": [{"role": "assistant", "content": "table"}]},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "hi there"}],
     "rejected": [{"role": "assistant", "content": "bye"}]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs_folder(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny transformers Llama (fixed seed) with the byte tokenizer: minipeft and trl load the same one."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=257, max_position_embeddings=128,
                                      rope_theta=5000.0, pad_token_id=PAD)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def ours_with_lora(folder):
    """minipeft's model of the folder with LoRA on every linear layer, moved off its init (B ≠ 0)."""
    model, tokenizer = mp.from_pretrained(folder, dropout=0.0)
    mp.apply(model, "lora", rank=4, alpha=8.0, targets=["all"])
    perturb_trainable(model, seed=3)
    return model.train(), tokenizer


def gradients_in_peft_names(model, folder: Path) -> dict:
    """Our LoRA gradients written as a peft adapter (the exporter's name mapping), read back by name."""
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, theirs) in zip(grads.named_parameters(), model.named_parameters()):
            if p.requires_grad:
                p.copy_(theirs.grad)
    mp.save_adapter(grads, folder, format="peft")
    return load_file(folder / "adapter_model.safetensors")


def test_train_py_offers_every_variant():
    """train.py's --dpo-loss choices, written out so that other runs need not load extras/dpo.py."""
    from minipeft.run.train_args import DPO_VARIANTS
    assert DPO_VARIANTS == dpo.VARIANTS


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # transformers' notes to trl
@pytest.mark.parametrize("variant", dpo.VARIANTS)
def test_one_step_equals_trls_dpo_trainer(variant, llama_folder, tmp_path):
    """trl's DPOTrainer (peft LoRA, reference = the adapter disabled) on the same tiny Llama, pairs and LoRA
    weights: the tokenized pairs (prompt ⊕ answer, the answer's tokens labelled), the loss, the mean chosen
    and rejected rewards, margin and accuracy it logs, and the gradient of every LoRA tensor (DPOTrainer's
    own compute_loss on a batch of its own collator, then backward) agree within 1e-5."""
    transformers, peft, datasets = (pytest.importorskip(name) for name in ("transformers", "peft", "datasets"))
    trl = pytest.importorskip("trl")
    ours, tokenizer = ours_with_lora(llama_folder)
    fmt = chat_format(tokenizer)
    dataset = preference.load_preferences(pairs_folder(tmp_path / "pairs", ROWS), tokenizer, max_len=128)
    dataset = dataset.splits["train"]
    batch = dataset.collate(list(range(len(ROWS))))
    pairs = dpo.pair_losses(ours, batch, dpo.DPOLoss(variant=variant))  # β: ours by default, trl's by default
    loss = pairs.losses.mean()
    loss.backward()

    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token=fmt.eos_token,
                                                        pad_token=fmt.eos_token)
    hf_tokenizer.chat_template = PLAIN_TEMPLATE  # the template minipeft gives a model without one
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[variant], report_to=[], use_cpu=True,
                         per_device_train_batch_size=len(ROWS), max_length=None)
    theirs = trl.DPOTrainer(model=transformers.LlamaForCausalLM.from_pretrained(llama_folder), args=args,
                            train_dataset=datasets.Dataset.from_list(ROWS), processing_class=hf_tokenizer,
                            peft_config=lora)
    mp.save_adapter(ours, tmp_path / "ours", format="peft")  # the same LoRA weights, into peft's model
    peft.set_peft_model_state_dict(theirs.model, load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    examples = [theirs.train_dataset[i] for i in range(len(ROWS))]
    for i, example in enumerate(examples):  # the same tokens, the same labelled answer
        for row, answer in ((i, example["chosen_ids"]), (len(ROWS) + i, example["rejected_ids"])):
            sequence = example["prompt_ids"] + answer
            real = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][real].tolist() == sequence[:-1]
            assert batch["labels"][row][real].tolist() == [-100] * (len(example["prompt_ids"]) - 1) + answer
    theirs.model.train()
    their_loss = theirs.compute_loss(theirs.model, theirs.data_collator(examples))
    their_loss.backward()
    logged = {key: values[-1] for key, values in theirs._metrics["train"].items()}

    margin = pairs.chosen_rewards - pairs.rejected_rewards
    ours_logged = {"rewards/chosen": pairs.chosen_rewards.mean(), "rewards/rejected": pairs.rejected_rewards.mean(),
                   "rewards/margins": margin.mean(), "rewards/accuracies": (margin > 0).float().mean()}
    differences = {"loss": abs(loss.item() - their_loss.item()),
                   **{key: abs(value.item() - logged[key]) for key, value in ours_logged.items()}}
    their_grads = {name.replace(".default", ""): p.grad for name, p in theirs.model.named_parameters()
                   if p.requires_grad}
    our_grads = gradients_in_peft_names(ours, tmp_path / "grads")
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    differences["gradients"] = max((our_grads[k] - their_grads[k]).abs().max().item() for k in our_grads)
    print(f"{variant}: largest differences to trl {differences}")
    assert max(differences.values()) < 1e-5, differences
    assert min(g.abs().max().item() for g in our_grads.values()) > 0  # every tensor got a gradient


def tiny_pairs(tokenizer, folder: Path, n=16):
    """The training split of n pairs whose answers are 1 to 7 words long."""
    rows = [{"prompt": f"question {i}", "chosen": "yes " * (1 + i % 3), "rejected": "no " * (1 + (i * 5) % 7)}
            for i in range(n)]
    return preference.load_preferences(pairs_folder(folder, rows), tokenizer, max_len=64).splits["train"]


def test_accumulated_micro_batches_equal_one_batch_of_pairs(tmp_path):
    """A step's loss is the mean over the pairs of the global batch: 4 pairs as micro-batches of 1 and 3
    give the loss, the metrics and the gradients of one batch of 4 (loop.accumulate_gradients)."""
    model, tokenizer = mp.from_pretrained("tiny-llama")
    mp.apply(model, "lora", rank=4, targets=["all"])
    perturb_trainable(model)
    split = tiny_pairs(tokenizer, tmp_path)
    results = {}
    for parts in ([[0, 1, 2, 3]], [[0], [1, 2, 3]]):
        model.zero_grad()
        loss, examples, sums = loop.accumulate_gradients(model, iter([split.collate(p) for p in parts]), "dpo",
                                                         len(parts), torch.device("cpu"), objective=dpo.DPOLoss())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[len(parts)] = (loss, examples, dpo.DPOLoss().step_metrics(sums), grads)
    (loss_1, examples_1, metrics_1, grads_1), (loss_2, examples_2, metrics_2, grads_2) = results[1], results[2]
    assert examples_1 == examples_2 == 4 and dpo.DPOLoss().terms(split.collate([0, 1, 2])) == 3
    assert loss_1 == pytest.approx(loss_2, abs=1e-6) and loss_1 == pytest.approx(metrics_1["loss"], abs=1e-6)
    assert metrics_1 == pytest.approx(metrics_2, abs=1e-6)
    assert set(metrics_1) == set(dpo.METRICS) - {"policy_accuracy"}  # the policy's own preference: evaluation's
    assert max((grads_1[n] - grads_2[n]).abs().max().item() for n in grads_1) < 1e-6


def test_the_loop_refuses_pairs_without_their_objective(tmp_path):
    """Pairs scored or trained with the cross-entropy would give a perplexity that looks like a result:
    core/loop.py asks for the DPO objective instead."""
    model, tokenizer = mp.from_pretrained("tiny-llama")
    mp.apply(model, "lora", rank=4)
    split = tiny_pairs(tokenizer, tmp_path, n=4)
    with pytest.raises(ValueError, match="objective=DPOLoss"):
        loop.evaluate(model, split, "dpo")
    with pytest.raises(ValueError, match="objective=DPOLoss"):
        loop.accumulate_gradients(model, iter([split.collate([0, 1])]), "dpo", 1, torch.device("cpu"))
    assert set(loop.evaluate(model, split, "dpo", objective=dpo.DPOLoss())) == set(dpo.METRICS)

def test_evaluation_runs_without_dropout(tmp_path):
    """Scoring pairs twice gives the same metrics: evaluation switches dropout off (LoRA's here)."""
    model, tokenizer = mp.from_pretrained("tiny-llama")
    mp.apply(model, "lora", rank=4, dropout=0.5)
    perturb_trainable(model)
    split = tiny_pairs(tokenizer, tmp_path, n=8)
    model.train()
    first, second = (dpo.DPOLoss().evaluate(model, split, 4, loop.ONE_PROCESS) for _ in range(2))
    assert first == second and model.training

def test_precomputed_reference_equals_the_pass_with_the_adapter_off(tmp_path):
    """Reference log-probabilities computed once before training give the loss and gradients of the
    reference pass under adapters_disabled (up to the padding of other batches)."""
    model, tokenizer = mp.from_pretrained("tiny-llama")
    mp.apply(model, "lora", rank=4, targets=["all"])
    perturb_trainable(model)
    split = tiny_pairs(tokenizer, tmp_path)
    precomputed = dpo.precompute_reference(model, split, batch_size=3)
    assert precomputed.reference.shape == (len(split), 2) and split.reference is None
    losses, grads = [], []
    for dataset in (split, precomputed):
        model.zero_grad()
        batch = dataset.collate([5, 1, 7, 2])
        assert ("reference" in batch) == (dataset is precomputed)
        loss = dpo.pair_losses(model, batch, dpo.DPOLoss()).losses.mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-6


def test_text_and_message_rows_give_the_same_pairs(tmp_path):
    """A plain-text row is one user turn and one assistant turn; only the answers' tokens are labelled,
    the end-of-text token closing each; a long prompt loses tokens from its left."""
    tokenizer = byte_tokenizer()
    text = [{"prompt": "Is it good?", "chosen": "yes", "rejected": "no"}] * 5
    messages = [{"prompt": [{"role": "user", "content": "Is it good?"}],
                 "chosen": [{"role": "assistant", "content": "yes"}],
                 "rejected": [{"role": "assistant", "content": "no"}]}] * 5
    a = preference.load_preferences(write_jsonl(tmp_path / "text.jsonl", text), tokenizer, max_len=64)
    b = preference.load_preferences(write_jsonl(tmp_path / "messages.jsonl", messages), tokenizer, max_len=64)
    assert a.kind == "dpo" and a.info["shape"] == "preference (text)" and b.info["shape"] == "preference (messages)"
    assert a.info["truncated"] == 0
    batch = a.splits["train"].collate([0, 1])
    assert torch.equal(batch["input_ids"], b.splits["train"].collate([0, 1])["input_ids"])
    assert int(batch["examples"]) == 2 and batch["input_ids"].shape[0] == 4
    labelled = [bytes(t for t in row.tolist() if 0 <= t < 256).decode() for row in batch["labels"]]
    assert labelled == [" yes\n", " yes\n", " no\n", " no\n"]  # the answers (and the eos, id 256, before \n)
    assert all((row == PAD).sum() == 1 for row in batch["labels"])
    cut = preference.load_preferences(write_jsonl(tmp_path / "cut.jsonl", text), tokenizer, max_len=12)
    assert cut.info["truncated"] == 10 and len(cut.splits["train"].input_ids[0]) == 11
    longest = len(a.splits["train"].input_ids[0]) + 1  # prompt ⊕ "yes": one token longer than prompt ⊕ "no"
    by_one = preference.load_preferences(write_jsonl(tmp_path / "one.jsonl", text), tokenizer, max_len=longest - 1)
    assert by_one.info["truncated"] == 5  # every chosen sequence lost one token, no rejected one


def test_an_implicit_prompt_is_the_turns_both_conversations_share(tmp_path):
    """trl's implicit prompt: rows of two whole conversations (no "prompt") are split as trl's extract_prompt
    splits them, and give the pairs of the same rows with the prompt written out (ROWS)."""
    trl = pytest.importorskip("trl")
    implicit = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in ROWS]
    for row, explicit in zip(implicit, ROWS):
        assert preference._pair(row, "row")[1:] == preference._pair(explicit, "row")[1:]
        assert trl.extract_prompt(row) == explicit
    tokenizer = byte_tokenizer()
    a = preference.load_preferences(pairs_folder(tmp_path / "implicit", implicit), tokenizer).splits["train"]
    b = preference.load_preferences(pairs_folder(tmp_path / "explicit", ROWS), tokenizer).splits["train"]
    assert (a.input_ids, a.labels, a.rejected_ids, a.rejected_labels) == \
        (b.input_ids, b.labels, b.rejected_ids, b.rejected_labels)


def test_a_cut_pair_scores_the_tokens_trls_keep_end_scores(tmp_path):
    """Cut to max_len, each row of a batch holds the tokens trl's collator keeps with truncation_mode="keep_end"
    (on the uncut pairs, tokenized as trl tokenizes them: test_one_step_equals_trls_dpo_trainer), and labels
    exactly the answer tokens trl scores."""
    trl = pytest.importorskip("trl")
    tokenizer, max_len = byte_tokenizer(), 40
    whole = preference.load_preferences(pairs_folder(tmp_path / "whole", ROWS), tokenizer).splits["train"]
    cut = preference.load_preferences(pairs_folder(tmp_path / "cut", ROWS), tokenizer, max_len=max_len)
    assert cut.info["truncated"] > 0
    examples = []
    for i in range(len(ROWS)):
        prompt = whole.labels[i].count(-100) + 1
        examples.append({"prompt_ids": whole.input_ids[i][:prompt], "chosen_ids": whole.labels[i][prompt - 1:],
                         "rejected_ids": whole.rejected_labels[i][prompt - 1:]})
    theirs = trl.trainer.dpo_trainer.DataCollatorForPreference(PAD, max_length=max_len, truncation_mode="keep_end")(
        examples)
    ours = cut.splits["train"].collate(list(range(len(ROWS))))
    for row in range(2 * len(ROWS)):
        kept = theirs["input_ids"][row][theirs["attention_mask"][row].bool()]
        scored = theirs["completion_mask"][row][theirs["attention_mask"][row].bool()][1:].bool()
        real = ours["attention_mask"][row].bool()
        assert ours["input_ids"][row][real].tolist() == kept[:-1].tolist()
        assert ours["labels"][row][real].tolist() == torch.where(scored, kept[1:], -100).tolist()


def test_pairs_ignore_the_tokenizers_own_padding_and_truncation(tmp_path):
    """The loader tokenizes whole sequences and pads batches itself, whatever the tokenizer was set to do."""
    rows = [{"prompt": f"Is {i} good?", "chosen": "yes, it is", "rejected": "no"} for i in range(10)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    configured = byte_tokenizer()
    configured.enable_truncation(max_length=4)
    configured.enable_padding(length=40, pad_id=PAD)
    for split in ("train", "test"):
        plain = preference.load_preferences(path, byte_tokenizer(), max_len=64).splits[split]
        ours = preference.load_preferences(path, configured, max_len=64).splits[split]
        assert (ours.input_ids, ours.rejected_ids, ours.labels) == (plain.input_ids, plain.rejected_ids, plain.labels)


def test_the_first_pairs_of_a_split_keep_their_reference(tmp_path):
    """head(n), as eval.py --limit cuts a split: the first n pairs, both answers and their precomputed
    reference log-probabilities; head(None) is the whole split."""
    model, tokenizer = mp.from_pretrained("tiny-llama")
    mp.apply(model, "lora", rank=4)
    split = dpo.precompute_reference(model, tiny_pairs(tokenizer, tmp_path), batch_size=4)
    first = split.head(3)
    assert len(first) == 3 and split.head(None) is split
    assert (first.rejected_ids, first.rejected_labels) == (split.rejected_ids[:3], split.rejected_labels[:3])
    assert torch.equal(first.reference, split.reference[:3])
    assert torch.equal(first.collate([0, 2])["input_ids"], split.collate([0, 2])["input_ids"])


def test_rotten_tomatoes_preference_is_the_instruction_task_with_the_other_label_rejected():
    """Each pair of the built-in task: rotten_tomatoes_instruct's question and answer (the same sentences,
    split by movie in the same way), the other label rejected."""
    from minipeft.formats import tasks
    _, questions, _ = tasks._instruct_rows("rotten_tomatoes_instruct", seed=0)
    shape, pairs, _ = preference._preference_rows(preference.BUILT_IN, seed=0)
    assert shape == "messages" and preference.BUILT_IN == "rotten_tomatoes_preference"
    for split in tasks.SPLITS:
        assert len(pairs[split]) == len(questions[split]) > 0
        for (_, prompt, answers), question in zip(pairs[split], questions[split]):
            assert prompt == question.messages[:1] and answers["chosen"] == question.messages[1]["content"]
            assert {answers["chosen"], answers["rejected"]} == {"positive", "negative"}


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 2: the chosen and the rejected answer are the same"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "line 2: the chosen answer is empty"),
    ({"prompt": "p", "chosen": "a"}, "line 2 is not a preference row"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "line 2 mixes text and messages"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "line 2: 'chosen' must be a list of one message"),
    ({"prompt": [{"role": "assistant", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "line 2: the prompt ends with an assistant turn"),
    ({"prompt": [{"role": "robot", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "line 2: the prompt: message 0 is not"),
    ({"chosen": "p a", "rejected": "p b"}, "line 2 has no 'prompt'; give the prompt its own field"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     "line 2 has no 'prompt', and 'chosen' and 'rejected' do not start with the same turn"),
])
def test_bad_rows_are_named_by_file_and_line(row, message, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(ValueError, match=message) as error:
        preference.load_preferences(path, byte_tokenizer())
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------ train.py --objective dpo


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """60 pairs: a prompt and two different words, the chosen one from the first half of the list."""
    words = "good great fine nice bad awful poor weak".split()
    rows = [{"prompt": f"Say something {i}", "chosen": words[i % 4], "rejected": words[4 + (i * 3) % 4]}
            for i in range(60)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def run_main(args, capsys) -> tuple[int, str, str]:
    try:
        cli.run(train_cli.main, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dpo_args(pairs_file, out, *extra):
    return ["--model", "tiny-llama", "--task", pairs_file, "--targets", "all", "--batch-size", "4", "--steps", "6",
            "--eval-every", "3", "--lr", "1e-2", "--batching", "random", "--out", out, *extra]


def steps_of(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if row["event"] == "step"]


def test_train_dpo_logs_rewards_and_precomputing_changes_nothing(pairs_file, tmp_path, capsys):
    """train.py on preference pairs: DPO by default; per step the loss, reward margin, accuracy and rewards;
    reward accuracy on the test pairs before (0: every reward is 0 at LoRA's init) and after, as eval.py
    scores the adapter; from that adapter (--init-adapter) the next run starts where it ended; the first run
    with --precompute-reference and --grad-accum 2 (batches of 2) logs the same steps."""
    code, out, err = run_main(dpo_args(pairs_file, tmp_path / "a"), capsys)
    assert code == 0, err
    assert "test before          reward accuracy 0.0000" in out
    assert "preference (text) rows, chat template the plain fallback" in out and "loss on the answers" in out
    steps = steps_of(tmp_path / "a")
    assert len(steps) == 6 and steps[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # −log σ(0)
    assert {"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= steps[0].keys()
    summary = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["test_after"]["reward_accuracy"] > 0.5 and summary["examples_per_step"] == 4
    eval_cli.main(["--model", "tiny-llama", "--task", str(pairs_file), "--adapter", str(tmp_path / "a" / "adapter")])
    assert f"reward accuracy {summary['test_after']['reward_accuracy']:.4f}" in capsys.readouterr().out
    code, out, err = run_main(dpo_args(pairs_file, tmp_path / "c", "--init-adapter", tmp_path / "a" / "adapter"),
                              capsys)
    assert code == 0, err  # from a trained adapter the reference is still the base model: it starts where "a" ended
    continued = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])
    assert continued["test_before"] == pytest.approx(summary["test_after"], abs=1e-6)
    code, out, err = run_main(dpo_args(pairs_file, tmp_path / "b", "--precompute-reference", "--grad-accum", "2",
                                       "--batch-size", "2", "--memory-report"), capsys)  # 4 random pairs, cut in two
    assert code == 0, err
    assert "reference log-probabilities of 60 pairs precomputed" in out
    train = preference.load_preferences(pairs_file, mp.from_pretrained("tiny-llama")[1], max_len=128, seed=0)
    longest = max(map(len, [*train.splits["train"].input_ids, *train.splits["train"].rejected_ids]))
    assert f"memory ledger: batch 4 × {longest} tokens" in out  # a micro-batch of 2 pairs is 4 rows
    for mine, theirs in zip(steps, steps_of(tmp_path / "b")):
        for key in ("loss", "grad_norm", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"):
            if key == "reward_accuracy" and mine["step"] == 1:  # LoRA's B = 0: every margin is rounding (±1e-8),
                continue  # and which side of 0 it falls depends on the CPU's kernels
            assert mine[key] == pytest.approx(theirs[key], abs=2e-5), (mine["step"], key)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_has_its_own_learning_rate_and_lr_overrides_it(method, pairs_file, tmp_path, capsys):
    """Without --lr a DPO run trains at DPO's default (not instruction data's nor the method's own), on every
    linear layer; --lr replaces it."""
    lr, options = mp.task_defaults(method, "dpo")
    assert lr < mp.task_defaults(method, "sft")[0] and lr < mp.get_method(method).lr and options == {"targets": ["all"]}
    quick = ["--model", "tiny-llama", "--task", pairs_file, "--method", method, "--batch-size", "2", "--steps", "1",
             "--eval-every", "0", "--skip-test-before", "--save-every", "0"]
    for extra, expected in (([], lr), (["--lr", "3e-3"], 3e-3)):
        code, _, err = run_main([*quick, *extra, "--out", tmp_path / str(expected)], capsys)
        assert code == 0, err
        start = json.loads((tmp_path / str(expected) / "metrics.jsonl").read_text().splitlines()[0])
        assert start["config"]["lr"] == expected and start["method"]["options"]["targets"] == ["all"]
    assert f"preference pairs (DPO): lr {lr:g}, targets=['all']" in cli.list_methods()


def test_bad_dpo_input_is_one_clear_error(pairs_file, tmp_path, capsys):
    """One sentence, exit code 2, nothing written."""
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 10)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "p", "chosen": "a", "rejected": ""}] * 10)
    cases = [
        (["--task", same], "line 1: the chosen and the rejected answer are the same"),
        (["--task", empty], "line 1: the rejected answer is empty"),
        (["--task", pairs_file, "--max-len", "6"], "leaves no room for the prompt in --max-len 6"),
        (["--task", "rotten_tomatoes", "--objective", "dpo"], "--objective dpo trains on preference pairs"),
        (["--task", pairs_file, "--objective", "sft"], "holds preference pairs, which --objective sft cannot"),
        (["--task", "hamlet", "--beta", "0.5"], "--beta is for preference tuning"),
        (["--task", pairs_file, "--beta", "0"], "--beta must be a finite number > 0"),
        (["--task", pairs_file, "--method", "last_k"], "last_k trains weights of the base model itself"),
        (["--task", pairs_file, "--method", "adapter"], "adapter trains weights of the base model itself"),
        (["--task", pairs_file, "--method", "lora", "--init", "pissa"], "rewrote the base weights"),
        (["--task", pairs_file, "--pack"], "--pack cannot be used with preference pairs"),
    ]
    failures = []
    for extra, message in cases:
        out = tmp_path / "out"
        code, _, err = run_main(["--model", "tiny-llama", "--steps", "2", "--out", out, *extra], capsys)
        if code != 2 or message not in err or "Traceback" in err or out.exists() or err.count("\n") != 1:
            failures.append(f"{extra}: exit {code}, {err[-300:]!r}, wrote {out.exists()}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_equal_one(pairs_file, tmp_path):
    """Data parallel DPO (2 processes, gloo): the same steps as one process whose batch is the global one."""
    two, one = tmp_path / "two", tmp_path / "one"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *map(str, dpo_args(pairs_file, two, "--batch-size", "2"))]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    train_cli.main([str(a) for a in dpo_args(pairs_file, one)])
    for mine, theirs in zip(steps_of(one), steps_of(two), strict=True):
        for key in ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"):
            assert mine[key] == pytest.approx(theirs[key], abs=2e-5), (mine["step"], key)


def test_bench_hamlet_pairs_are_read_as_a_preference_folder(tmp_path):
    """bench/hamlet_pairs.py (docs/dpo.md's second task): three splits of later and later scenes, every pair a
    true next line against another line, read by train.py's preference reader."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "hamlet_pairs.py"), "--out", str(tmp_path / "pairs"),
                           "--train", "40", "--validation", "8", "--test", "16"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {split: [json.loads(line) for line in (tmp_path / "pairs" / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "validation", "test")}
    assert [len(r) for r in rows.values()] == [40, 8, 16]
    assert all(r["chosen"] != r["rejected"] and len(r["rejected"].split()) >= 3 for split in rows.values() for r in split)
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
    data = preference.load_preferences(tmp_path / "pairs", byte_tokenizer(), max_len=512)
    assert [len(data.splits[split]) for split in ("train", "validation", "test")] == [40, 8, 16]
