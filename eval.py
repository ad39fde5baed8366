"""Evaluate a base model, or a base model plus a saved adapter, on a task's test split; generate; or chat.

    python eval.py --adapter checkpoints/<run>/adapter               # accuracy / perplexity on test (its base model)
    python eval.py --model path/to/hf-folder --adapter path/to/peft-adapter   # an adapter saved by peft
    python eval.py --model smollm2 --generate "The capital of France is"
    python eval.py --model smollm2 --generate "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1
    python eval.py --chat --adapter checkpoints/sft/adapter           # talk to it (Ctrl-D ends)
    python eval.py --task rotten_tomatoes_instruct --adapter checkpoints/sft/adapter   # exact match of greedy answers
    python eval.py --task questions.jsonl --split all --adapter checkpoints/sft/adapter --out answers.jsonl
    python eval.py --model smollm2 --few-shot 4 --limit 200 [--calibrate]   # in-context baseline, no training
    python eval.py --model smollm2 --task pairs.jsonl --adapter checkpoints/dpo/adapter   # reward accuracy (DPO)
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import minipeft as mp
from minipeft.formats import chat, preference
from minipeft.run import cli, exact_match
from minipeft.core import data, loop
from minipeft.formats import tasks
from minipeft.run import report
from minipeft.extras import fewshot
from minipeft.extras.dpo import DPOLoss
from minipeft.formats.atomic import atomic_write
from minipeft.core.generate import Sampling, TextStreamer, cut_at_stop, generate

DEFAULT_NEW_TOKENS = 128  # --generate and --chat
DEFAULT_MODEL = "minilm"  # without --model and --adapter


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a model (and adapter), generate text or chat.",
                                formatter_class=cli.HelpWithDefaults)
    cli.add_model_and_task_flags(p, model_default=None, model_help="; None: the base model the --adapter was "
                                 "trained on, as its config records it (minilm without --adapter)")
    cli.add_device_flags(p)
    cli.add_import_flag(p)
    p.add_argument("--adapter", default=None, help="adapter folder saved by train.py (its <out>/adapter), by "
                   "mp.save_adapter in either format, or by peft (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test", "all"),
                   help="which split to score; all: every row of the sources (a single file whole), once each")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split (use the training run's) and of sampling")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first (lora)")
    p.add_argument("--limit", type=int, default=None, help="score only the first LIMIT examples of the split")
    p.add_argument("--out", "--predictions", default=None, metavar="FILE",
                   help="instruction tasks: where to write each prompt's answer (JSON lines); None: "
                        "predictions-<split>.jsonl in the folder that holds the adapter folder (the training run's), "
                        "or here without --adapter")
    g = p.add_argument_group("generation")
    g.add_argument("--generate", default=None, metavar="PROMPT", help="print a continuation of PROMPT (causal models)")
    g.add_argument("--chat", action="store_true", help="talk with the model in its chat template (a line per turn; "
                   "an empty line or Ctrl-D ends)")
    g.add_argument("--system", default=None, help="--chat: a system message to start the conversation with")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate per answer at most "
                   "(default: 128; scoring instruction data: 3 more than the longest reference answer)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample only among the most likely tokens whose "
                   "probabilities add up to P (nucleus sampling)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop generating once the text contains TEXT (may be given more than once)")
    f = p.add_argument_group("in-context classification (no training)")
    f.add_argument("--few-shot", type=int, default=None, metavar="K", help="classify in context with K labelled "
                   "training examples in the prompt, by the label words' log-probabilities (causal models)")
    f.add_argument("--calibrate", action="store_true", help="--few-shot: contextual calibration (Zhao et al. 2021): "
                   "divide by the label probabilities the prompt gives a content-free input")
    return p


def check_flags(args):
    """Flags out of range, or given without the flag they serve, stop before anything loads."""
    if args.few_shot is not None and args.split == "all":
        raise ValueError("--few-shot takes its examples from the training split, so it cannot score --split all; "
                         "use --split test or validation")
    for flag, value, ok, allowed in [("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
                                     ("--max-new-tokens", args.max_new_tokens,
                                      args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
                                     ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
                                     ("--seed", args.seed, 0 <= args.seed < 2**63, "in [0, 2**63)")]:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}, got {value}")
    for flag, given, needs, present in [("--calibrate", args.calibrate, "--few-shot", args.few_shot is not None),
                                        ("--merge", args.merge, "--adapter", args.adapter),
                                        ("--system", args.system is not None, "--chat", args.chat)]:
        if given and not present:
            raise ValueError(f"{flag} works only with {needs}; add {needs} or leave {flag} out")
    if args.chat and args.generate is not None:
        raise ValueError("--generate continues one prompt and --chat talks turn by turn; give one of them")
    if args.out is not None and (args.chat or args.generate is not None or args.few_shot is not None):
        raise ValueError("--out gets the answers of an instruction task's split; --generate, --chat and "
                         "--few-shot print theirs")
    if args.out is not None and (Path(args.out).is_dir() or not Path(args.out).resolve().parent.is_dir()):
        raise ValueError(f"--out {args.out} must be a file in an existing folder (it gets the predictions as "
                         "JSON lines)")


def load_model(args):
    """The base model (--model, else the adapter's own base, else minilm) with the adapter, if any."""
    n_classes, base = None, None
    if args.adapter:  # either format says whether it carries a classifier head, and its size, and its base
        config = mp.read_adapter_config(args.adapter)
        n_classes, base = config["base"]["config"].get("n_classes"), config["base"].get("source")
    from_adapter = args.model is None and args.adapter is not None
    if from_adapter and base is None:
        raise ValueError(f"adapter {args.adapter} does not record its base model; give it with --model")
    args.model = args.model or base or DEFAULT_MODEL
    try:
        model, tokenizer = mp.from_pretrained(args.model, n_classes=n_classes, device=args.device,
                                              dtype=args.precision)
    except FileNotFoundError as error:
        if not from_adapter:
            raise
        raise FileNotFoundError(f"{error} (the base model adapter {args.adapter} records); give the base model "
                                "with --model") from None
    if args.adapter:
        mp.load_adapter(model, args.adapter, tokenizer=tokenizer)
        if args.merge:
            mp.merge(model)
    # the fast twins of the core's kernels, the same results in less time (minipeft/fast/); NF4's for 4-bit layers
    mp.fast.enable(nf4=bool(mp.precision.four_bit_layers(model)))
    return model.eval(), tokenizer, n_classes


def check_head(model, task, args) -> None:
    """The head must fit the task. A classification task is scored with the model's own classifier (the
    adapter's, or a fine-tuned …ForSequenceClassification checkpoint's), which must have the task's classes,
    else with a fresh head, said so; the other tasks need the LM head, which a classifier does not have."""
    cli.check_lm_head(model, task.kind, args.model, f"score {args.task},")
    n_classes = model.cfg.n_classes
    if task.kind != "classification":
        return
    if n_classes and n_classes != task.n_classes:
        raise ValueError(f"the classifier of {args.model}{' + ' + args.adapter if args.adapter else ''} has "
                         f"{n_classes} classes, but {args.task} has {task.n_classes}; evaluate it on a task of its "
                         "own classes")
    if not n_classes:
        model.add_classifier(task.n_classes)
        print(f"note: {'the adapter' if args.adapter else 'the model'} has no classifier head, so the classifier "
              "head is freshly initialized (a chance-level baseline)")


def generation_options(args, tokenizer) -> dict:
    eos = chat.eos_token(tokenizer)
    return dict(sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
                eos_id=tokenizer.token_to_id(eos) if eos else None, stop=args.stop, tokenizer=tokenizer)


def print_continuation(model, tokenizer, args):
    """--generate: the prompt, then the new text as it comes."""
    ids = tokenizer.encode(args.generate).ids
    print(args.generate, end="", flush=True)
    streamer = TextStreamer(tokenizer)
    generate(model, [ids], args.max_new_tokens or DEFAULT_NEW_TOKENS, on_token=streamer,
             **generation_options(args, tokenizer))
    streamer.end()
    print()


def typed_lines():
    """Lines from the terminal (or a pipe) until Ctrl-D / the end of the input."""
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def chat_loop(model, tokenizer, args, lines=None):
    """--chat: each line typed is a user turn; the answer streams back and joins the conversation."""
    fmt = chat.chat_format(tokenizer, args.chat_template)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chat with {args.model}{' + ' + args.adapter if args.adapter else ''} (template {fmt.name}); "
          "an empty line ends", file=sys.stderr)
    for line in lines if lines is not None else typed_lines():
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode(fmt.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
        streamer = TextStreamer(tokenizer)
        answer = generate(model, [prompt], args.max_new_tokens or DEFAULT_NEW_TOKENS, on_token=streamer,
                          **generation_options(args, tokenizer))[0]
        streamer.end()
        print()
        text = tokenizer.decode(answer)
        messages.append({"role": "assistant", "content": cut_at_stop(text, args.stop)})


def score_instructions(model, tokenizer, task, args):
    """Exact match of greedy answers on an instruction task's split; every prediction written to a file."""
    dataset = task.splits[args.split]
    result = exact_match.exact_match(model, tokenizer, dataset, task.info["eos_id"], args.batch_size, args.limit,
                                     args.max_new_tokens)
    default = (Path(args.adapter).resolve().parent if args.adapter else Path(".")) / f"predictions-{args.split}.jsonl"
    path = Path(args.out) if args.out else default
    rows = [{"prompt": tokenizer.decode(prompt, skip_special_tokens=False), "answer": answer, "prediction": pred,
             "correct": exact_match.normalize_answer(pred) == exact_match.normalize_answer(answer)}
            for prompt, answer, pred in zip(dataset.prompts, dataset.answers, result["predictions"])]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {args.task} {args.split} "
          f"({result['examples']} examples, template {task.info['template']}): exact match "
          f"{result['exact_match']:.4f}"
          + (f", choice accuracy {result['choice_accuracy']:.4f}" if "choice_accuracy" in result else "")
          + f"; predictions in {path}")


def main(argv):
    cli.import_user_files(argv)  # a user's method must be registered before its adapter loads
    args = build_parser().parse_args(argv)
    check_flags(args)
    Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad sampling flags stop before loading
    sources, columns = cli.task_flags(args)  # and bad --task weights or --columns
    model, tokenizer, _ = load_model(args)
    if args.generate is not None:
        return print_continuation(model, tokenizer, args)
    if args.chat:
        return chat_loop(model, tokenizer, args)
    if len(sources) > 1 and any(tasks.is_preference_source(source) for source, _ in sources):
        raise ValueError("reward accuracy reads one --task source of preference pairs, got "
                         f"{tasks.sources_text(args.task)}")
    if len(sources) == 1 and tasks.is_preference_source(sources[0][0]):  # pairs: reward accuracy vs the base
        task = preference.load_preferences(sources[0][0], tokenizer, max_len=args.max_len, seed=args.seed,
                                           chat_template=args.chat_template)  # (β = 0.1)
    else:
        task = tasks.load_task([(source, 1.0) for source, _ in sources], tokenizer, max_len=args.max_len,
                              seed=args.seed, chat_template=args.chat_template, columns=columns)  # (weights: training)
    args.task = tasks.sources_text(args.task)  # for the reports
    if args.out is not None and task.kind != "sft":
        raise ValueError(f"--out gets the answers of an instruction task's split; {args.task} is a {task.kind} "
                         "task, whose score is printed")
    if args.split == "all":
        task.splits["all"] = data.Dataset.concat([task.splits[split] for split in tasks.SPLITS])
    if args.few_shot is not None:
        result = fewshot.few_shot_accuracy(model, tokenizer, task, k=args.few_shot, seed=args.seed,
                                           split=args.split, limit=args.limit, calibrate=args.calibrate)
        print(f"{args.model} {args.few_shot}-shot in context{' (calibrated)' if args.calibrate else ''} on "
              f"{args.task} {args.split} ({result['examples']} examples): accuracy {result['accuracy']:.4f}")
        return
    check_head(model, task, args)
    if task.kind == "sft":
        return score_instructions(model, tokenizer, task, args)
    task.splits[args.split] = task.splits[args.split].head(args.limit)
    with torch.no_grad():
        objective = DPOLoss() if task.kind == "dpo" else None  # preference pairs: reward accuracy and margin
        metrics = loop.evaluate(model, task.splits[args.split], task.kind, args.batch_size, objective=objective)
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {args.task} {args.split}: "
          f"{report.headline(metrics)}")


if __name__ == "__main__":
    cli.run(main)
