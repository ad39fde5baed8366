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
import contextlib

import torch

import minipeft as mp
from minipeft.formats import tasks
from minipeft.run import cli, report, runconfig, trainer, watch
from minipeft.run.train_args import (DEFAULT_METHOD, build_parser, check_before_loading, check_context_length,
                                     check_numbers, check_task_flags, memory_ledger, pack_training_split,
                                     precompute_reference, prepare_head, resolve_objective, train_config)
from minipeft.scale import output, precision, processes


def main(argv):
    # the settings: a resumed run's config.yaml, then --config FILE, then the flags (--import files first)
    args = runconfig.parse_args(build_parser, argv, DEFAULT_METHOD)
    if args.list_methods:
        print(cli.list_methods())
        return
    check_numbers(args)
    cli.task_flags(args)  # a bad --task weight or --columns stops before anything loads
    method = mp.get_method(args.method or DEFAULT_METHOD)
    check_before_loading(args)
    objective = resolve_objective(args)  # "dpo" for preference pairs, else None (the task's own loss)
    if args.mmap_threshold:
        mp.memory.mmap_large_tensors(args.mmap_threshold)

    # where it runs: the device, the processes torchrun started, the precision
    requested = precision.resolve_device(args.device)  # a device that is not there stops here
    rank, world_size = processes.init_distributed(requested.type)
    device = processes.device_for_process() if world_size > 1 else requested
    chosen = precision.resolve_precision(args.precision, device)
    new_folder = None
    try:
        model, task, method = prepare(args, method, device, chosen.name, objective)
        config = train_config(args, chosen.name, device, objective)
        if config.resume and not config.out:
            config.out = str(output.run_folder(config.resume))
        if not config.out:  # a new folder of its own, named on the first line
            new_folder = output.new_run_folder(config.run, method.name)
            config.out = str(new_folder)
        ledger = memory_ledger(model, task, args) if args.memory_report else None
        if args.precompute_reference:  # once, before training (and before sharding: it switches the adapter off)
            precompute_reference(model, task, config, rank)
        held = None
        if args.fsdp:  # each process keeps 1/world_size of every tensor
            from minipeft.scale import sharding
            sharding.shard(model)
            held = sharding.bytes_per_process(model)
        lr = config.peak_lr(model, task.kind)
        if rank == 0:
            print(f"{args.model} on {tasks.sources_text(args.task)} ({task.kind}, {len(task.splits['train']):,} "
                  f"training {'pairs' if task.kind == 'dpo' else 'examples'}{', packed' if args.pack else ''}), "
                  f"method {method.name}, lr {lr}, {chosen.name}{auto_reason(args, device)} on {device}"
                  + (f", {world_size} processes" if world_size > 1 else "") + f", output in {config.out}")

        # the training run: metrics.jsonl, config.yaml and what --log asks for, checkpoints, the adapter
        settings = runconfig.run_settings(args, method.name, model.peft_config["options"], lr)
        records = [runconfig.SettingsFile(settings), *watch.writers(args.log, settings)]
        summary = trainer.train(model, task, config, writers=records)
        if rank == 0:
            report.print_results(summary, config.out, ledger, held)
    except BaseException:
        if new_folder is not None and rank == 0:
            with contextlib.suppress(OSError):  # removed only while empty: a run that wrote nothing
                new_folder.rmdir()
        raise
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


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
    task = load_task(args, tokenizer, objective)
    check_task_flags(args, task)
    prepare_head(model, task, args.model)
    if apply_method:  # the options typed, else the method's defaults for this kind of task
        kind_defaults = mp.task_defaults(method.name, task.kind)[1]
        mp.apply(model, method.name, tokenizer=tokenizer, **{**kind_defaults, **options})
    if args.init_adapter:
        mp.load_adapter(model, args.init_adapter, tokenizer=tokenizer)
        method = mp.get_method(model.peft_config["method"])
    check_context_length(model, args.max_len, args.model)  # again, with the method's virtual tokens
    if objective == "dpo":  # the reference model is this one with its adapter switched off
        from minipeft.extras.disable import check_can_disable
        check_can_disable(model)
    if args.pack:
        pack_training_split(model, task, args.max_len)
    model.checkpointing = args.grad_checkpoint
    mp.set_precision(model, precision_name).to(device)
    # the fast twins of the core's kernels, the same results in less time (minipeft/fast/); NF4's for 4-bit layers
    mp.fast.enable(nf4=bool(precision.four_bit_layers(model)))
    if args.compile:  # the forward pass compiled by torch.compile; backward follows through AOTAutograd
        model.compile()
    return model, task, method


def auto_reason(args, device: torch.device) -> str:
    """" (auto: why)" after the precision --precision auto chose, else nothing."""
    return f" (auto: {precision.auto_precision(device)[1]})" if args.precision == "auto" else ""


def load_task(args, tokenizer, objective: str | None):
    """The task of --task: preference pairs under DPO (one source), else every source mixed by its weight."""
    sources, columns = cli.task_flags(args)
    if objective == "dpo":
        from minipeft.formats import preference
        return preference.load_preferences(sources[0][0], tokenizer, max_len=args.max_len, seed=args.seed,
                                           chat_template=args.chat_template)
    return tasks.load_task(sources, tokenizer, max_len=args.max_len, seed=args.seed, columns=columns,
                           chat_template=args.chat_template, train_on_prompt=args.train_on_prompt)


if __name__ == "__main__":
    cli.run(main)
