"""Packing against padding: the same batches of instruction examples, one optimizer step each way.

    python bench/packing.py                          # SmolLM2-135M-Instruct, LoRA on every linear layer
    python bench/packing.py --model tiny-llama --steps 4

Each step takes the next batch of `--batch-size` training examples of rotten_tomatoes_instruct (the
examples of a batch vary in length: the system prompt, the instruction and one review sentence) and runs
train_step on it twice: padded to the longest example of the batch, and packed into rows of `--max-len`
tokens (data.pack_examples: positions restart and attention stays inside every example). The two are
interleaved step by step so the machine's drift hits both alike; the table gives the median seconds,
the tokens each way (rows × columns) and the losses, which must agree (the same examples, the same
arithmetic) — the model is restored before each packed step so both see the same weights.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minipeft as mp  # noqa: E402
from minipeft.core import loop  # noqa: E402
from minipeft.formats import tasks

mp.fast.enable()  # minipeft as train.py runs it: the fast twins of the core (minipeft/fast/)


def timed_step(model, optimizer, scheduler, batch) -> tuple[float, float]:
    start = time.perf_counter()
    result = loop.train_step(model, optimizer, scheduler, iter([batch]), "sft")
    return time.perf_counter() - start, result.loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="causal LM to train")
    p.add_argument("--steps", type=int, default=6, help="batches timed each way (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--max-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = mp.from_pretrained(args.model)
    task = tasks.load_task("rotten_tomatoes_instruct", tokenizer, max_len=args.max_len)
    mp.apply(model, "lora", targets=["all"])
    optimizer = loop.make_optimizer(model, 1e-3, 0.0)
    scheduler = loop.make_scheduler(optimizer, 0.0, 10 * args.steps)
    model.train()
    train = task.splits["train"]
    times, tokens, losses = {"padded": [], "packed": []}, {"padded": 0, "packed": 0}, []
    for step, indices in enumerate(range(i, i + args.batch_size) for i in range(0, (args.steps + 1) * args.batch_size,
                                                                                  args.batch_size)):
        batches = {"padded": train.collate(list(indices)), "packed": train.packed(args.max_len).collate(list(indices))}
        saved = {k: v.clone() for k, v in mp.trainable_state_dict(model).items()}
        pair = []
        for how, batch in batches.items():
            model.load_state_dict(saved, strict=False)  # both ways start from the same weights
            seconds, loss = timed_step(model, optimizer, scheduler, batch)
            pair.append(loss)
            if step:  # the first batch warms up
                times[how].append(seconds)
                tokens[how] += batch["input_ids"].numel()
        losses.append(pair)
    real = sum(len(train.input_ids[i]) for i in range(args.batch_size, (args.steps + 1) * args.batch_size))
    print(f"{args.model}, LoRA on every linear layer, {args.steps} batches of {args.batch_size} "
          f"rotten_tomatoes_instruct examples ({real:,} real tokens), {args.threads} threads\n")
    print("| batching | tokens computed | padding | median s/step | loss (mean) |")
    print("|---|---:|---:|---:|---:|")
    for i, how in enumerate(("padded", "packed")):
        print(f"| {how} | {tokens[how]:,} | {100 * (1 - real / tokens[how]):.1f} % | "
              f"{statistics.median(times[how]):.3f} | {statistics.mean(l[i] for l in losses[1:]):.6f} |")
    saving = 1 - statistics.median(times["packed"]) / statistics.median(times["padded"])
    print(f"\npacking saves {100 * saving:.0f} % of the step time; largest loss difference "
          f"{max(abs(a - b) for a, b in losses):.2e}")


if __name__ == "__main__":
    main()
