"""Where fine-tuning memory goes: peak RSS of full fine-tuning, LoRA and QLoRA, each with and without
activation checkpointing, minipeft next to transformers + peft (+ bitsandbytes for QLoRA), with the
ledger's prediction (mp.memory_report) next to every minipeft measurement.

    python bench/memory.py                                    # both models, all six configurations
    python bench/memory.py --models gpt2 --configs lora,qlora-ckpt --steps 1 --no-reference
    python bench/memory.py --mmap-threshold 0                 # glibc's default allocator policy
    python bench/memory.py --ledger --models gpt2 --configs full,lora,qlora,qlora-ckpt   # ledger only

Models (batch 4 × 256 tokens, causal LM, next-token loss on a fixed random batch, dropout 0):
    gpt2     the GPT-2-small shape, random weights: 12 layers, d 768, 12 heads, vocab 50257, 1024 positions
    smollm2  the real SmolLM2-135M (mp.from_pretrained("smollm2")); transformers gets a LlamaForCausalLM
             with SmolLM2's config and *the same weights*, exported from ours to an HF folder once
             (checkpoints/bench_memory/), so both compute the same loss (the `loss` column)
Configurations: full (every parameter); lora (r=8, α=16 on q and v — GPT-2 in transformers has a fused
c_attn, so peft's LoRA covers q, k and v there, with the same 24,576 parameters per layer); qlora (the
same LoRA on a base whose block linears are NF4 with double quantization, block 64; transformers:
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), which
runs on CPU with bitsandbytes 0.50.2); and each with activation checkpointing ("-ckpt":
model.checkpointing = True, resp. gradient_checkpointing_enable(use_reentrant=False)). A configuration may
end in a precision, "@bf16-mixed" or "@bf16-true" (mp.set_precision after the method; transformers loads the
same base in bf16, and peft keeps LoRA's weights in fp32 under bf16-mixed, its default
autocast_adapter_dtype=True, or in bf16 under bf16-true); without one, fp32. The summary compares
lora@bf16-mixed with lora and full@bf16-true with full (issue 15's targets: ≤ 0.65× and ≤ 0.6×).

Each (model, configuration, library) runs in a fresh process: build the model and apply the method, then
reset the process's peak-RSS mark (writing 5 to /proc/self/clear_refs), so loading — which briefly holds
an fp32 copy while quantizing, or a GGUF file being dequantized — is not counted. Then one warm-up step
and `--steps` timed steps of forward, backward, AdamW step (lr 1e-5, weight decay 0.01) and
zero_grad(set_to_none=True). "peak RSS" is getrusage(RUSAGE_SELF).ru_maxrss at the end (the parent never
imports torch: a child's ru_maxrss starts from its parent's). "s/step" is wall time, "CPU s/step" user +
system time (steadier on a shared machine), both the mean of the timed steps. "ledger" is
mp.memory_report(model, 4, 256)["total"], computed before training; "ratio" is ledger / measured.

Allocator: every process (both libraries) first calls mp.memory.mmap_large_tensors(--mmap-threshold), so
freed tensors leave the process and RSS follows the live tensors, which is what the ledger counts; with
--mmap-threshold 0, glibc's default heap keeps freed activations resident (see that function). The
header line measures the runtime itself: RSS after importing torch + minipeft, and after two tiny
training steps with every tensor freed again (the ledger's RUNTIME_BYTES).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "checkpoints" / "bench_memory"
MODELS = ("gpt2", "smollm2")
CONFIGS = ("full", "lora", "qlora", "full-ckpt", "lora-ckpt", "qlora-ckpt", "lora@bf16-mixed", "lora@bf16-true",
           "full@bf16-true")
LIBRARIES = ("minipeft", "transformers")
BATCH, SEQ = 4, 256
GPT2_SMALL = dict(n_layer=12, n_head=12, d_model=768, vocab_size=50257, max_seq_len=1024)


# ------------------------------------------------------------------------- inside a worker process

def _rss_status() -> dict:
    """Current and peak resident set size of this process (bytes), from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def _reset_peak() -> bool:
    """Set the kernel's peak-RSS mark (what ru_maxrss reports) back to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _batch(vocab_size: int):
    import torch
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.cat([idx[:, 1:], torch.full((BATCH, 1), -100)], dim=1)  # next token; last: none
    return idx, labels


def parse_config(config: str) -> tuple[str, bool, str]:
    """"lora-ckpt@bf16-mixed" -> ("lora", True, "bf16-mixed"): method, checkpointing, precision."""
    name, _, precision = config.partition("@")
    return name.removesuffix("-ckpt"), name.endswith("-ckpt"), precision or "fp32"


def _minipeft_model(model_name: str, config: str):
    import torch
    import minipeft as mp
    mp.fast.enable()  # as train.py runs it
    method, checkpointing, precision = parse_config(config)
    if model_name == "gpt2":
        torch.manual_seed(0)
        model = mp.Transformer(mp.ModelConfig(flavor="gpt2", **GPT2_SMALL))
        if method == "qlora":
            mp.quant.quantize_blocks(model)
    else:
        model, _ = mp.from_pretrained("smollm2", quantize="nf4" if method == "qlora" else None)
    options = {} if method == "full" else dict(rank=8, alpha=16, targets=("q", "v"))
    mp.apply(model, method, **options)
    mp.set_precision(model, precision)  # frozen weights to bf16 (bf16-*), trainable ones too under bf16-true
    model.checkpointing = checkpointing
    return model.train()


def _hf_folder(model_name: str) -> Path:
    return CACHE / f"{model_name}-hf"


def prepare_hf_folder(model_name: str):
    """Write the transformers checkpoint the reference side loads (once): random GPT-2-small, or
    SmolLM2 with our loaded weights renamed to transformers' Llama keys."""
    import torch
    import transformers
    folder = _hf_folder(model_name)
    if (folder / "config.json").exists():
        return
    if model_name == "gpt2":
        torch.manual_seed(0)
        c = GPT2_SMALL
        config = transformers.GPT2Config(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["d_model"],
                                         vocab_size=c["vocab_size"], n_positions=c["max_seq_len"],
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = transformers.GPT2LMHeadModel(config)
    else:
        import minipeft as mp
        from minipeft.formats.pretrained import HF_PREFIXES, LLAMA_RULES
        from minipeft.formats.weights import their_name
        ours, _ = mp.from_pretrained("smollm2")
        c = ours.cfg
        config = transformers.LlamaConfig(
            hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, vocab_size=c.vocab_size,
            max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0)
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(config)
        state = {}
        for name, tensor in ours.state_dict().items():
            if name.startswith("rope_") or (name == "head.weight" and c.tie_embeddings):
                continue
            theirs = their_name(name, LLAMA_RULES)
            state[theirs if theirs.startswith("lm_head") else HF_PREFIXES["llama"] + theirs] = tensor
        hf.load_state_dict(state, strict=False, assign=True)
        hf.tie_weights()
        missing = [n for n, p in hf.named_parameters() if p.is_meta]
        assert not missing, f"not exported: {missing}"
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)


def _transformers_model(model_name: str, config: str):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    method, checkpointing, precision = parse_config(config)
    # the same base dtype: bf16 weights for either bf16 precision; peft keeps LoRA's weights in fp32 by default
    # (autocast_adapter_dtype=True, the bf16-mixed recipe) and in the base's bf16 without it (bf16-true)
    kwargs = dict(dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float32, attn_implementation="sdpa")
    if method == "qlora":
        kwargs.update(device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = transformers.AutoModelForCausalLM.from_pretrained(_hf_folder(model_name), **kwargs)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        targets = ["c_attn"] if model_name == "gpt2" else ["q_proj", "v_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=precision != "bf16-true")
    return model.train()


def run_one(model_name: str, config: str, library: str, steps: int, trace: bool, mmap_threshold: int) -> dict:
    """Build, reset the peak mark, train 1 + steps steps; returns the measurements (bytes, seconds)."""
    import gc
    import resource
    import torch
    import minipeft as mp
    from minipeft.core import loop
    from minipeft.run import report
    if mmap_threshold:
        mp.memory.mmap_large_tensors(mmap_threshold)
    if library == "minipeft":
        model = _minipeft_model(model_name, config)
        ledger = mp.memory_report(model, BATCH, SEQ)
        vocab = model.cfg.vocab_size
        optimizer = loop.make_optimizer(model, lr=1e-5, weight_decay=0.01)

        def loss_of(idx, labels):
            return loop.loss_fn(model, {"input_ids": idx, "attention_mask": None, "labels": labels}, "lm")
    else:
        model = _transformers_model(model_name, config)
        ledger = None
        vocab = model.config.vocab_size
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                      weight_decay=0.01, fused=True)  # transformers' Trainer's default

        def loss_of(idx, labels):  # transformers shifts the labels itself
            return model(input_ids=idx, labels=idx).loss
    idx, labels = _batch(vocab)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gc.collect()
    reset = _reset_peak()
    setup_rss = _rss_status()["VmRSS"]
    losses, times, cpu_times, phases = [], [], [], []
    for step in range(1 + steps):
        start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        loss = loss_of(idx, labels)
        after_forward = _rss_status()
        loss.backward()
        after_backward = _rss_status()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step = _rss_status()
        if step:
            times.append(time.perf_counter() - start)
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            cpu_times.append(cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime)
        losses.append(loss.item())
        del loss
        phases.append({"forward": after_forward, "backward": after_backward, "optimizer": after_step})
        if trace:
            print(f"[{library} {model_name} {config}] step {step}: " + ", ".join(
                f"{k} RSS {v['VmRSS'] / 2**20:.0f} (peak {v['VmHWM'] / 2**20:.0f}) MiB" for k, v in
                phases[-1].items()), file=sys.stderr, flush=True)
    return {"model": model_name, "config": config, "library": library, "peak_rss": report.peak_memory_bytes(),
            "peak_reset": reset, "setup_rss": setup_rss, "seconds_per_step": sum(times) / max(1, len(times)),
            "cpu_seconds_per_step": sum(cpu_times) / max(1, len(cpu_times)),
            "loss": losses[0], "trainable": trainable, "ledger": ledger, "threads": torch.get_num_threads()}


def runtime_baseline(mmap_threshold: int) -> dict:
    """Resident size of the runtime itself: after importing torch and minipeft, and after two training
    steps of a tiny model (forward, backward, AdamW) once every tensor is freed again."""
    import gc
    import minipeft as mp  # and torch
    from minipeft.core import loop
    imported = _rss_status()["VmRSS"]
    if mmap_threshold:
        mp.memory.mmap_large_tensors(mmap_threshold)
    model = mp.apply(mp.Transformer(mp.ModelConfig(flavor="gpt2", n_layer=1, d_model=64, vocab_size=256)), "lora")
    optimizer = loop.make_optimizer(model, lr=1e-5, weight_decay=0.01)
    idx, labels = _batch(256)
    for _ in range(2):
        loop.loss_fn(model, {"input_ids": idx, "attention_mask": None, "labels": labels}, "lm").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del model, optimizer, idx, labels
    gc.collect()
    return {"import": imported, "trained": _rss_status()["VmRSS"], "constant": mp.memory.RUNTIME_BYTES}


# ------------------------------------------------------------------------------- the parent process

def _worker(args: list[str], timeout: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.stderr.strip() and "--trace" in args:
        print("\n".join(l for l in done.stderr.splitlines() if l.startswith("[")), file=sys.stderr)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_ledgers(models: list[str], configs: list[str]):
    """The README's worked example: mp.memory_report's components for each configuration, in MiB."""
    import minipeft as mp
    print(f"batch {BATCH} × {SEQ}, fp32, AdamW; MiB\n")
    print("| model | config | frozen fp32 | frozen 4-bit | trainable | gradients | AdamW moments "
          "| activations | runtime | predicted peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model_name in models:
        for config in configs:
            r = mp.memory_report(_minipeft_model(model_name, config), BATCH, SEQ)
            cells = [r[k] for k in ("weights_frozen", "weights_4bit", "weights_trainable", "gradients",
                                    "optimizer", "activations", "runtime", "total")]
            print(f"| {model_name} | {config} | " + " | ".join(mib(c) for c in cells) + " |")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3,
                   help="timed training steps per configuration, after one untimed warm-up step (default 3)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated configurations, from: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models, from: {', '.join(MODELS)} (default: both)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip transformers + peft (+ bitsandbytes): measure minipeft only")
    p.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                   help="in every process (both libraries), allocations of this many bytes or more get their "
                        "own mmap, returned to the OS when freed (mp.memory.mmap_large_tensors); 0 keeps "
                        "glibc's default, whose heap keeps freed activations resident (default 131072)")
    p.add_argument("--trace", action="store_true",
                   help="print RSS and peak RSS after forward, backward and optimizer step of every step")
    p.add_argument("--ledger", action="store_true",
                   help="print only minipeft's ledger, component by component, for each model and "
                        "configuration (builds the models, trains nothing)")
    p.add_argument("--run-one", nargs=3, metavar=("MODEL", "CONFIG", "LIBRARY"),
                   help="internal: run one configuration in this process and print its measurements as JSON")
    p.add_argument("--prepare", metavar="MODEL", help="internal: write the transformers checkpoint of MODEL")
    p.add_argument("--runtime", action="store_true", help="internal: measure the runtime baseline, print JSON")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))

    if args.run_one:
        print(json.dumps(run_one(*args.run_one, steps=args.steps, trace=args.trace,
                                 mmap_threshold=args.mmap_threshold)))
        return
    if args.prepare:
        prepare_hf_folder(args.prepare)
        print(json.dumps({"prepared": str(_hf_folder(args.prepare))}))
        return
    if args.runtime:
        print(json.dumps(runtime_baseline(args.mmap_threshold)))
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [m for m in models if m not in MODELS] + [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown model/configuration {bad}; models: {', '.join(MODELS)}; "
                         f"configurations: {', '.join(CONFIGS)}")
    if args.ledger:
        print_ledgers(models, configs)
        return
    libraries = ["minipeft"] + ([] if args.no_reference else ["transformers"])

    runtime = _worker(["--runtime", "--mmap-threshold", str(args.mmap_threshold)])
    allocator = (f"mmap for allocations >= {args.mmap_threshold:,} bytes" if args.mmap_threshold
                 else "glibc default")
    print(f"batch {BATCH} × {SEQ}, {args.steps} timed steps after 1 warm-up, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, allocator: {allocator}")
    print(f"runtime: RSS after importing torch + minipeft {mib(runtime['import'])} MiB; after two tiny training "
          f"steps, tensors freed, {mib(runtime['trained'])} MiB (the ledger uses memory.RUNTIME_BYTES = "
          f"{mib(runtime['constant'])} MiB)\n")
    print("| model | config | library | trainable params | peak RSS MiB | ledger MiB | ratio "
          "| s/step | CPU s/step | loss |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for model_name in models:
        if not args.no_reference:
            prepared = _worker(["--prepare", model_name])
            if "error" in prepared:
                print(f"(could not prepare the transformers checkpoint of {model_name}: {prepared['error']})")
        for config in configs:
            for library in libraries:
                r = _worker(["--run-one", model_name, config, library, "--steps", str(args.steps),
                             "--mmap-threshold", str(args.mmap_threshold)] + (["--trace"] if args.trace else []))
                r.update(model=model_name, config=config, library=library)
                results.append(r)
                name = "minipeft" if library == "minipeft" else \
                    "transformers + peft" + (" + bitsandbytes" if config.startswith("qlora") else "")
                if "error" in r:
                    print(f"| {model_name} | {config} | {name} | — | failed: {r['error'][:120]} | | | | | |",
                          flush=True)
                    continue
                ledger = r["ledger"]["total"] if r.get("ledger") else None
                predicted = (mib(ledger), f"{ledger / r['peak_rss']:.2f}") if ledger else ("—", "—")
                print(f"| {model_name} | {config} | {name} | {r['trainable']:,} | {mib(r['peak_rss'])} | "
                      f"{predicted[0]} | {predicted[1]} | {r['seconds_per_step']:.2f} | "
                      f"{r['cpu_seconds_per_step']:.2f} | {r['loss']:.4f} |",
                      flush=True)
    summarize(results, models)


def summarize(results: list[dict], models: list[str]):
    """The issue's targets: QLoRA + checkpointing vs peft's plain LoRA, and the ledger's accuracy."""
    def find(model, config, library):
        for r in results:
            if (r["model"], r["config"], r["library"]) == (model, config, library) and "error" not in r:
                return r
    print()
    for model in models:
        ours, theirs = find(model, "qlora-ckpt", "minipeft"), find(model, "lora", "transformers")
        if ours and theirs:
            print(f"{model}: minipeft QLoRA + checkpointing uses {ours['peak_rss'] / theirs['peak_rss']:.2f}× "
                  f"the peak RSS of peft LoRA without it (target ≤ 0.35) at "
                  f"{ours['seconds_per_step'] / theirs['seconds_per_step']:.2f}× its step time "
                  f"({ours['cpu_seconds_per_step'] / theirs['cpu_seconds_per_step']:.2f}× its CPU time; "
                  "target ≤ 1.4)")
        for low, high, target in (("lora@bf16-mixed", "lora", 0.65), ("full@bf16-true", "full", 0.6)):
            ours_low, ours_high = find(model, low, "minipeft"), find(model, high, "minipeft")
            if ours_low and ours_high:
                print(f"{model}: minipeft {low} peaks at {ours_low['peak_rss'] / ours_high['peak_rss']:.2f}× the "
                      f"RSS of {high} in fp32 (target ≤ {target}); loss {ours_low['loss']:.4f} vs "
                      f"{ours_high['loss']:.4f}")
        ratios = [r["ledger"]["total"] / r["peak_rss"] for r in results
                  if r["model"] == model and r["library"] == "minipeft" and r.get("ledger")]
        if ratios:
            print(f"{model}: ledger / measured from {min(ratios):.2f} to {max(ratios):.2f} "
                  f"over {len(ratios)} minipeft configurations (target: within 0.80–1.20)")


if __name__ == "__main__":
    main()
