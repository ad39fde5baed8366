"""A step's loss is the mean over every labelled token of its global batch, however the batch is split
(loop.accumulate_gradients): one batch of 8 instruction examples whose answers are 1 to 30 tokens
long, the same 8 as 2 micro-batches of 4 (gradient accumulation), as 2 processes × 4 (DDP and FSDP,
torch.multiprocessing with gloo) and packed into shared rows give the same gradients and the same
logged loss, within 1e-10 relative, and the same adapter after a few optimizer steps.

The model is in float64, in which minipeft's norms and losses compute too (fp32 for narrower). In float32
the splits differ by rounding alone (2.6e-7 and 4.5e-7 in the gradients on one CPU), which differs from CPU
to CPU, and three AdamW steps amplify it where a gradient is near zero (Adam divides each element by its
own running scale): 4.3e-6 in the adapter of two processes on an AMD EPYC. In float64 every split is within
1e-14 of one batch here, so the tolerance sits far above rounding on any CPU and far below the smallest
bug's 0.24.

The split is chosen to be as unequal as it can be: the short answers all go to the first micro-batch
(or process), the long ones to the second. Averaging each micro-batch's own mean, as the loop once
did, misses by tens of percent here (test_averaging_means_would_be_far_off)."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import minipeft as mp
from minipeft.core import data, loop
from minipeft.run import trainer
import minipeft.fast
from minipeft.scale import sharding
from minipeft.scale.processes import Processes, check_same_options, data_parallel
from conftest import join_gloo_group, spawn_gloo_group, tiny_model

ANSWER_LENGTHS = (1, 2, 1, 3, 30, 20, 25, 28)  # the first four short, the last four long
PROMPT_LENGTHS = (5, 9, 3, 7, 4, 8, 6, 2)
STEPS = 3
TOLERANCE = 1e-10  # relative, in float64


@pytest.fixture(scope="module", autouse=True)
def fast_twins():
    """The loop as train.py runs it, with the fast twins in (the tiled LM loss; tests/test_losses.py checks
    it against the core's F.cross_entropy)."""
    minipeft.fast.enable()
    yield
    minipeft.fast.disable()


def sft_examples() -> data.Dataset:
    """8 instruction examples: a prompt (no loss) and an answer of 1 to 30 labelled tokens each."""
    g = torch.Generator().manual_seed(0)
    input_ids, labels = [], []
    for prompt, answer in zip(PROMPT_LENGTHS, ANSWER_LENGTHS):
        ids = torch.randint(1, 97, (prompt + answer + 1,), generator=g).tolist()
        input_ids.append(ids)
        labels.append([data.IGNORE_INDEX] * prompt + ids[prompt + 1:] + [data.IGNORE_INDEX])  # next tokens
    return data.Dataset("sft", input_ids, labels, pad_id=0)


def lora_model() -> mp.Transformer:
    """Tiny Llama in float64 with LoRA on every linear layer, B moved off zero so that every gradient is
    non-zero."""
    model = mp.apply(tiny_model("llama", seed=0), "lora", rank=4, targets="all")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.double().train()


SPLITS = {  # how the 8 examples are fed to one process: micro-batches of example indices
    "one batch": [list(range(8))],
    "2 × 4 accumulation": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "4 × 2 accumulation": [[0, 4], [1, 5], [2, 6], [3, 7]],
}


def step_of(model, batches: list[dict], world_size: int = 1):
    """(the step's logged loss, the gradients of the trainable parameters, the examples it counts for all
    processes) for these micro-batches."""
    processes = Processes() if world_size > 1 else loop.ONE_PROCESS
    loss, examples, _ = loop.accumulate_gradients(model, iter(batches), "sft", len(batches), torch.device("cpu"),
                                                  processes)
    loss = processes.total(torch.tensor(loss, dtype=torch.float64)).item() / world_size
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss, grads, examples


def trained(model, batches: list[dict], world_size: int = 1) -> tuple[dict, list[tuple[float, float]]]:
    """The trainable parameters after STEPS AdamW steps on the same micro-batches each step, and each step's
    logged (loss, gradient norm)."""
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.01)
    scheduler = loop.make_scheduler(optimizer, warmup=0.0, steps=STEPS)
    logged = []
    for _ in range(STEPS):
        step = loop.train_step(model, optimizer, scheduler, iter(batches), "sft", len(batches), 1.0,
                               Processes() if world_size > 1 else loop.ONE_PROCESS)
        logged.append((step.loss, step.grad_norm))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, logged


def relative(a: dict, b: dict) -> float:
    """The largest ‖a − b‖ / ‖b‖ over the tensors."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


@pytest.fixture(scope="module")
def reference():
    """The whole batch of 8 as one micro-batch: loss, gradients, the parameters after STEPS steps and each
    step's logged (loss, gradient norm)."""
    examples = sft_examples()
    batch = [examples.collate(list(range(8)))]
    loss, grads, counted = step_of(lora_model(), batch)
    assert counted == 8
    params, logged = trained(lora_model(), batch)
    assert abs(logged[0][0] - loss) <= TOLERANCE * loss  # train_step logs the loss of its first step
    return loss, grads, params, logged


@pytest.mark.parametrize("split", [s for s in SPLITS if s != "one batch"])
def test_accumulation_equals_one_batch(split, reference):
    examples = sft_examples()
    batches = [examples.collate(indices) for indices in SPLITS[split]]
    loss, grads, counted = step_of(lora_model(), batches)
    assert counted == 8
    assert abs(loss - reference[0]) <= TOLERANCE * reference[0]
    assert relative(grads, reference[1]) <= TOLERANCE
    assert relative(trained(lora_model(), batches)[0], reference[2]) <= TOLERANCE


def test_packed_equals_one_batch(reference):
    examples = sft_examples().packed(max_len=64)
    batch = examples.collate(list(range(8)))
    assert len(batch["input_ids"]) < 8  # rows really are shared
    loss, grads, counted = step_of(lora_model(), [batch])
    assert counted == 8  # the packed rows hold 8 examples
    assert abs(loss - reference[0]) <= TOLERANCE * reference[0]
    assert relative(grads, reference[1]) <= TOLERANCE
    assert relative(trained(lora_model(), [batch])[0], reference[2]) <= TOLERANCE


def test_averaging_means_would_be_far_off(reference, capsys):
    """What the loss accounting guards against: the mean of the micro-batches' own means (a token of a
    short answer weighs more than one of a long answer) — far from the batch's gradient. With -s, the
    README's table: each split's largest relative gradient difference against one batch, both ways."""
    examples = sft_examples()
    rows = []
    for split in ("2 × 4 accumulation", "4 × 2 accumulation"):
        batches = [examples.collate(indices) for indices in SPLITS[split]]
        model = lora_model()
        for batch in batches:
            (loop.loss_fn(model, batch, "sft") / len(batches)).backward()
        means = relative({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, reference[1])
        rows.append(f"| {split} | {means:.2g} | {relative(step_of(lora_model(), batches)[1], reference[1]):.2g} |")
        assert means > 0.2
    with capsys.disabled():
        print("\n| split of the 8 examples | averaging micro-batch means | mean over the global batch's tokens |")
        print("\n".join(rows))


def test_the_step_loss_is_the_token_mean(reference):
    """The logged loss is Σ ℓ_i / N over the 8 examples' labelled tokens, written out here."""
    examples = sft_examples()
    model = lora_model()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(8):
            ids, labels = torch.tensor([examples.input_ids[i]]), torch.tensor(examples.labels[i])
            logits = model(ids)[0]  # (T, vocab)
            keep = labels != data.IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert count == sum(ANSWER_LENGTHS)
    assert abs(reference[0] - total / count) <= 1e-5 * reference[0]


def test_a_grad_accum_longer_than_an_epoch_stops():
    cfg = trainer.TrainConfig(batch_size=4, grad_accum=3)
    with pytest.raises(ValueError, match="--grad-accum 3 .* 2 batches of 4"):
        trainer.count_steps(sft_examples(), cfg, world_size=1)


# ----------------------------------------------------------------------------------------------------
# two processes: rank 0 gets the four short answers, rank 1 the four long ones


def _worker(rank, world_size, folder):
    join_gloo_group(rank, world_size, folder)
    try:
        examples = sft_examples()
        mine = [examples.collate(SPLITS["2 × 4 accumulation"][rank])]
        results = {}
        for layout in ("ddp", "fsdp"):
            model = lora_model()
            net = data_parallel(model) if layout == "ddp" else sharding.shard(model)
            loss, grads, counted = step_of(net, mine, world_size)
            params, logged = trained(net, mine, world_size)
            if layout == "fsdp":
                grads = {n: sharding.whole_tensor(g) for n, g in grads.items()}
                with sharding.whole(net):
                    params = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
            unwrap = lambda d: {n.removeprefix("module."): t for n, t in d.items()}  # noqa: E731 (DDP's prefix)
            results[layout] = {"loss": loss, "grads": unwrap(grads), "trained": unwrap(params), "examples": counted,
                              "logged": logged}
        if rank == 0:
            torch.save(results, Path(folder) / "results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    spawn_gloo_group(_worker, folder)
    return torch.load(folder / "results.pt")


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_processes_equal_one_batch(layout, two_processes, reference):
    result = two_processes[layout]
    assert result["examples"] == 8  # each process counts the step's global batch, not its own 4
    assert abs(result["loss"] - reference[0]) <= TOLERANCE * reference[0]
    assert relative(result["grads"], reference[1]) <= TOLERANCE
    assert relative(result["trained"], reference[2]) <= TOLERANCE
    for (loss, grad_norm), (one_loss, one_grad_norm) in zip(result["logged"], reference[3], strict=True):
        assert abs(loss - one_loss) <= TOLERANCE * one_loss
        assert abs(grad_norm - one_grad_norm) <= TOLERANCE * one_grad_norm


def test_processes_with_different_options_stop(tmp_path):
    """Every process must be started with the same options: rank 1's other --grad-accum stops both."""
    spawn_gloo_group(_options_worker, tmp_path)
    message = json.loads((tmp_path / "message.json").read_text())
    assert "different options" in message and "grad_accum 1 vs 2" in message


def _options_worker(rank, world_size, folder):
    join_gloo_group(rank, world_size, folder)
    try:
        try:
            check_same_options({"grad_accum": 1 + rank, "lr": 1e-3}, world_size)
            message = "no error"
        except ValueError as e:
            message = str(e)
        if rank == 0:
            (Path(folder) / "message.json").write_text(json.dumps(message))
    finally:
        dist.destroy_process_group()
