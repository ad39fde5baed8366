"""The training loop and the chat prompt checked against the references a user would otherwise rely on:
the learning-rate schedule against transformers' get_cosine_schedule_with_warmup (with the warmup steps
its TrainingArguments counts for a ratio), one fp16-mixed step with clipping active against the same
step in fp32, and `eval.py --chat`'s prompt against apply_chat_template(..., add_generation_prompt=True)
(itself checked token for token against transformers in tests/test_chat.py)."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are local files; never ask the hub

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import minipeft as mp
from minipeft.core import data, loop
from minipeft.formats import tasks
from minipeft.run import trainer
from conftest import perturb_trainable, tiny_model, tiny_tokenizer

transformers = pytest.importorskip("transformers")

# (warmup fraction, steps): none, tiny runs, a fraction that is not a whole number of steps (0.06 · 640
# = 38.4), one whose product comes out just above a whole number in floating point (0.07 · 100 =
# 7.000000000000001: 8 warmup steps in both libraries), and nearly all warmup
SCHEDULES = [(0.0, 1), (0.0, 7), (0.06, 1), (0.06, 2), (0.5, 3), (0.07, 100), (0.25, 10), (0.06, 640), (0.9, 4)]


def learning_rates(scheduler, steps: int) -> list[float]:
    """The learning rate each of `steps` optimizer steps runs at."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        scheduler.step()
    return lrs


def reference_learning_rates(warmup: float, steps: int, lr: float, tmp_path) -> tuple[list[float], int]:
    """transformers' schedule for a warmup fraction, as its Trainer builds it; and its warmup steps."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup, report_to=[])
    warmup_steps = args.get_warmup_steps(steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    return learning_rates(scheduler, steps), warmup_steps


def expected_learning_rates(warmup: float, steps: int, lr: float, tmp_path) -> list[float]:
    """minipeft's schedule in terms of transformers': equal after the warmup, one step ahead during it
    (transformers' step s warms up at s / warmup, so its first step has lr 0 and moves nothing)."""
    theirs, warmup_steps = reference_learning_rates(warmup, steps, lr, tmp_path)
    ahead = theirs[1:] + [lr]  # transformers' lr of the next step; at step warmup_steps it is lr
    return [ahead[s] if s < warmup_steps else theirs[s] for s in range(steps)]


@pytest.mark.parametrize("warmup, steps", SCHEDULES, ids=[f"{w}-{n}" for w, n in SCHEDULES])
def test_schedule_is_transformers_cosine_with_the_warmup_a_step_ahead(warmup, steps, tmp_path):
    lr = 3e-4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ours = learning_rates(loop.make_scheduler(optimizer, warmup, steps), steps)
    assert ours == pytest.approx(expected_learning_rates(warmup, steps, lr, tmp_path), rel=1e-12, abs=0)
    theirs, warmup_steps = reference_learning_rates(warmup, steps, lr, tmp_path)
    assert ours[0] > 0  # the first step trains; transformers' does not when it warms up
    assert (theirs[0] == 0) == (warmup_steps > 0)
    if warmup == 0:
        assert ours == pytest.approx(theirs, rel=1e-12, abs=0)


@pytest.mark.parametrize("warmup", [1.0, 5, -0.1, math.nan])
def test_a_warmup_that_is_not_a_fraction_is_refused(warmup, tmp_path):
    """transformers reads a warmup of 1 or more as a number of steps (5: five of the run's 10); minipeft's warmup
    is a fraction, and ⌈5 · 10⌉ = 50 warmup steps would have left the learning rate at a fifth of its peak."""
    if warmup >= 1:
        assert reference_learning_rates(warmup, 10, 1.0, tmp_path)[1] == int(warmup)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=r"^warmup is the fraction of the run's 10 steps that warm up the learning "
                                         r"rate, in \[0, 1\), got .*; for n warmup steps pass n / 10$"):
        loop.make_scheduler(optimizer, warmup, 10)


def test_train_steps_at_the_scheduled_learning_rates(tmp_path):
    """train() itself: the learning rate the optimizer holds when each step is taken (an optimizer pre-step
    hook sees it), against transformers' schedule for the same warmup and steps."""
    model, tokenizer = mp.from_pretrained("tiny-llama")
    mp.apply(model, "lora")
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question " * 100)
    task = tasks.load_task(str(text), tokenizer, max_len=32)
    cfg = trainer.TrainConfig(steps=8, batch_size=2, lr=1e-3, warmup=0.25, out=str(tmp_path / "run"),
                              test_before=False, eval_every=8, eval_generate=0)
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        trainer.train(model, task, cfg)
    finally:
        hook.remove()
    assert seen == pytest.approx(expected_learning_rates(0.25, 8, 1e-3, tmp_path / "hf"), rel=1e-12, abs=0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["event"] == "step"] == seen  # each step logs the rate it ran at


# options given to train() in Python, which train.py's flag checks do not see: 0 steps or micro-batches trained
# nothing, a batch size of 0 divided by zero, 2.5 steps raised a TypeError
BAD_OPTIONS = [("batch_size", 0, "a whole number >= 1"), ("batch_size", 2.0, "a whole number >= 1"),
               ("grad_accum", 0, "a whole number >= 1"), ("steps", 0, "a whole number >= 1"),
               ("steps", 2.5, "a whole number >= 1"), ("epochs", 0, "a finite number > 0"),
               ("lr", -1e-3, "a finite number > 0"), ("weight_decay", -0.1, "a finite number >= 0"),
               ("eval_every", -2, "a whole number >= 0"), ("max_bad_steps", 0, "a whole number >= 1")]


@pytest.mark.parametrize("name, value, allowed", BAD_OPTIONS, ids=[f"{n}={v}" for n, v, _ in BAD_OPTIONS])
def test_train_refuses_an_option_that_makes_no_sense_before_writing(name, value, allowed, tmp_path):
    model = mp.apply(tiny_model("llama"), "lora")
    rows = [[1, 2, 3, 4]] * 8
    split = data.Dataset("lm", rows, [row[1:] + [loop.IGNORE_INDEX] for row in rows], pad_id=0)
    task = data.TaskData("lm", {"train": split, "validation": split, "test": split}, None, None, 0)
    cfg = trainer.TrainConfig(**{"steps": 2, "batch_size": 2, "out": str(tmp_path / "run"), name: value})
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{name} must be {allowed}, got {value!r}$"):
        trainer.train(model, task, cfg)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# fp16-mixed: the gradient is unscaled before it is measured and clipped


def lm_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (4, 16), generator=g)
    return {"input_ids": idx, "labels": torch.cat([idx[:, 1:], torch.full((4, 1), -100)], dim=1)}


def clipped_step(precision: str, max_grad_norm: float, lr: float = 0.1):
    """One train_step of tiny LoRA llama (B ≠ 0) in `precision` on a fixed batch, with plain SGD so that
    the update is -lr times the clipped gradient itself: (StepResult, the update of every trainable
    tensor). The fp32 model holds the frozen weights rounded to fp16, as fp16-mixed stores them, so the
    two differ only in how they compute. (AdamW's first update, lr · g / (|g| + ε), is about lr · sign(g)
    whatever the clipping, and flips with fp16's rounding where g is near zero: no test of clipping.)"""
    model = mp.apply(tiny_model("llama"), "lora", tokenizer=tiny_tokenizer())
    perturb_trainable(model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.copy_(p.half().float())
    mp.set_precision(model, precision).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = loop.make_scheduler(optimizer, 0.0, 1)
    scaling = mp.precision.loss_scaling(model, torch.device("cpu"))
    assert isinstance(scaling, mp.precision.LossScaling) == (precision == "fp16-mixed")
    result = loop.train_step(model, optimizer, scheduler, iter([lm_batch(model.cfg.vocab_size)]), "lm",
                                max_grad_norm=max_grad_norm, scaling=scaling)
    assert result.finite and not result.overflow
    update = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters() if p.requires_grad])
    return result, update


def test_fp16_mixed_clipped_step_equals_fp32():
    """Measured: ‖g‖ within 1.4e-4 and the update within 1e-3 (relative) of fp32's; fp16 rounds to 4.9e-4."""
    max_grad_norm, lr = 1e-3, 0.1
    full, full_update = clipped_step("fp32", max_grad_norm, lr)
    half, half_update = clipped_step("fp16-mixed", max_grad_norm, lr)
    assert half.loss_scale == 2.0 ** 16
    assert full.grad_norm > 100 * max_grad_norm  # clipping is active: the gradient is scaled down 100× or more
    assert half.grad_norm == pytest.approx(full.grad_norm, rel=2e-3)
    assert half.loss == pytest.approx(full.loss, rel=1e-4)
    assert full_update.norm().item() == pytest.approx(lr * max_grad_norm, rel=1e-4)  # clipped to the bound
    assert ((half_update - full_update).norm() / full_update.norm()).item() < 1e-2


# ---------------------------------------------------------------------------------------------------
# transformers' Trainer.train() itself: accumulation, clipping of the accumulated gradient, no clipping


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny transformers Llama (fixed seed): the Trainer trains it, minipeft loads the same weights."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=97, max_position_embeddings=64, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def instruction_rows(prompt_lengths, answer_lengths) -> list[dict]:
    """Rows as the Trainer's collator takes them: token ids, and labels -100 on the prompt (not shifted)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, answer in zip(prompt_lengths, answer_lengths):
        ids = torch.randint(1, 97, (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def pad_rows(rows: list[dict]) -> dict:
    """The Trainer's batch: right-padded with 0, labels -100 on the padding."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), -100)}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n], batch["attention_mask"][i, :n] = torch.tensor(row["input_ids"]), 1
        batch["labels"][i, :n] = torch.tensor(row["labels"])
    return batch


class InOrderTrainer(transformers.Trainer):
    """The Trainer, drawing the rows in order (its sampler shuffles), so that both sides see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_evaluation_loss_is_the_trainers_eval_loss_over_the_split_in_one_batch(llama_folder, tmp_path):
    """Trainer.evaluate's eval_loss is a mean of batch means weighted by examples (loop.evaluate's docstring);
    over the split in one batch it is the mean over every labelled token, which evaluate gives in any batch size."""
    rows = instruction_rows([3, 5, 2, 4, 6], [1, 2, 9, 12, 20])
    theirs = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    eval_loss = {}
    for batch_size in (1, len(rows)):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=batch_size,
                                              use_cpu=True, report_to=[], disable_tqdm=True)
        reference = InOrderTrainer(model=theirs, args=args, eval_dataset=rows, data_collator=pad_rows)
        eval_loss[batch_size] = reference.evaluate()["eval_loss"]
    ours, _ = mp.from_pretrained(llama_folder, dropout=0.0)
    split = data.Dataset("sft", [row["input_ids"] for row in rows], [row["labels"][1:] + [-100] for row in rows], 0)
    for batch_size in (1, 2, len(rows)):
        assert loop.evaluate(ours, split, "sft", batch_size)["loss"] == pytest.approx(eval_loss[len(rows)], rel=1e-6)
    assert eval_loss[1] != pytest.approx(eval_loss[len(rows)], rel=1e-3)  # the Trainer's figure moves with its batches


def test_a_split_without_a_labelled_token_has_no_loss_as_in_the_trainer(llama_folder, tmp_path):
    """Rows whose answers are empty: Trainer.evaluate's eval_loss is nan; evaluate's was 0.0, perplexity 1.0."""
    rows = instruction_rows([3, 5], [0, 0])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    reference = InOrderTrainer(model=transformers.LlamaForCausalLM.from_pretrained(llama_folder), args=args,
                               eval_dataset=rows, data_collator=pad_rows)
    assert math.isnan(reference.evaluate()["eval_loss"])
    ours, _ = mp.from_pretrained(llama_folder, dropout=0.0)
    split = data.Dataset("sft", [row["input_ids"] for row in rows], [row["labels"][1:] + [-100] for row in rows], 0)
    assert all(math.isnan(value) for value in loop.evaluate(ours, split, "sft").values())


# max_grad_norm: clipping active (the accumulated gradient's norm is 1.7 to 2.3), and 0 and -1, which the
# Trainer reads as no clipping (clip_grad_norm_ zeroed the gradient for 0, and for -1 flipped it: the loss rose)
@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0, -1.0])
def test_steps_equal_transformers_trainer_with_accumulation_and_clipping(max_grad_norm, llama_folder, tmp_path):
    """Trainer.train() (its own fused AdamW, cosine schedule and clipping) for one epoch of 10
    instruction rows, batch 2, gradient accumulation 2 (steps of 2, 2 and 1 micro-batches, with 1 to 20
    labelled tokens each) against train_step on the same micro-batches: the loss, ‖g‖₂ and learning rate
    each step logs, and the trained model's logits."""
    rows = instruction_rows([3, 5, 2, 4, 6, 3, 2, 5, 4, 3], [1, 2, 9, 12, 1, 20, 3, 1, 15, 4])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1,
        learning_rate=1e-2, lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=max_grad_norm,
        logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    theirs = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    reference = InOrderTrainer(model=theirs, args=args, train_dataset=rows, data_collator=pad_rows)
    reference.train()
    logged = [row[key] for row in reference.state.log_history if "loss" in row
              for key in ("loss", "grad_norm", "learning_rate")]

    ours, _ = mp.from_pretrained(llama_folder, dropout=0.0)
    mp.apply(ours, "full").train()
    optimizer = loop.make_optimizer(ours, lr=1e-2, weight_decay=0.1)
    scheduler = loop.make_scheduler(optimizer, 0.0, 3)
    batches = iter([pad_rows(rows[i:i + 2]) for i in range(0, len(rows), 2)])
    batches = ({**b, "labels": torch.cat([b["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)} for b in batches)
    results = [loop.train_step(ours, optimizer, scheduler, batches, "sft", micro, max_grad_norm) for micro in (2, 2, 1)]
    assert [value for r in results for value in (r.loss, r.grad_norm, r.lr)] == pytest.approx(logged, rel=1e-5)
    idx = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert ours.eval()(idx) == pytest.approx(theirs.eval()(idx).logits, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# eval.py --chat


def test_eval_chat_sends_the_template_with_its_generation_prompt(capsys):
    """The ids SmolLM2 receives for each turn (a forward pre-hook on the model) are exactly those of
    apply_chat_template(conversation so far, add_generation_prompt=True)."""
    import eval as eval_cli
    args = eval_cli.build_parser().parse_args(["--model", "smollm2", "--chat", "--system", "Answer in one word.",
                                               "--max-new-tokens", "3"])
    model, tokenizer, _ = eval_cli.load_model(args)
    inputs = []
    hook = model.register_forward_pre_hook(lambda module, positional: inputs.append(positional[0][0].tolist()))
    try:
        eval_cli.chat_loop(model, tokenizer, args, lines=["What is the capital of France?", "And of Italy?"])
    finally:
        hook.remove()
    prompts = [ids for ids in inputs if len(ids) > 1]  # each answer's first forward pass; then a token at a time
    answers = capsys.readouterr().out.split("\n")[:2]
    conversation = [{"role": "system", "content": args.system},
                    {"role": "user", "content": "What is the capital of France?"}]
    first = mp.apply_chat_template(tokenizer, conversation, add_generation_prompt=True)
    conversation += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "And of Italy?"}]
    second = mp.apply_chat_template(tokenizer, conversation, add_generation_prompt=True)
    assert mp.apply_chat_template(tokenizer, conversation, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n")  # where SmolLM2's answer begins
    assert prompts == [first, second]


def test_a_step_with_a_finite_loss_and_an_infinite_gradient_is_skipped():
    """As torch.amp.GradScaler skips a step whose gradients hold inf or NaN whatever the loss, a step is
    skipped when its gradient is not finite though its loss is (a non-finite loss: tests/test_robust.py),
    and the schedule still advances."""
    model = mp.apply(tiny_model("llama"), "lora", tokenizer=tiny_tokenizer()).train()
    perturb_trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    next(p for p in model.parameters() if p.requires_grad).register_hook(lambda g: g * float("inf"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = loop.make_scheduler(optimizer, 0.0, 2)
    result = loop.train_step(model, optimizer, scheduler, iter([lm_batch(model.cfg.vocab_size)]), "lm")
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm) and not result.finite
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert scheduler.last_epoch == 1


def test_evaluation_scores_the_whole_split_in_eval_mode_and_puts_the_training_mode_back():
    """evaluate against the split scored one example at a time with F.cross_entropy, dropout off: the loss is
    the mean over every labelled token of the split (not a mean of batch means), the accuracy over every
    example; the batches are padded and sorted by length. A model with dropout, handed over in training mode,
    is scored without it and comes back in training mode."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 9, 5, 14, 2)]
    next_tokens = [row[1:] + [loop.IGNORE_INDEX] for row in rows]
    classes = [2, 0, 1, 1, 0]
    for kind, labels in (("lm", next_tokens), ("classification", classes)):
        model = tiny_model("llama", n_classes=3 if kind == "classification" else None, dropout=0.3).train()
        got = loop.evaluate(model, data.Dataset(kind, rows, labels, pad_id=0), kind, batch_size=2)
        assert model.training
        model.eval()
        with torch.no_grad():
            outputs = [model(torch.tensor([row]))[0] for row in rows]  # (T, V) or (C,) each
        if kind == "lm":
            token_losses = torch.cat([torch.nn.functional.cross_entropy(out, torch.tensor(label), reduction="none")
                                      for out, label in zip(outputs, labels)])
            assert got["loss"] == pytest.approx(token_losses.sum().item() / sum(len(r) - 1 for r in rows), rel=1e-5)
            assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
        else:
            right = sum(int(out.argmax() == label) for out, label in zip(outputs, labels))
            assert got == {"accuracy": right / len(rows)} and 0 < right < len(rows)


# a fully trained model of three flavours; and methods whose trainable tensors are 1-D vectors (DoRA's magnitude,
# (IA)³'s and VeRA's scales, LLaMA-Adapter's gate), which were left undecayed as if they were biases, and the
# adapter's own layer norms
DECAY_CASES = [("gpt2", "full"), ("llama", "full"), ("gemma2", "full"), ("llama", "dora"), ("llama", "ia3"),
               ("gpt2", "vera"), ("llama", "llama_adapter"), ("gpt2", "adapter")]


@pytest.mark.parametrize("flavor, method", DECAY_CASES, ids=[f"{f}-{m}" for f, m in DECAY_CASES])
def test_weight_decay_falls_on_every_tensor_but_biases_and_norms(flavor, method):
    """The rule of transformers' Trainer (get_decay_parameter_names: no decay for biases and the weights of
    layer norms, which it finds by HF's module names; everything else decays, peft's vectors too:
    test_the_trainer_decays_peft_vectors), on every trainable parameter."""
    model = mp.apply(tiny_model(flavor), method, tokenizer=tiny_tokenizer())
    optimizer = loop.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p): group["weight_decay"] > 0 for group in optimizer.param_groups for p in group["params"]}
    expected = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                expected[id(p)] = not (name == "bias" or isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)))
    assert decayed == expected and any(expected.values())
    assert all(expected.values()) == (method in ("dora", "ia3", "vera", "llama_adapter"))


def test_the_trainer_decays_peft_vectors(llama_folder):
    """What the rule above follows: the Trainer decays the 1-D (or n × 1) tensors of peft's DoRA, IA³, VeRA and
    adaption prompt, whose names hold neither "bias" nor "norm"."""
    peft = pytest.importorskip("peft")
    configs = [peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
               peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               peft.VeraConfig(r=4, target_modules=["q_proj"]),
               peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")]
    for config in configs:
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(llama_folder), config)
        decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
        vectors = [n for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or min(p.shape) == 1)]
        assert vectors and set(vectors) <= decayed
