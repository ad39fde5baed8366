"""SmolLM2-135M QLoRA with activation checkpointing against transformers + peft's plain LoRA: one step each.

    python bench/qlora_step.py                        # 3 interleaved rounds, 1 thread
    python bench/qlora_step.py --rounds 5 --threads 2

minipeft's side is what `train.py --model smollm2 --task rotten_tomatoes_instruct --method qlora --targets
all --grad-checkpoint --batch-size 8 --max-len 128` builds (NF4 + double quantization, block 64, LoRA r=8
α=16 on every linear layer of the blocks, the fast twins on); peft's is LoRA r=8 α=16 on every linear
layer (bench/vs_peft.py's lora_all), no quantization, no checkpointing. Both train on the first 8
rotten_tomatoes_instruct conversations (max 128 tokens, loss on the answers), one AdamW step each, in
rounds (ours, theirs, ours, …) after one warm-up step. Reported: the best CPU time (user + system) and
wall time of the rounds, and the CPU seconds minipeft spent dequantizing 4-bit weights within its step.
"""
import argparse
import os
import time

import vs_peft  # noqa: F401  (puts the repository on sys.path and turns the fast twins on)
import torch

import minipeft as mp  # noqa: E402
from minipeft.core import nf4  # noqa: E402
from minipeft.formats import tasks  # noqa: E402


def sft_batch(rows: int, max_len: int) -> dict:
    tokenizer = mp.from_pretrained("smollm2")[1]
    batch = next(tasks.load_task("rotten_tomatoes_instruct", tokenizer, max_len=max_len).splits["train"].batches(rows))
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")} | {"kind": "sft"}


def minipeft_qlora():
    torch.manual_seed(0)
    model = mp.from_pretrained("smollm2")[0]
    mp.apply(model, "qlora", targets=["all"])
    model.checkpointing = True
    return model.train()


def timed_dequantize(seconds: list):
    """nf4.dequantize_4bit (the fast twin), adding its thread CPU time to seconds[0]."""
    inner = nf4.dequantize_4bit

    def dequantize(*args, **kwargs):
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[0] += time.thread_time() - start
    return dequantize


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed steps per library (the best is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch = sft_batch(8, 128)
    steps = {"minipeft QLoRA + checkpointing": vs_peft.make_step(minipeft_qlora(), batch, "ours")[0],
             "peft LoRA": vs_peft.make_step(vs_peft.theirs("smollm2", "lora_all"), batch, "peft")[0]}
    dequantizing = [0.0]
    nf4.dequantize_4bit = timed_dequantize(dequantizing)
    for step in steps.values():
        step()
    cpu, wall, dequant = ({name: [] for name in steps} for _ in range(3))
    for _ in range(args.rounds):
        for name, step in steps.items():
            dequantizing[0] = 0.0
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            dequant[name].append(dequantizing[0])
    print(f"batch {tuple(batch['input_ids'].shape)}, threads {args.threads}, best of {args.rounds} rounds, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| step | CPU s | wall s | dequantize CPU s |")
    print("|---|---:|---:|---:|")
    for name in steps:
        print(f"| {name} | {min(cpu[name]):.2f} | {min(wall[name]):.2f} | {min(dequant[name]):.2f} |")
    ours, theirs = steps
    print(f"\nQLoRA + checkpointing / peft LoRA: {min(cpu[ours]) / min(cpu[theirs]):.2f}× CPU time, "
          f"{min(wall[ours]) / min(wall[theirs]):.2f}× wall time")


if __name__ == "__main__":
    main()
