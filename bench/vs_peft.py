"""minipeft against transformers + peft on identical work: one optimizer step per configuration.

    python bench/vs_peft.py                                   # every configuration, both models
    python bench/vs_peft.py --models minilm --configs lora_qv,full --steps 10
    python bench/vs_peft.py --models gpt2 --configs lora_qv,qlora --tables qlora   # QLoRA / LoRA step
    python bench/vs_peft.py --models minilm --configs lora_qv,full --dropouts 0      # dropout off only

Work: one AdamW step (forward, cross-entropy, backward, optimizer step, zero_grad) on fixed random
token ids, for
    minilm    all-MiniLM-L6-v2 (real weights in both libraries), classification, batch 16 × 128;
    gpt2      a GPT-2-small shape (12 layers, d 768, vocab 50,257, random weights), causal LM, 4 × 256;
    smollm2   SmolLM2-135M-Instruct (the same dequantized GGUF weights in both libraries: transformers
              loads the file with gguf_file=), instruction tuning: the first 16 rotten_tomatoes_instruct
              training conversations in the chat template, right-padded, loss on the answers only
              (labels -100 elsewhere). Only lora_qv and lora_all (every linear layer) are timed here.
minipeft's LM loss is the trainer's (loop.loss_fn): the labelled tokens only, through the head in
tiles (losses.py), recomputed in backward; transformers computes all (B, T, V) logits at once.
Each configuration runs with the model's own dropout (MiniLM and GPT-2: 0.1 on the embeddings, the
attention weights and each sub-layer's output; SmolLM2 has none) and with dropout off on both sides
(--dropouts). Dropout off isolates everything else: minipeft draws its dropout masks faster than
PyTorch's own, which helps it only while dropout is on.
The two libraries' steps are interleaved (ours, theirs, ours, ...) after --warmup untimed steps, and
each time is the median of --steps, so drift in the machine's speed hits both alike.

Configurations: full fine-tuning; LoRA r=8 α=16 on q,v; LoRA r=8 on every linear layer of the blocks;
prefix tuning (20 virtual tokens, no reparameterization); prompt tuning (20 soft tokens); QLoRA (NF4,
double quantization, r=8 on q,v) against bitsandbytes 4-bit + peft where that runs on this CPU.

Not quite the same work, and said so in the table's notes:
  - GPT-2 in transformers fuses q, k, v into one `c_attn`; peft can only adapt the whole of it. LoRA on
    q,v has the same parameter count there (r·(768 + 2304) = 2·r·(768 + 768)), LoRA on every linear
    layer does not (peft: c_attn, c_proj, c_fc, mlp.c_proj; ours: q, k, v, o, up, down).
  - transformers' BERT classifier adds a pooler (dense + tanh on [CLS], frozen) before the head;
    minilm in minipeft mean-pools as sentence-transformers trained it. One 384×384 matmul per example.

QLoRA against LoRA (ours only, same run, interleaved): a LoRA q,v step and a QLoRA q,v step on the same
model and batch, whenever both lora_qv and qlora are among the configurations; the ratio is what the
4-bit base costs (dequantizing every block linear layer in forward and again in backward).

It also measures the machine's fp32 matmul rate (a 2048² `torch.mm`; for full fine-tuning once more,
interleaved with that row's steps, since this machine's speed drifts) and, for full fine-tuning, the
fraction of that row's rate each library's step achieves, counting 6 × W × tokens floating-point operations, W the
weights that multiply activations (linear layers and the LM head; not embedding lookups, biases or
norms): forward 2, backward 4 per weight and token; attention scores not counted. Last, the inference
cost of LoRA: a no-grad forward of the base model, of the unmerged and of the merged LoRA model.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minipeft as mp  # noqa: E402
from minipeft.core import loop  # noqa: E402
from minipeft.formats import tasks
from minipeft.formats.assets import asset_path  # noqa: E402
from minipeft.core.lora import LoRALinear  # noqa: E402

mp.fast.enable()  # minipeft as train.py runs it: the fast twins of the core (minipeft/fast/)

CONFIGS = ("full", "lora_qv", "lora_all", "prefix", "prompt", "qlora")
MODELS = {"minilm": dict(batch=16, seq=128, kind="classification"),
          "gpt2": dict(batch=4, seq=256, kind="lm"),
          "smollm2": dict(batch=16, seq=None, kind="sft", configs=("lora_qv", "lora_all"))}
GPT2_SMALL = dict(flavor="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                  dropout=0.1, tie_embeddings=True)


# ---------------------------------------------------------------- the two sides of each configuration

def base_model(model_name: str, quantize: str | None = None, dropout: float | None = None):
    """minilm with a fresh 2-class head, or the random GPT-2-small shape; no method applied. dropout:
    the model's own (None) or this probability everywhere."""
    if model_name in ("minilm", "smollm2"):
        return mp.from_pretrained(model_name, n_classes=2 if model_name == "minilm" else None, quantize=quantize,
                                  dropout=dropout)[0]
    return mp.Transformer(mp.ModelConfig(**{**GPT2_SMALL, "dropout": GPT2_SMALL["dropout"] if dropout is None
                                            else dropout}))


def ours(model_name: str, config: str, dropout: float | None = None):
    """A minipeft model with `config` applied, in training mode."""
    model = base_model(model_name, quantize="nf4" if config == "qlora" else None, dropout=dropout)
    method, options = {
        "full": ("full", {}),
        "lora_qv": ("lora", dict(rank=8, alpha=16, targets=("q", "v"))),
        "lora_all": ("lora", dict(rank=8, alpha=16, targets=("q", "k", "v", "o", "up", "down")
                                  + (("gate",) if model.cfg.gated else ()))),
        "prefix": ("prefix", dict(length=20, mlp_hidden=0)),
        "prompt": ("prompt", dict(length=20)),
        "qlora": ("qlora", dict(rank=8, alpha=16, targets=("q", "v")))}[config]
    mp.apply(model, method, **options)
    return model.train()


def theirs(model_name: str, config: str, dropout: float | None = None):
    """The same configuration built with transformers + peft (+ bitsandbytes for qlora)."""
    import peft
    import transformers
    quantization = None
    dropout_config = {} if dropout is None else {  # the config names of each family's dropout
        "minilm": dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
        "gpt2": dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout),
        "smollm2": dict(attention_dropout=dropout)}[model_name]
    if config == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "pooler"])
    if model_name == "minilm":
        model = transformers.BertForSequenceClassification.from_pretrained(
            asset_path("minilm"), num_labels=2, quantization_config=quantization, **dropout_config)
        task, qv, every = "SEQ_CLS", ["query", "value"], r".*encoder.*\.(query|key|value|dense)$"
    elif model_name == "smollm2":
        path = asset_path("smollm2")
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **dropout_config)
        task, qv, every = "CAUSAL_LM", ["q_proj", "v_proj"], "all-linear"
    else:
        if quantization is not None:
            raise RuntimeError("bitsandbytes quantizes at load time; the random GPT-2 shape has no checkpoint")
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=1024, **dropout_config))
        task, qv, every = "CAUSAL_LM", ["c_attn"], ["c_attn", "c_proj", "c_fc"]
    if config == "full":
        return model.train()
    if config in ("lora_qv", "qlora", "lora_all"):
        if config == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        peft_config = peft.LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=every if config == "lora_all" else qv)
    elif config == "prefix":
        peft_config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=20)
    else:
        peft_config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=20)
    return peft.get_peft_model(model, peft_config).train()


def logits_of(model, batch, library: str):
    if library == "ours":
        return model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1]:] if logits.ndim == 3 else logits  # drop soft tokens


def loss_of(model, batch, library: str) -> torch.Tensor:
    """Cross-entropy over every label, or (LM, instruction data) over the labelled tokens: minipeft's
    trainer sends those through the head in tiles; transformers computes all (B, T, V) and ignores -100."""
    if library == "ours" and batch["kind"] in ("lm", "sft"):
        return loop.loss_fn(model, batch, batch["kind"])
    logits = logits_of(model, batch, library)
    return F.cross_entropy(logits.flatten(0, -2), batch["labels"].flatten(), ignore_index=-100)


def make_step(model, batch, library: str):
    """One training step: minipeft's optimizer as its trainer makes it; for transformers + peft, the
    AdamW their Trainer uses by default (adamw_torch_fused). Both are torch's fused AdamW."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if library == "ours":
        optimizer = loop.make_optimizer(model, lr=1e-5, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)

    def step():
        loss = loss_of(model, batch, library)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in trainable)


def make_batch(model_name: str, vocab_size: int):
    shape = MODELS[model_name]
    if shape["kind"] == "sft":  # real conversations, labels on the answers (tasks.py)
        tokenizer = mp.from_pretrained(model_name)[1]
        task = tasks.load_task("rotten_tomatoes_instruct", tokenizer, max_len=256)
        batch = next(task.splits["train"].batches(shape["batch"]))
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")} | {"kind": "sft"}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab_size, (shape["batch"], shape["seq"]), generator=g)
    labels = torch.randint(0, 2, (shape["batch"],), generator=g) if shape["kind"] == "classification" \
        else torch.randint(0, vocab_size, (shape["batch"], shape["seq"]), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "kind": shape["kind"]}


def interleaved(steps: dict, warmup: int, rounds: int) -> tuple[dict, dict]:
    """{key: wall seconds of each round} and {key: CPU seconds (user + system, all threads) of each
    round}: each callable `warmup` times first, then one call of each per round."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {key: [] for key in steps}, {key: [] for key in steps}
    for _ in range(rounds):
        for key, fn in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - cpu_start)
    return wall, cpu


def interleaved_medians(steps: dict, warmup: int, repeats: int, with_cpu: bool = False):
    """Median seconds per call of interleaved() (and, `with_cpu`, the median CPU seconds — user + system,
    steadier on a shared machine — as well)."""
    times, cpu_times = interleaved(steps, warmup, repeats)
    wall = {name: statistics.median(t) for name, t in times.items()}
    return (wall, {name: statistics.median(t) for name, t in cpu_times.items()}) if with_cpu else wall


def matmul_weights(model) -> int:
    """Weights of the linear layers (and LM head): each does 2 flops per token forward, 4 backward.
    GPT-2 in transformers keeps its linear layers as Conv1D modules (a transposed nn.Linear)."""
    from transformers.pytorch_utils import Conv1D
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


MATMUL_N = 2048  # the matmul whose rate is the machine's


def square_matmul():
    """A callable doing one MATMUL_N² fp32 matmul (2 · MATMUL_N³ floating-point operations)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    return lambda: torch.mm(a, b)


def matmul_gflops(repeats: int = 10) -> float:
    seconds = interleaved_medians({"mm": square_matmul()}, warmup=3, repeats=repeats)["mm"]
    return 2 * MATMUL_N**3 / seconds / 1e9


# ---------------------------------------------------------------- the tables

def training_table(args):
    print("| model | configuration | dropout | trainable (minipeft) | trainable (peft) | minipeft s/step "
          "| peft s/step | ratio | of matmul rate (ours / peft) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for model_name in args.models:
        shape = MODELS[model_name]
        runs = [(c, d) for c in args.configs if c in shape.get("configs", CONFIGS) for d in args.dropouts]
        for config, dropout in runs:
            torch.manual_seed(0)
            mine = ours(model_name, config, dropout)
            batch = make_batch(model_name, mine.cfg.vocab_size)
            tokens = batch["input_ids"].numel()
            steps, counts = {}, {}
            steps["ours"], counts["ours"] = make_step(mine, batch, "ours")
            reference = None
            if not args.no_reference:
                try:
                    reference = theirs(model_name, config, dropout)
                    steps["peft"], counts["peft"] = make_step(reference, batch, "peft")
                    steps["peft"]()  # fail here, inside the try, if the reference cannot train
                except Exception as e:  # e.g. bitsandbytes 4-bit not runnable here; reported in the row
                    counts["peft"] = f"n/a ({type(e).__name__}: {str(e)[:60]})"
            if config == "full":  # the machine's rate while this row runs
                steps["mm"] = square_matmul()
            seconds = interleaved_medians(steps, args.warmup, args.steps)
            row = [model_name, config, "model's" if dropout is None else f"{dropout:g}", f"{counts['ours']:,}",
                   f"{counts['peft']:,}" if isinstance(counts.get("peft"), int) else counts.get("peft", "—"),
                   f"{seconds['ours']:.3f}", f"{seconds['peft']:.3f}" if "peft" in seconds else "—",
                   f"{seconds['ours'] / seconds['peft']:.2f}" if "peft" in seconds else "—", ""]
            if config == "full":
                rate = 2 * MATMUL_N**3 / seconds["mm"] / 1e9
                fractions = [6 * matmul_weights(m) * tokens / seconds[name] / 1e9 / rate
                             for name, m in (("ours", mine), ("peft", reference)) if name in seconds]
                row[-1] = " / ".join(f"{f:.0%}" for f in fractions)
            print("| " + " | ".join(row) + " |", flush=True)
            del mine, reference, steps


def qlora_table(args):
    """Our QLoRA step against our LoRA step (both r=8 on q,v), interleaved in one run."""
    models = [m for m in args.models if {"lora_qv", "qlora"} <= set(MODELS[m].get("configs", CONFIGS))]
    if not models or not {"lora_qv", "qlora"} <= set(args.configs):
        return
    print("\n| model | LoRA s/step | QLoRA s/step | QLoRA / LoRA | LoRA CPU s/step | QLoRA CPU s/step | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model_name in models:
        torch.manual_seed(0)
        lora, qlora = ours(model_name, "lora_qv"), ours(model_name, "qlora")
        batch = make_batch(model_name, lora.cfg.vocab_size)
        steps = {"lora": make_step(lora, batch, "ours")[0], "qlora": make_step(qlora, batch, "ours")[0]}
        wall, cpu = interleaved_medians(steps, args.warmup, args.steps, with_cpu=True)
        print(f"| {model_name} | {wall['lora']:.3f} | {wall['qlora']:.3f} | {wall['qlora'] / wall['lora']:.2f} "
              f"| {cpu['lora']:.3f} | {cpu['qlora']:.3f} | {cpu['qlora'] / cpu['lora']:.2f} |", flush=True)
        del lora, qlora, steps


def inference_table(args):
    """No-grad forward time of the base model vs LoRA (q,v) unmerged and merged, ours only."""
    print("\n| model | base ms/batch | LoRA unmerged | LoRA merged |")
    print("|---|---:|---:|---:|")
    for model_name in args.models:
        torch.manual_seed(0)
        base, unmerged = base_model(model_name), ours(model_name, "lora_qv")
        with torch.no_grad():
            for layer in unmerged.modules():  # a random B, so the update is not zero
                if isinstance(layer, LoRALinear):
                    layer.lora_B.normal_(std=0.02)
        merged = mp.merge(copy.deepcopy(unmerged))
        batch = make_batch(model_name, base.cfg.vocab_size)

        def forward(model):
            model.eval()
            return torch.no_grad()(lambda: model(batch["input_ids"], attention_mask=batch["attention_mask"]))
        seconds = interleaved_medians({"base": forward(base), "unmerged": forward(unmerged),
                                       "merged": forward(merged)}, args.warmup, args.steps)
        print(f"| {model_name} | {1e3 * seconds['base']:.1f} | {1e3 * seconds['unmerged']:.1f} "
              f"({seconds['unmerged'] / seconds['base']:.2f}×) | {1e3 * seconds['merged']:.1f} "
              f"({seconds['merged'] / seconds['base']:.2f}×) |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,gpt2", help=f"comma-separated, from {', '.join(MODELS)} "
                   "(smollm2: instruction tuning, lora_qv and lora_all only)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--dropouts", default="model,0",
                   help="comma-separated dropout settings for the training table: 'model' (each model's "
                        "own) and/or probabilities applied everywhere on both sides, e.g. 0")
    p.add_argument("--steps", type=int, default=10, help="timed steps per library (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per library before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the whole run")
    p.add_argument("--no-reference", action="store_true", help="time minipeft only (no transformers/peft)")
    p.add_argument("--tables", default="training,qlora,inference",
                   help="comma-separated tables to print, from training (against peft), qlora (our QLoRA "
                        "against our LoRA) and inference (default: all three)")
    args = p.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    try:
        args.dropouts = [None if d == "model" else float(d) for d in args.dropouts.split(",") if d]
    except ValueError:
        p.error(f"--dropouts takes 'model' and probabilities, got {args.dropouts!r}")
    for name, valid in (("model", MODELS), ("configuration", CONFIGS)):
        chosen = args.models if name == "model" else args.configs
        if unknown := [c for c in chosen if c not in valid]:
            p.error(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(valid)}")
    tables = {"training": lambda: training_table(args), "qlora": lambda: qlora_table(args),
              "inference": lambda: inference_table(args)}
    if unknown := [t for t in args.tables.split(",") if t and t not in tables]:
        p.error(f"unknown table {', '.join(unknown)}; choose from {', '.join(tables)}")
    torch.set_num_threads(args.threads)
    import peft
    import transformers
    transformers.logging.set_verbosity_error()  # no load reports for the fresh classifier head
    transformers.logging.disable_progress_bar()
    rate = matmul_gflops()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{args.threads} threads; fp32 matmul {rate:.0f} GFLOP/s; median of {args.steps} steps after "
          f"{args.warmup} warm-up\n")
    for table in [t for t in args.tables.split(",") if t]:
        tables[table]()


if __name__ == "__main__":
    main()
