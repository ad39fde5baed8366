"""Fine-tune a pretrained model with one PEFT method.

    python train.py --method lora --rank 8                 # MiniLM on rotten_tomatoes
    python train.py --model smollm2 --task hamlet --method lora --targets q,v --steps 100
    python train.py --model smollm2 --task rotten_tomatoes_instruct --targets all --pack --max-len 256 --steps 80
    python train.py --model smollm2 --task my_chats.jsonl --chat-template my_template.jinja   # instruction tuning
    python train.py --model smollm2 --task chats.jsonl:2 --task more.parquet --columns prompt=question,completion=answer
    python train.py --model smollm2 --task rotten_tomatoes_preference --steps 100 --batch-size 8   # DPO on pairs
    python train.py --model smollm2 --task pairs.jsonl --init-adapter checkpoints/sft/adapter --dpo-loss ipo
    python train.py --model smollm2 --task hamlet --device cuda --precision bf16-mixed   # on a GPU (auto: the same)
    python train.py --list-methods
    python train.py --import my_method.py --method my_method   # a method you registered yourself
    python train.py --config examples/classify-lora.yaml   # the settings in a file (flags override them)
    python train.py --resume checkpoints/<run>             # continue a stopped run (its config.yaml)
    python train.py --resume checkpoints/<run> --steps 400 # extend a finished run
    torchrun --nproc_per_node 2 train.py ...               # data parallel: --batch-size per process
    torchrun --nproc_per_node 2 train.py ... --fsdp        # the same, each process holding 1/2 of the model
"""
import argparse
import contextlib
import json
import time

import torch

import minipeft as mp
from minipeft.scale import checkpoint, precision, processes, sharding
from minipeft.run import cli, runconfig, watch
from minipeft.core import data, dpo, loop as trainer
from minipeft.formats import preference
from minipeft.core.disable import check_can_disable

DEFAULT_METHOD = "lora"


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
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's own for the "
                   "kind of task, see --list-methods)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    t.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent warming up the learning rate")
    t.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this")
    t.add_argument("--eval-every", type=int, default=None,
                   help="steps between validation passes, and after the last step; None: four per run, after "
                        "steps ceil(k x steps / 4); 0: no validation")
    t.add_argument("--model-dropout", type=model_dropout, default=0.0, metavar="P|model",
                   help="dropout in the model's own layers (embeddings, attention weights, sub-layer outputs), "
                        "or 'model' for the checkpoint's own (MiniLM: 0.1). Off by default: attention then runs "
                        "as one fused kernel, and the headline run is at least as accurate (README); a method's own "
                        "dropout is its --dropout")
    t.add_argument("--pack", action="store_true",
                   help="pack each batch's examples into rows of --max-len tokens instead of padding them "
                        "(attention stays inside each example, positions restart): the same loss, less padding")
    t.add_argument("--batching", choices=trainer.BATCHING, default="by-length",
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
                   help="output folder: metrics.jsonl, adapter/, checkpoints (default: the --resume folder, or "
                        "a new one, checkpoints/<model>-<task>-<method>-<date>-<time>, named on the first line). "
                        "A folder that holds another run stops the run, unless --overwrite")
    t.add_argument("--overwrite", action="store_true",
                   help="let --out hold another run: its files (metrics.jsonl, adapter/, checkpoints, config.yaml, "
                        "metrics.csv, plot.png, logger folders) are deleted once every check has passed, before the "
                        "first step (the folder's other files stay)")
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
    d = p.add_argument_group("preference tuning (DPO): the reference model is this model with its adapter off")
    d.add_argument("--objective", choices=("sft", "dpo"), default=None,
                   help="dpo: train on preference pairs ({prompt, chosen, rejected} rows, or "
                        "rotten_tomatoes_preference); sft: the task's own loss. Not given: dpo for preference "
                        "pairs, the task's own loss for any other task")
    d.add_argument("--beta", type=float, default=None,
                   help="DPO's β, how far the policy may move from the reference; 0.1 if not given")
    d.add_argument("--dpo-loss", choices=dpo.VARIANTS, default=None,
                   help="sigmoid: DPO's −log σ(β·margin); ipo: IPO's (margin per token − 1/(2β))²; sigmoid if "
                        "not given")
    d.add_argument("--precompute-reference", action="store_true",
                   help="compute every pair's reference log-probabilities once before training, instead of a "
                        "forward pass with the adapter off at every step")
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
             ("--eval-every", args.eval_every, args.eval_every is None or args.eval_every >= 0, ">= 0"),
             ("--model-dropout", args.model_dropout,
              args.model_dropout is None or 0 <= args.model_dropout < 1, "in [0, 1)"),
             ("--max-len", args.max_len, args.max_len >= 1, ">= 1"),
             ("--save-every", args.save_every, args.save_every >= 0, ">= 0"),
             ("--stop-at", args.stop_at, args.stop_at is None or args.stop_at >= 1, ">= 1"),
             ("--max-bad-steps", args.max_bad_steps, args.max_bad_steps >= 1, ">= 1"),
             ("--eval-generate", args.eval_generate, args.eval_generate >= 0, ">= 0"),
             ("--mmap-threshold", args.mmap_threshold, args.mmap_threshold >= 0, ">= 0"),
             ("--beta", args.beta, args.beta is None or args.beta > 0, "> 0")]
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
    """--pack needs a label per token; --train-on-prompt and --chat-template are for instruction data
    (the chat template also for preference pairs)."""
    if args.pack and task.kind in ("classification", "dpo"):
        task.splits["train"].packed(args.max_len)  # raises, saying why
    for flag, given, kinds in (("--train-on-prompt", args.train_on_prompt, ("sft",)),
                               ("--chat-template", args.chat_template, ("sft", "dpo"))):
        if given and task.kind not in kinds:
            raise ValueError(f"{flag} is for instruction data (prompt/completion, messages or instruction rows); "
                             f"{data.sources_text(args.task)} is a {task.kind} task")


def resolve_objective(args) -> str | None:
    """The objective: "dpo" for preference pairs (or --objective dpo), else None (the task's own loss). Checked
    before anything loads: the objective must fit the data, and the DPO flags need it."""
    sources, task = [source for source, _ in data.parse_sources(args.task)], data.sources_text(args.task)
    pairs = any(preference.is_preference_source(source) for source in sources)
    objective = args.objective or ("dpo" if pairs else None)
    if objective == "dpo" and not pairs:
        raise ValueError(f"--objective dpo trains on preference pairs ({preference.ROW_HELP}; or "
                         f"{preference.BUILT_IN}), and --task {task} holds none")
    if objective == "sft" and pairs:
        raise ValueError(f"--task {task} holds preference pairs, which --objective sft cannot train on; "
                         "use --objective dpo (their default)")
    if objective == "dpo" and len(sources) > 1:
        raise ValueError(f"preference tuning reads one --task source, got {task}; mixing sources is for "
                         "instruction and classification data")
    given = [flag for flag, value in (("--beta", args.beta), ("--dpo-loss", args.dpo_loss),
                                      ("--precompute-reference", args.precompute_reference))
             if value not in (None, False)]
    if given and objective != "dpo":
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for preference tuning "
                         "(--objective dpo on preference pairs)")
    if objective == "dpo" and args.fsdp and not args.precompute_reference:
        raise ValueError("--fsdp with --objective dpo needs --precompute-reference: the reference pass switches "
                         "the adapter's layers off, which a sharded model cannot, so it runs once before sharding")
    return objective


def pack_training_split(model, task, max_len: int):
    """--pack: the training batches packed into rows of max_len tokens (not with prompt tuning)."""
    if model.prompt_length:
        raise ValueError("--pack cannot be used with prompt tuning: its soft tokens start every row, so "
                         "examples packed into one row cannot each have their own")
    task.splits["train"] = task.splits["train"].packed(max_len)


def train_config(args, precision: str, device: torch.device, objective: str | None = None) -> trainer.TrainConfig:
    """The training options as TrainConfig takes them (--lr None: the method's own; --out None: the
    --resume folder, or a new one; DPO's loss for preference pairs)."""
    return trainer.TrainConfig(
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        batching=args.batching, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        max_grad_norm=args.clip, eval_every=args.eval_every, eval_generate=args.eval_generate,
        test_before=not args.skip_test_before,
        seed=args.seed, out=args.out, overwrite=args.overwrite, save_every=args.save_every,
        max_bad_steps=args.max_bad_steps, resume=args.resume, stop_at=args.stop_at,
        run={"model": str(args.model), "task": data.sources_text(args.task), "max_len": args.max_len,
             **({"columns": args.columns} if args.columns else {}),  # (older checkpoints do not record it)
             "model_dropout": args.model_dropout, "init_adapter": args.init_adapter, "pack": args.pack,
             "train_on_prompt": args.train_on_prompt, "chat_template": args.chat_template,
             "precision": precision, "device_type": device.type,
             **({"precompute_reference": args.precompute_reference} if objective == "dpo" else {})},
        dpo=dpo.DPOLoss(args.beta or 0.1, args.dpo_loss or "sigmoid") if objective == "dpo" else None)


def check_before_loading(args):
    """Fail fast, before loading anything: an --out that cannot be written or holds another run, an
    unreadable --resume checkpoint, --fsdp without torchrun."""
    out = args.out or (checkpoint.run_folder(args.resume) if args.resume else None)
    if out is None:
        checkpoint.check_writable(checkpoint.RUNS)
    else:
        checkpoint.check_output_folder(out, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        checkpoint.read_state(args.resume)
    if args.fsdp:
        sharding.check_launch()


def prepare(args, method, device: torch.device, precision_name: str, objective: str | None = None):
    """The model with the method applied (or --init-adapter's), on its device and in its precision, and
    the task (preference pairs under DPO; its training split packed with --pack): (model, task, method)."""
    options = cli.method_options(args)
    # the adapter's own method, unless the user chose one (then load_adapter checks they agree)
    apply_method = not args.init_adapter or args.method is not None or bool(options)
    torch.manual_seed(args.seed)  # the classifier head's and the method's initialization
    # loaded in fp32 and cast once the method is on: frozen weights to the precision's frozen dtype, the
    # trainable ones (all of them in full fine-tuning) to its trainable dtype, from the checkpoint's values
    model, tokenizer = mp.from_pretrained(args.model, dropout=args.model_dropout)
    check_context_length(model, args.max_len, args.model)
    sources, columns = cli.task_flags(args)
    if objective == "dpo":  # one source (resolve_objective)
        task = preference.load_preferences(sources[0][0], tokenizer, max_len=args.max_len, seed=args.seed,
                                           chat_template=args.chat_template)
    else:
        task = data.load_task(sources, tokenizer, max_len=args.max_len, seed=args.seed, columns=columns,
                              chat_template=args.chat_template, train_on_prompt=args.train_on_prompt)
    check_task_flags(args, task)
    if task.kind == "classification":
        model.add_classifier(task.n_classes)
    if apply_method:  # the options typed, else the method's defaults for this kind of task
        kind_defaults = mp.task_defaults(method.name, task.kind)[1]
        mp.apply(model, method.name, tokenizer=tokenizer, **{**kind_defaults, **options})
    if args.init_adapter:
        mp.load_adapter(model, args.init_adapter, tokenizer=tokenizer)
        method = mp.get_method(model.peft_config["method"])
    check_context_length(model, args.max_len, args.model)  # again, with the method's virtual tokens
    if objective == "dpo":  # the reference model is this one with its adapter switched off
        check_can_disable(model)
    if args.pack:
        pack_training_split(model, task, args.max_len)
    model.checkpointing = args.grad_checkpoint
    mp.set_precision(model, precision_name).to(device)
    return model, task, method


def main(argv):
    # the resumed run's config.yaml, then --config FILE, then argv; first the --import files (their methods' flags)
    args = runconfig.parse_args(build_parser, argv)
    if args.list_methods:
        print(cli.list_methods())
        return
    check_numbers(args)
    cli.task_flags(args)  # a bad --task weight or --columns stops before anything loads
    if args.mmap_threshold:
        mp.memory.mmap_large_tensors(args.mmap_threshold)
    method = mp.get_method(args.method or DEFAULT_METHOD)
    check_before_loading(args)
    objective = resolve_objective(args)

    requested = precision.resolve_device(args.device)  # a device that is not there stops here
    rank, world_size = processes.init_distributed(requested.type)
    device = processes.device_for_process() if world_size > 1 else requested
    chosen = precision.resolve_precision(args.precision, device)
    new_folder = None
    try:
        model, task, method = prepare(args, method, device, chosen.name, objective)
        # the ledger for the longest training batch (batches are padded to their longest example)
        longest, rows = max(map(len, task.splits["train"].input_ids)), args.batch_size
        if objective == "dpo":  # a batch of pairs has a chosen and a rejected row per pair
            longest, rows = max(longest, *map(len, task.splits["train"].rejected_ids)), 2 * args.batch_size
        ledger = mp.memory_report(model, rows, longest, padded=True)
        config = train_config(args, chosen.name, device, objective)
        if config.resume and not config.out:
            config.out = str(checkpoint.run_folder(config.resume))
        if not config.out:  # a new folder of its own, named on the first line
            new_folder = checkpoint.new_run_folder(config.run, method.name)
            config.out = str(new_folder)
        held, lr = None, config.peak_lr(model, task.kind)
        if args.precompute_reference:  # once, before training (and before sharding: it switches the adapter off)
            start = time.perf_counter()
            task.splits = {name: dpo.precompute_reference(model, split, config.eval_batch_size)
                           for name, split in task.splits.items()}
            if rank == 0:
                print(f"reference log-probabilities of {sum(map(len, task.splits.values())):,} pairs "
                      f"precomputed in {time.perf_counter() - start:.1f} s")
        if args.fsdp:
            sharding.shard(model)
            held = sharding.bytes_per_process(model)
        if rank == 0:
            print(f"{args.model} on {data.sources_text(args.task)} ({task.kind}, {len(task.splits['train']):,} training "
                  f"{'pairs' if task.kind == 'dpo' else 'examples'}{', packed' if args.pack else ''}), method "
                  f"{method.name}, lr {lr}, {chosen.name} on {device}"
                  + (f", {world_size} processes" if world_size > 1 else "") + f", output in {config.out}")
        settings = runconfig.run_settings(args, method.name, model.peft_config["options"], lr)
        records = [runconfig.SettingsFile(settings), *watch.writers(args.log, settings)]  # config.yaml, CSV, plot
        summary = trainer.train(model, task, config, writers=records)
        if rank == 0:
            print_results(summary, config.out, ledger, held)
    except BaseException:
        if new_folder is not None and rank == 0:
            with contextlib.suppress(OSError):  # removed only while empty: a run that wrote nothing
                new_folder.rmdir()
        raise
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def print_results(summary: dict, out: str, ledger: dict, held: dict | None):
    """The summary, the memory ledger against the measured peak, and (--fsdp) the bytes each process held."""
    print(trainer.format_summary(summary))
    print(f"output folder        {out}")
    print(mp.format_report(ledger))
    print(f"  measured peak RSS              {summary['peak_memory_bytes'] / 2**20:10,.1f} MiB   "
          f"(ledger / measured {ledger['total'] / summary['peak_memory_bytes']:.2f}; the measured "
          "peak also covers loading and evaluation)")
    if held is not None:
        print(sharding.format_bytes_per_process(held))
    print(json.dumps({k: summary[k] for k in ("test_before", "test_after")}))


if __name__ == "__main__":
    cli.run(main)
