"""The flags of train.py and the checks on them, run before anything loads: what a flag may hold, which
flags fit which task and objective, and the TrainConfig they make (run/trainer.py)."""
import argparse
import math
import time

import torch

from minipeft.formats import tasks
from minipeft.scale import output
from minipeft.run import cli, runconfig, trainer, watch

DEFAULT_METHOD = "lora"
SWITCH = argparse.BooleanOptionalAction  # --pack and --no-pack: a config file's `pack: true` can be undone
DPO_VARIANTS = ("sigmoid", "ipo")  # extras/dpo.py's VARIANTS, loaded only by a DPO run (a test keeps them equal)


def build_parser(method: str | None = None):
    """train.py's flags; the method options of every method, or (method) of that one only."""
    p = argparse.ArgumentParser(description="Fine-tune a model with a parameter-efficient method.",
                                formatter_class=cli.HelpWithDefaults)
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
    cli.add_method_flags(p, method)
    add_training_flags(p.add_argument_group("training"))
    add_memory_flags(p.add_argument_group("memory"))
    add_preference_flags(p.add_argument_group("preference tuning (DPO): the reference model is this model with "
                                              "its adapter off"))
    add_checkpoint_flags(p.add_argument_group("checkpoints"))
    return p


def add_training_flags(t):
    t.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training split (unless --steps), in whole batches: an epoch's last, partial "
                        "batch is left out (transformers' Trainer trains on it), so every step sees as many examples")
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
                        "steps ceil(k x steps / 4); 0: no evaluation at all (no validation, and the test split "
                        "is not scored unless --test)")
    t.add_argument("--model-dropout", type=model_dropout, default=0.0, metavar="P|model",
                   help="dropout in the model's own layers (embeddings, attention weights, sub-layer outputs), "
                        "or 'model' for the checkpoint's own (MiniLM: 0.1). Off by default: attention then runs "
                        "as one fused kernel, and the headline run is at least as accurate (README); a method's own "
                        "dropout is its --dropout")
    t.add_argument("--pack", action=SWITCH, default=False,
                   help="pack each batch's examples into rows of --max-len tokens instead of padding them "
                        "(attention stays inside each example, positions restart): the same loss, less padding")
    t.add_argument("--batching", choices=trainer.BATCHING, default="by-length",
                   help="by-length: each shuffled batch holds examples of about one length, so little of "
                        "it is padding (Rotten Tomatoes on MiniLM: 1.79x fewer tokens computed); random: "
                        "batches as drawn, padded to their longest example")
    t.add_argument("--compile", action=SWITCH, default=False,
                   help="torch.compile the model's forward pass (backward follows, through AOTAutograd; on the CPU "
                        "inductor needs a C++ compiler): the first steps and each new batch shape take seconds to "
                        "compile, which the summary reports apart (first step against the median step). Off by "
                        "default: on a 2-core CPU compiling MiniLM took 30 s of CPU time and its LoRA steps then "
                        "took 0.89x eager's, a gain only runs of a few hundred steps or more win back (docs/speed.md)")
    t.add_argument("--train-on-prompt", action=SWITCH, default=False,
                   help="instruction data: put the prompt's tokens in the loss too (default: only the answers)")
    t.add_argument("--test", action=SWITCH, default=None,
                   help="score the test split after training, and before unless --skip-test-before (default: "
                        "yes, unless --eval-every 0)")
    t.add_argument("--skip-test-before", action=SWITCH, default=False,
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


def add_memory_flags(m):
    m.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="allocations of this many bytes or more get their own memory mapping, returned to the "
                        "system when freed, so the resident size follows the live tensors the memory ledger "
                        "counts (glibc only; e.g. 131072, what bench/memory.py uses). It costs page faults: "
                        "MiniLM LoRA steps took 0.98 s with 131072 against 0.50 s without. 0: glibc's default, "
                        "which keeps freed activations resident")
    m.add_argument("--fsdp", action=SWITCH, default=False,
                   help="under torchrun: shard every parameter (frozen ones and 4-bit codes too), its "
                        "gradient and optimizer state across the processes (FSDP2, one group per block); each "
                        "process holds about 1/N of the model")
    m.add_argument("--memory-report", action=SWITCH, default=False,
                   help="print the memory ledger (weights, gradients, AdamW state, activations of the longest "
                        "batch) beside the measured peak at the end of the run")
    m.add_argument("--grad-checkpoint", action=SWITCH, default=False,
                   help="activation checkpointing: keep only each block's input and recompute the block in "
                        "backward (less memory for activations, about one more forward pass of time)")


def add_preference_flags(d):
    d.add_argument("--objective", choices=("sft", "dpo"), default=None,
                   help="dpo: train on preference pairs ({prompt, chosen, rejected} rows, or "
                        "rotten_tomatoes_preference); sft: the task's own loss. Not given: dpo for preference "
                        "pairs, the task's own loss for any other task")
    d.add_argument("--beta", type=float, default=None,
                   help="DPO's β, how far the policy may move from the reference; 0.1 if not given")
    d.add_argument("--dpo-loss", choices=DPO_VARIANTS, default=None,
                   help="sigmoid: DPO's −log σ(β·margin); ipo: IPO's (margin per token − 1/(2β))²; sigmoid if "
                        "not given")
    d.add_argument("--precompute-reference", action=SWITCH, default=False,
                   help="compute every pair's reference log-probabilities once before training, instead of a "
                        "forward pass with the adapter off at every step")


def add_checkpoint_flags(r):
    r.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints, and one at the end (0: none, except on Ctrl-C or SIGTERM, so that "
                        "--resume can continue; the adapter is saved either way)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose --out folder (or checkpoint-<step> folder) is DIR, with "
                        "the settings saved in its config.yaml (flags given override them; a larger --steps "
                        "extends a finished run)")
    r.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save a checkpoint and stop after this step (continue later with --resume)")
    r.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient")


def model_dropout(value: str) -> float | None:
    """--model-dropout: a probability, or 'model' (None: the checkpoint's own dropout)."""
    if value == "model":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability or 'model', got {value!r}") from None


def check_numbers(args):
    """Flags that parse as numbers but make no sense stop here, naming the flag (inf too, where a run
    would stop on it later or train to non-finite weights; --clip inf is no clipping)."""
    rules = [("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
             ("--grad-accum", args.grad_accum, args.grad_accum >= 1, ">= 1"),
             ("--steps", args.steps, args.steps is None or args.steps >= 1, ">= 1"),
             ("--epochs", args.epochs, 0 < args.epochs < math.inf, "a finite number > 0"),
             ("--lr", args.lr, args.lr is None or 0 < args.lr < math.inf, "a finite number > 0"),
             ("--weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf, "a finite number >= 0"),
             ("--seed", args.seed, 0 <= args.seed < 2**63, "in [0, 2**63)"),  # numpy's and torch's seeds
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
             ("--mmap-threshold", args.mmap_threshold, 0 <= args.mmap_threshold < 2**31, "in [0, 2**31)"),  # a C int
             ("--beta", args.beta, args.beta is None or 0 < args.beta < math.inf, "a finite number > 0")]
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
                             f"{tasks.sources_text(args.task)} is a {task.kind} task")


def prepare_head(model, task, source: str) -> None:
    """The head the task trains: a classification task's classifier is the model's own when it has the task's
    classes (a fine-tuned …ForSequenceClassification checkpoint's, trained further), else a fresh one (said
    so when it takes the place of a trained one); the other tasks need the LM head, which a classifier lacks."""
    cli.check_lm_head(model, task.kind, source, "train on")
    n_classes = model.cfg.n_classes
    if task.kind != "classification" or n_classes == task.n_classes:
        return
    if n_classes:
        print(f"note: {source}'s trained classifier has {n_classes} classes and the task {task.n_classes}, so a "
              "fresh head takes its place (its pooler, if any, is kept: transformers' ignore_mismatched_sizes)")
    model.add_classifier(task.n_classes)


def resolve_objective(args) -> str | None:
    """The objective: "dpo" for preference pairs (or --objective dpo), else None (the task's own loss). Checked
    before anything loads: the objective must fit the data, and the DPO flags need it."""
    sources, task = [source for source, _ in tasks.parse_sources(args.task)], tasks.sources_text(args.task)
    pairs = any(tasks.is_preference_source(source) for source in sources)
    objective = args.objective or ("dpo" if pairs else None)
    if objective == "dpo" and not pairs:
        raise ValueError(f"--objective dpo trains on preference pairs ({tasks.PREFERENCE_ROW}; or "
                         f"{tasks.PREFERENCE_TASK}), and --task {task} holds none")
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
        test=args.test, test_before=not args.skip_test_before,
        seed=args.seed, out=args.out, overwrite=args.overwrite, save_every=args.save_every,
        max_bad_steps=args.max_bad_steps, resume=args.resume, stop_at=args.stop_at,
        run={"model": str(args.model), "task": tasks.sources_text(args.task), "max_len": args.max_len,
             **({"columns": args.columns} if args.columns else {}),  # (older checkpoints do not record it)
             "model_dropout": args.model_dropout, "init_adapter": args.init_adapter, "pack": args.pack,
             "train_on_prompt": args.train_on_prompt, "chat_template": args.chat_template,
             "precision": precision, "device_type": device.type,
             **({"precompute_reference": args.precompute_reference} if objective == "dpo" else {})},
        dpo=preference_loss(args) if objective == "dpo" else None)


def preference_loss(args):
    """extras/dpo.py's DPOLoss with the --beta and --dpo-loss given, its own defaults for the others."""
    from minipeft.extras import dpo
    given = {"beta": args.beta, "variant": args.dpo_loss}
    return dpo.DPOLoss(**{name: value for name, value in given.items() if value is not None})


def check_before_loading(args):
    """Fail fast, before loading anything: an --out that cannot be written or holds another run, an
    unreadable --resume checkpoint, --fsdp without torchrun."""
    out = args.out or (output.run_folder(args.resume) if args.resume else None)
    if out is None:
        output.check_writable(output.RUNS)
    else:
        output.check_output_folder(out, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        output.read_state(args.resume)
    if args.fsdp:
        from minipeft.scale import sharding
        sharding.check_launch()


def memory_ledger(model, task, args) -> dict:
    """--memory-report: the ledger for the longest training batch (batches are padded to their longest example)."""
    from minipeft.extras import memory
    longest, rows = max(map(len, task.splits["train"].input_ids)), args.batch_size
    if task.kind == "dpo":  # a batch of pairs has a chosen and a rejected row per pair
        longest, rows = max(longest, *map(len, task.splits["train"].rejected_ids)), 2 * args.batch_size
    return memory.memory_report(model, rows, longest, padded=True)


def precompute_reference(model, task, config, rank: int):
    """--precompute-reference: every pair's reference log-probabilities, stored with the pairs."""
    from tqdm.auto import tqdm
    from minipeft.extras import dpo
    start = time.perf_counter()

    def bar(name):
        return lambda batches: tqdm(batches, desc=f"reference log-probabilities ({name})", unit="batch",
                                    leave=False, dynamic_ncols=True, disable=rank != 0)
    task.splits = {name: dpo.precompute_reference(model, split, config.eval_batch_size, bar(name))
                   for name, split in task.splits.items()}
    if rank == 0:
        print(f"reference log-probabilities of {sum(map(len, task.splits.values())):,} pairs "
              f"precomputed in {time.perf_counter() - start:.1f} s")
