"""bench/parity.py builds minipeft LoRA and transformers + peft LoRA from the same minilm weights and
trains each with its own library's loop: minipeft's train_step, AdamW and schedule; transformers'
Trainer's optimizer and cosine schedule and its step. With dropout off and no warmup (where the two
schedules are equal: minipeft warms up one step ahead, tests/test_loop_references.py), both must start
from the same function and still agree after a few steps on real Rotten Tomatoes batches: then the two
sides do the same work, and a gap in the bench's test accuracies could only come from dropout, the
warmup's first step, or float rounding."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is a local folder; never ask the hub

import pytest

from minipeft.formats import tasks
from minipeft.run import trainer

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import parity  # noqa: E402

STEPS = 4  # learning rates lr · (1, 0.85, 0.5, 0.15): a constant or wrong schedule moves the weights elsewhere


@pytest.fixture(scope="module")
def pair():
    ours, tokenizer = parity.build_ours(seed=0, dropout=0.0)
    task = tasks.load_task("rotten_tomatoes", tokenizer, max_len=32, seed=0)
    return ours, parity.build_theirs(ours), task


def lora_pairs(ours, theirs):
    """(minipeft tensor, peft tensor) for every LoRA A and B, then the head's weight and bias."""
    for block, layer in zip(ours.blocks, theirs.encoder.base_model.model.encoder.layer, strict=True):
        for t in ours.peft_config["options"]["targets"]:
            mine, other = getattr(block.attn, t), getattr(layer.attention.self, parity.HF_NAMES[t])
            yield mine.lora_A, other.lora_A["default"].weight
            yield mine.lora_B, other.lora_B["default"].weight
    yield ours.head.weight, theirs.head.weight
    yield ours.head.bias, theirs.head.bias


def optimizer_settings(optimizer) -> dict:
    """id(tensor) -> (weight decay, initial learning rate) of its parameter group."""
    return {id(p): (group["weight_decay"], group["initial_lr"]) for group in optimizer.param_groups
            for p in group["params"]}


def test_same_start_same_steps(pair):
    ours, theirs, task = pair
    test_batch = next(task.splits["test"].batches(32))
    assert parity.max_logit_difference(ours, theirs, test_batch) < 1e-5
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)

    cfg = trainer.TrainConfig(steps=STEPS, batch_size=8, seed=0, lr=2e-3, warmup=0.0)
    runs = [parity.Minipeft(ours, cfg, STEPS), parity.TransformersTrainer(theirs, cfg, STEPS)]
    # the weight decay and peak learning rate of every tensor, as the Trainer groups them (no decay on biases)
    settings = [optimizer_settings(run.optimizer) for run in runs]
    for mine, other in lora_pairs(ours, theirs):
        assert settings[0][id(mine)] == settings[1][id(other)]
    assert settings[0][id(ours.head.bias)] == (0.0, 2e-3) and settings[0][id(ours.head.weight)] == (0.01, 2e-3)
    batches = trainer.training_batches(task.splits["train"], cfg, trainer.Progress())
    for _ in range(STEPS):
        batch = next(batches)
        loss_ours, loss_theirs = (run.step(batch) for run in runs)
        assert loss_ours == pytest.approx(loss_theirs, abs=1e-5)

    # Adam moves an element by about lr whatever the size of its gradient, so elements whose gradient is
    # within float rounding of zero may step differently on the two sides (up to ~lr each): compare each
    # tensor as a whole, relative to its size, and the two functions (the logits) tightly below.
    for mine, other in lora_pairs(ours, theirs):
        assert ((mine - other).norm() / mine.norm()).item() < 1e-3
    assert ours.blocks[0].attn.q.lora_B.abs().max() > 0  # B did move away from zero
    assert parity.max_logit_difference(ours, theirs, test_batch) < 1e-4
