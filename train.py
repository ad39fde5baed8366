"""Fine-tune a pretrained model with one PEFT method.

    python train.py --method lora --rank 8                 # MiniLM on rotten_tomatoes
    python train.py --model smollm2 --task hamlet --method lora --targets q,v --steps 100
    python train.py --model smollm2 --task rotten_tomatoes_instruct --targets all --pack --max-len 256 --steps 80
    python train.py --model smollm2 --task my_chats.jsonl --chat-template my_template.jinja   # instruction tuning
    python train.py --model smollm2 --task hamlet --device cuda --precision bf16-mixed   # on a GPU (auto: the same)
    python train.py --list-methods
    python train.py --import my_method.py --method my_method   # a method you registered yourself
    python train.py --config examples/classify-lora.yaml   # the settings in a file (flags override them)
    python train.py --resume checkpoints/run               # continue a stopped run (its config.yaml)
    python train.py --resume checkpoints/run --steps 400   # extend a finished run
    torchrun --nproc_per_node 2 train.py ...               # data parallel: --batch-size per process
    torchrun --nproc_per_node 2 train.py ... --fsdp        # the same, each process holding 1/2 of the model
"""
import argparse
import json

import torch

import minipeft as mp
from minipeft import checkpoint, cli, data, precision, processes, runconfig, sharding, trainer, watch

DEFAULT_METHOD = "lora"
DEFAULT_OUT = "checkpoints/run"


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune a model with a parameter-efficient method.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_and_task_flags(p)
    cli.add_device_flags(p)
    cli.add_import_flag(p)
    runconfig.add_config_flag(p)
    watch.add_log_flag(p)
    p.add_argument("--method", default=None,
                   help=f"PEFT method; see --list-methods (default: {DEFAULT_METHOD}, or the method "
                        "saved with --init-adapter)")
    p.add_argument("--list-methods", action="store_true", help="print the methods and their options, then exit")
    p.add_argument("--init-adapter", default=None, metavar="PATH",
                   help="start from a saved adapter (its method and options unless --method is given)")
    cli.add_method_flags(p)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (unless --steps)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    t.add_argument("--batch-size", type=int, default=16,
                   help="examples per micro-batch and process (a step sees batch-size × processes × grad-accum)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's own)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    t.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent warming up the learning rate")
    t.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this")
    t.add_argument("--eval-every", type=int, default=0, help="steps between validation passes (0: four per run)")
    t.add_argument("--model-dropout", type=model_dropout, default=0.0, metavar="P|model",
                   help="dropout in the model's own layers (embeddings, attention weights, sub-layer outputs), "
                        "or 'model' for the checkpoint's own (MiniLM: 0.1). Off by default: attention then runs "
                        "as one fused kernel, and the headline run is at least as accurate (README); a method's own "
                        "dropout is its --dropout")
    t.add_argument("--pack", action="store_true",
                   help="pack each batch's examples into rows of --max-len tokens instead of padding them "
                        "(attention stays inside each example, positions restart): the same loss, less padding")
    t.add_argument("--batching", choices=("by-length", "random"), default="by-length",
                   help="by-length: each shuffled batch holds examples of about one length, so little of "
                        "it is padding (Rotten Tomatoes on MiniLM: 1.79x fewer tokens computed); random: "
                        "batches as drawn, padded to their longest example")
    t.add_argument("--train-on-prompt", action="store_true",
                   help="instruction data: put the prompt's tokens in the loss too (default: only the answers)")
    t.add_argument("--skip-test-before", action="store_true",
                   help="do not score the test split before training (saves a pass over it; the base model's "
                        "score is eval.py's)")
    t.add_argument("--eval-generate", type=int, default=100,
                   help="instruction data: validation examples answered and scored by exact match at each "
                        "validation pass (0: none; the test split is always scored whole)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialization, shuffling and dropout")
    t.add_argument("--out", default=None,
                   help=f"output folder: metrics.jsonl, adapter/, checkpoints (default: {DEFAULT_OUT}, "
                        "or the --resume folder)")
    m = p.add_argument_group("memory")
    m.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="allocations of this many bytes or more get their own memory mapping, returned to the "
                        "system when freed, so the resident size follows the live tensors the memory ledger "
                        "counts (glibc only; e.g. 131072, what bench/memory.py uses). It costs page faults: "
                        "MiniLM LoRA steps took 0.98 s with 131072 against 0.50 s without. 0: glibc's default, "
                        "which keeps freed activations resident")
    m.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard every parameter (frozen ones and 4-bit codes too), its "
                        "gradient and optimizer state across the processes (FSDP2, one group per block); each "
                        "process holds about 1/N of the model")
    m.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: keep only each block's input and recompute the block in "
                        "backward (less memory for activations, about one more forward pass of time)")
    r = p.add_argument_group("checkpoints")
    r.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints (0: only at the end, and on Ctrl-C or SIGTERM)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose --out folder (or checkpoint-<step> folder) is DIR, with "
                        "the settings saved in its config.yaml (flags given override them; a larger --steps "
                        "extends a finished run)")
    r.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save a checkpoint and stop after this step (continue later with --resume)")
    r.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient")
    return p


def model_dropout(value: str) -> float | None:
    """--model-dropout: a probability, or 'model' (None: the checkpoint's own dropout)."""
    if value == "model":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability or 'model', got {value!r}") from None


def check_numbers(args):
    """Flags that parse as numbers but make no sense stop here, naming the flag."""
    rules = [("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
             ("--grad-accum", args.grad_accum, args.grad_accum >= 1, ">= 1"),
             ("--steps", args.steps, args.steps is None or args.steps >= 1, ">= 1"),
             ("--epochs", args.epochs, args.epochs > 0, "> 0"),
             ("--lr", args.lr, args.lr is None or args.lr > 0, "> 0"),
             ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
             ("--warmup", args.warmup, 0 <= args.warmup < 1, "in [0, 1)"),
             ("--clip", args.clip, args.clip > 0, "> 0"),
             ("--eval-every", args.eval_every, args.eval_every >= 0, ">= 0"),
             ("--model-dropout", args.model_dropout,
              args.model_dropout is None or 0 <= args.model_dropout < 1, "in [0, 1)"),
             ("--max-len", args.max_len, args.max_len >= 1, ">= 1"),
             ("--save-every", args.save_every, args.save_every >= 0, ">= 0"),
             ("--stop-at", args.stop_at, args.stop_at is None or args.stop_at >= 1, ">= 1"),
             ("--max-bad-steps", args.max_bad_steps, args.max_bad_steps >= 1, ">= 1"),
             ("--eval-generate", args.eval_generate, args.eval_generate >= 0, ">= 0"),
             ("--mmap-threshold", args.mmap_threshold, args.mmap_threshold >= 0, ">= 0")]
    for flag, value, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}, got {value}")


def check_context_length(model, max_len: int, model_name: str):
    """--max-len tokens plus the method's virtual tokens (prompt, prefix) must fit the model's positions."""
    room = model.cfg.max_seq_len - model.virtual_tokens
    if max_len > room:
        virtual = f" minus {model.virtual_tokens} virtual tokens of the method" if model.virtual_tokens else ""
        raise ValueError(f"--max-len {max_len} does not fit {model_name}: it has {model.cfg.max_seq_len} "
                         f"positions{virtual}; use --max-len {room} or less")


def check_task_flags(args, task):
    """--pack needs a label per token; --train-on-prompt and --chat-template are for instruction data."""
    if args.pack and task.kind == "classification":
        task.splits["train"].packed(args.max_len)  # raises, saying why
    for flag, given in (("--train-on-prompt", args.train_on_prompt), ("--chat-template", args.chat_template)):
        if given and task.kind != "sft":
            raise ValueError(f"{flag} is for instruction data (prompt/completion, messages or instruction rows); "
                             f"{args.task} is a {task.kind} task")


def pack_training_split(model, task, max_len: int):
    """--pack: the training batches packed into rows of max_len tokens (not with prompt tuning)."""
    if model.prompt_length:
        raise ValueError("--pack cannot be used with prompt tuning: its soft tokens start every row, so "
                         "examples packed into one row cannot each have their own")
    task.splits["train"] = task.splits["train"].packed(max_len)


def train_config(args, method, out: str, precision: str, device: torch.device) -> trainer.TrainConfig:
    return trainer.TrainConfig(
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr or method.lr, weight_decay=args.weight_decay, warmup=args.warmup, max_grad_norm=args.clip,
        eval_every=args.eval_every, eval_generate=args.eval_generate, test_before=not args.skip_test_before,
        seed=args.seed, out=out, save_every=args.save_every, max_bad_steps=args.max_bad_steps, resume=args.resume,
        stop_at=args.stop_at,
        run={"model": str(args.model), "task": str(args.task), "max_len": args.max_len,
             "model_dropout": args.model_dropout, "init_adapter": args.init_adapter, "pack": args.pack,
             "batching": args.batching, "train_on_prompt": args.train_on_prompt, "chat_template": args.chat_template,
             "precision": precision, "device_type": device.type})


def main(argv):
    # the resumed run's config.yaml, then --config FILE, then argv; first the --import files (their methods' flags)
    args = runconfig.parse_args(build_parser, argv)
    if args.list_methods:
        print(cli.list_methods())
        return
    check_numbers(args)
    if args.mmap_threshold:
        mp.memory.mmap_large_tensors(args.mmap_threshold)
    options = cli.method_options(args)
    method = mp.get_method(args.method or DEFAULT_METHOD)
    # the adapter's own method, unless the user chose one (then load_adapter checks they agree)
    apply_method = not args.init_adapter or args.method is not None or bool(options)
    out = args.out or (str(checkpoint.run_folder(args.resume)) if args.resume else DEFAULT_OUT)
    # fail fast, before loading anything: an unwritable --out, an unreadable --resume checkpoint
    checkpoint.check_output_folder(out, resume=args.resume)
    if args.resume:
        checkpoint.read_state(args.resume)
    if args.fsdp:
        sharding.check_launch()

    requested = precision.resolve_device(args.device)  # a device that is not there stops here
    rank, world_size = processes.init_distributed(requested.type)
    device = processes.device_for_process() if world_size > 1 else requested
    chosen = precision.resolve_precision(args.precision, device)
    try:
        torch.manual_seed(args.seed)  # the classifier head's and the method's initialization
        # loaded in fp32 and cast once the method is on: frozen weights to the precision's frozen dtype, the
        # trainable ones (all of them in full fine-tuning) to its trainable dtype, from the checkpoint's values
        model, tokenizer = mp.from_pretrained(args.model, dropout=args.model_dropout)
        check_context_length(model, args.max_len, args.model)
        task = data.load_task(args.task, tokenizer, max_len=args.max_len, seed=args.seed,
                              chat_template=args.chat_template, train_on_prompt=args.train_on_prompt)
        check_task_flags(args, task)
        if task.kind == "classification":
            model.add_classifier(task.n_classes)
        if apply_method:
            mp.apply(model, method.name, tokenizer=tokenizer, **options)
        if args.init_adapter:
            mp.load_adapter(model, args.init_adapter, tokenizer=tokenizer)
            method = mp.get_method(model.peft_config["method"])
        check_context_length(model, args.max_len, args.model)  # again, with the method's virtual tokens
        if args.batching == "by-length":
            task.splits["train"] = task.splits["train"].grouped_by_length()
        if args.pack:
            pack_training_split(model, task, args.max_len)
        model.checkpointing = args.grad_checkpoint
        mp.set_precision(model, chosen.name).to(device)
        # the ledger for the longest training batch (batches are padded to their longest example)
        longest = max(map(len, task.splits["train"].input_ids))
        ledger = mp.memory_report(model, args.batch_size, longest, padded=True)
        config = train_config(args, method, out, chosen.name, device)
        if args.fsdp:
            sharding.shard(model)
            held = sharding.bytes_per_process(model)
        if rank == 0:
            print(f"{args.model} on {args.task} ({task.kind}, {len(task.splits['train']):,} training "
                  f"examples{', packed' if args.pack else ''}), method {method.name}, lr {config.lr}, "
                  f"{chosen.name} on {device}"
                  + (f", {world_size} processes" if world_size > 1 else ""))
        settings = runconfig.run_settings(args, method.name, model.peft_config["options"], config.lr)
        records = [runconfig.SettingsFile(settings), *watch.writers(args.log, settings)]  # config.yaml, CSV, plot
        summary = trainer.train(model, task, config, writers=records)
        if rank == 0:
            print(trainer.format_summary(summary))
            print(mp.format_report(ledger))
            print(f"  measured peak RSS              {summary['peak_memory_bytes'] / 2**20:10,.1f} MiB   "
                  f"(ledger / measured {ledger['total'] / summary['peak_memory_bytes']:.2f}; the measured "
                  "peak also covers loading and evaluation)")
            if args.fsdp:
                print(sharding.format_bytes_per_process(held))
            print(json.dumps({k: summary[k] for k in ("test_before", "test_after")}))
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
