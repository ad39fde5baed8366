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


@pytest.mark.parametrize("flavor", ["gpt2", "llama", "gemma2"])
def test_weight_decay_falls_on_weight_matrices_and_embeddings_not_on_biases_or_norms(flavor):
    """The rule of transformers' Trainer (get_decay_parameter_names: no decay for biases and the weights of
    layer norms, which it finds by HF's module names), on every parameter of a fully trained model."""
    model = mp.apply(tiny_model(flavor), "full")
    optimizer = loop.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p): group["weight_decay"] > 0 for group in optimizer.param_groups for p in group["params"]}
    expected = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            expected[id(p)] = not (name == "bias" or isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)))
    assert decayed == expected and any(expected.values()) and not all(expected.values())
