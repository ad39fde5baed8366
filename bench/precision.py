"""fp32 against bf16-mixed on this CPU, for minipeft and for transformers + peft, side by side.

    python bench/precision.py                          # both steps, 5 interleaved rounds
    python bench/precision.py --steps headline --rounds 3
    python bench/precision.py --no-reference           # minipeft only

First the CPU: its model name and the flags that decide whether bf16 is computed natively (avx512_bf16:
a bf16 dot-product instruction; amx_tile, amx_bf16: Intel's matrix tiles), as /proc/cpuinfo lists them
(what lscpu prints), what `--precision auto` chooses here and why, and the load average, since the
machine may be shared. Then the raw rates, GFLOP/s of a
2048² matmul and of F.linear(2048×768 by 768×768), fp32 and bf16. Then one training step (forward, loss,
backward, AdamW step, zero_grad) in both precisions for both libraries:

    headline  all-MiniLM-L6-v2 + a 2-class head, LoRA r=8 α=16 on q,v, batch 16 × --minilm-len random
              token ids (train.py's default run on rotten_tomatoes: its batches, grouped by length, are
              16 × 8 to 16 × 78 tokens), dropout off (train.py's default)
    sft       SmolLM2-135M-Instruct, LoRA r=8 α=16 on every linear layer of the blocks, the first 8
              rotten_tomatoes_instruct conversations (right-padded, loss on the answers only), as
              `train.py --model smollm2 --task rotten_tomatoes_instruct --targets all --batch-size 8`

bf16-mixed is the same recipe on both sides: frozen weights stored in bf16, trainable ones (LoRA, the
classifier head) and AdamW's state in fp32, the forward pass under torch.autocast(bf16). minipeft does
that itself (mp.set_precision); the transformers + peft model gets its frozen weights cast to bf16 and
its step run under autocast here. Both use torch's fused AdamW. Not the same work: transformers' BERT
classifier adds its pooler (one 384×384 matmul per example), and it computes the LM logits of every
token where minipeft sends only the labelled ones through the head (bench/vs_peft.py says more).

Timing: after --warmup untimed steps each, every round runs one step of each of the four models in
turn (minipeft fp32, minipeft bf16, peft fp32, peft bf16), so a change in the machine's load hits all
four alike; the table gives the best of --rounds rounds and, in brackets, the median, of the wall time,
and the best of the CPU time (user + system of all threads: steadier on a busy machine, though it counts
the time threads spend waiting for each other).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benches: their model builders

import vs_peft  # noqa: E402  (puts the repository on sys.path too)
from machine import cpu_description, load_average  # noqa: E402

import minipeft as mp  # noqa: E402

PRECISIONS = ("fp32", "bf16-mixed")
STEPS = {"headline": dict(model="minilm", config="lora_qv"), "sft": dict(model="smollm2", config="lora_all")}
SFT_ROWS = 8  # the SFT step's batch size


# ------------------------------------------------------------------------------------------ the CPU

def raw_rates(rounds: int) -> dict:
    """GFLOP/s of a 2048² matmul and of F.linear(2048×768, 768×768) in fp32 and bf16: best of `rounds`
    interleaved rounds of 3 calls each."""
    calls = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        x, w = torch.randn(2048, 768, dtype=dtype), torch.randn(768, 768, dtype=dtype)
        calls[("matmul 2048²", dtype)] = (lambda a=a, b=b: a @ b, 2 * 2048**3)
        calls[("F.linear 2048×768 · 768²", dtype)] = (lambda x=x, w=w: F.linear(x, w), 2 * 2048 * 768 * 768)
    best = {key: float("inf") for key in calls}
    for fn, _ in calls.values():
        fn()  # warm-up: oneDNN builds its kernels on the first call
    for _ in range(rounds):
        for key, (fn, _) in calls.items():
            start = time.perf_counter()
            for _ in range(3):
                fn()
            best[key] = min(best[key], (time.perf_counter() - start) / 3)
    return {key: flops / best[key] / 1e9 for key, (_, flops) in calls.items()}


def print_raw_table(rates: dict):
    print("| product | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for name in dict.fromkeys(name for name, _ in rates):
        fp32, bf16 = rates[(name, torch.float32)], rates[(name, torch.bfloat16)]
        print(f"| {name} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} |")


# ------------------------------------------------------------------------------------- the steps

def step_batch(step: str, vocab_size: int, minilm_len: int) -> dict:
    """The batch of `step`: bench/vs_peft.py's, MiniLM's cut to minilm_len tokens, SmolLM2's to its
    first SFT_ROWS conversations (and the columns that are padding in all of them)."""
    model = STEPS[step]["model"]
    batch = vs_peft.make_batch(model, vocab_size)
    if model == "minilm":
        return {k: v[:, :minilm_len] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
    rows = {k: v[:SFT_ROWS] if torch.is_tensor(v) else v for k, v in batch.items()}
    width = int(rows["attention_mask"].sum(1).max())
    return {k: v[:, :width] if torch.is_tensor(v) else v for k, v in rows.items()}


def our_loss(model, batch):
    """minipeft's model called as a user would: class logits, or the LM loss of the labelled tokens
    (the batch's labels are already aligned with its inputs: shift_labels)."""
    if batch["kind"] == "classification":
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        return F.cross_entropy(logits, batch["labels"])
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=batch["labels"])


def their_loss(model, batch, precision: str):
    """transformers + peft: the step's forward under autocast for bf16-mixed, the loss in fp32."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = vs_peft.logits_of(model, batch, "peft")
    return F.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten(), ignore_index=-100)


def bf16_mixed(model):
    """Frozen parameters to bf16, the trainable ones stay fp32: minipeft's bf16-mixed, for any model."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return model


def make_step(model, loss):
    """One AdamW step (torch's fused kernel, as transformers' Trainer and minipeft use) of loss(model)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step():
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_steps(step: str, minilm_len: int, reference: bool) -> dict:
    """{(library, precision): one training step} for the four models of `step`, on one batch."""
    model_name, config = STEPS[step]["model"], STEPS[step]["config"]
    steps, batch = {}, None
    for precision in PRECISIONS:
        torch.manual_seed(0)
        ours = mp.set_precision(vs_peft.ours(model_name, config, dropout=0.0), precision)
        if batch is None:
            batch = step_batch(step, ours.cfg.vocab_size, minilm_len)
        steps[("minipeft", precision)] = make_step(ours, lambda m, b=batch: our_loss(m, b))
    for precision in PRECISIONS if reference else ():
        theirs = vs_peft.theirs(model_name, config, dropout=0.0)
        if precision == "bf16-mixed":
            bf16_mixed(theirs)
        steps[("peft", precision)] = make_step(theirs, lambda m, b=batch, p=precision: their_loss(m, b, p))
    return steps, batch


def print_step_table(step: str, batch: dict, wall: dict, cpu: dict):
    """Wall s/step, best (median), and the best CPU s/step of each library in each precision."""
    shape = "×".join(map(str, batch["input_ids"].shape))
    print(f"\n{step}: {STEPS[step]['model']}, LoRA ({STEPS[step]['config']}), batch {shape}")
    print("| library | fp32 s/step | bf16-mixed s/step | bf16 / fp32 | fp32 CPU s | bf16-mixed CPU s | bf16 / fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    best = {key: min(times) for key, times in wall.items()}
    best_cpu = {key: min(times) for key, times in cpu.items()}
    for library in dict.fromkeys(library for library, _ in wall):
        cells = [f"{best[(library, p)]:.3f} ({statistics.median(wall[(library, p)]):.3f})" for p in PRECISIONS]
        ratio = best[(library, "bf16-mixed")] / best[(library, "fp32")]
        cells += [f"{ratio:.2f}"] + [f"{best_cpu[(library, p)]:.3f}" for p in PRECISIONS]
        cells.append(f"{best_cpu[(library, 'bf16-mixed')] / best_cpu[(library, 'fp32')]:.2f}")
        print(f"| {library} | " + " | ".join(cells) + " |")
    if ("peft", "fp32") in best:
        ratios = [best[("minipeft", p)] / best[("peft", p)] for p in PRECISIONS]
        cpu_ratios = [best_cpu[("minipeft", p)] / best_cpu[("peft", p)] for p in PRECISIONS]
        print("| minipeft / peft | " + " | ".join(f"{r:.2f}" for r in ratios) + " | | "
              + " | ".join(f"{r:.2f}" for r in cpu_ratios) + " | |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (the best is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the whole run")
    p.add_argument("--minilm-len", type=int, default=32, help="tokens per row of the headline's batch")
    p.add_argument("--no-reference", action="store_true", help="time minipeft only (no transformers + peft)")
    args = p.parse_args()
    chosen = [s for s in args.steps.split(",") if s]
    if unknown := [s for s in chosen if s not in STEPS]:
        p.error(f"unknown step {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or not 1 <= args.minilm_len <= 128:
        p.error("need --rounds >= 1, --warmup >= 0, --threads >= 1 and --minilm-len in 1..128")
    torch.set_num_threads(args.threads)
    if not args.no_reference:
        import transformers
        transformers.logging.set_verbosity_error()  # no load report for the fresh classifier head
        transformers.logging.disable_progress_bar()
    print(cpu_description())
    print(f"torch {torch.__version__}, {args.threads} threads; {load_average()} at the start")
    auto, why = mp.precision.auto_precision(torch.device("cpu"))
    print(f"--precision auto on this CPU: {auto} ({why})")
    print_raw_table(raw_rates(rounds=5))
    for step in chosen:
        steps, batch = build_steps(step, args.minilm_len, not args.no_reference)
        print_step_table(step, batch, *vs_peft.interleaved(steps, args.warmup, args.rounds))
        del steps
    print(f"\nbest of {args.rounds} interleaved rounds (median in brackets) after {args.warmup} warm-up steps "
          f"each; {load_average()} at the end")


if __name__ == "__main__":
    main()
