"""Evaluate a base model, or a base model plus a saved adapter, on a task's test split; generate; or chat.

    python eval.py --adapter checkpoints/<run>/adapter               # accuracy / perplexity on test
    python eval.py --model path/to/hf-folder --adapter path/to/peft-adapter   # an adapter saved by peft
    python eval.py --model smollm2 --generate "The capital of France is"
    python eval.py --model smollm2 --generate "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1
    python eval.py --model smollm2 --chat --adapter checkpoints/sft/adapter   # talk to it (Ctrl-D ends)
    python eval.py --model smollm2 --task rotten_tomatoes_instruct --adapter checkpoints/sft/adapter
                                                                      # exact match of greedy answers
    python eval.py --model smollm2 --few-shot 4 --limit 200 [--calibrate]   # in-context baseline, no training
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import minipeft as mp
from minipeft import chat, cli, data, fewshot, trainer
from minipeft.atomic import atomic_write
from minipeft.generate import Sampling, TextStreamer, generate

DEFAULT_NEW_TOKENS = 128  # --generate and --chat


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a model (and adapter), generate text or chat.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_and_task_flags(p)
    cli.add_device_flags(p)
    cli.add_import_flag(p)
    p.add_argument("--adapter", default=None, help="adapter folder saved by train.py (its <out>/adapter), by "
                   "mp.save_adapter in either format, or by peft (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="which split to score")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split (use the training run's) and of sampling")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first (lora)")
    p.add_argument("--limit", type=int, default=None, help="score only the first LIMIT examples of the split")
    p.add_argument("--predictions", default=None, metavar="FILE", help="instruction tasks: where to write each "
                   "prompt's answer (JSON lines; default: predictions-<split>.jsonl beside the adapter, or here)")
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


def check_numbers(args):
    for flag, value, ok, allowed in [("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
                                     ("--max-new-tokens", args.max_new_tokens,
                                      args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
                                     ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1")]:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}, got {value}")


def load_model(args):
    n_classes = None
    if args.adapter:  # either format says whether it carries a classifier head, and its size
        n_classes = mp.read_adapter_config(args.adapter)["base"]["config"].get("n_classes")
    model, tokenizer = mp.from_pretrained(args.model, n_classes=n_classes, device=args.device, dtype=args.precision)
    if args.adapter:
        mp.load_adapter(model, args.adapter, tokenizer=tokenizer)
        if args.merge:
            mp.merge(model)
    return model.eval(), tokenizer, n_classes


def generation_options(args, tokenizer) -> dict:
    eos = chat.eos_token(tokenizer)
    return dict(sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
                eos_id=tokenizer.token_to_id(eos) if eos else None, stop=args.stop, tokenizer=tokenizer)


def print_continuation(model, tokenizer, args):
    """--generate: the prompt, then the new text as it comes."""
    ids = tokenizer.encode(args.generate).ids
    print(args.generate, end="", flush=True)
    generate(model, [ids], args.max_new_tokens or DEFAULT_NEW_TOKENS, on_token=TextStreamer(tokenizer),
             **generation_options(args, tokenizer))
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
        print()
        text = tokenizer.decode(answer)
        messages.append({"role": "assistant", "content": min((text.split(s)[0] for s in args.stop), key=len)
                         if args.stop else text})


def score_instructions(model, tokenizer, task, args):
    """Exact match of greedy answers on an instruction task's split; every prediction written to a file."""
    dataset = task.splits[args.split]
    result = trainer.exact_match(model, tokenizer, dataset, task.info["eos_id"], args.batch_size, args.limit,
                                 args.max_new_tokens)
    default = (Path(args.adapter) if args.adapter else Path(".")) / f"predictions-{args.split}.jsonl"
    path = Path(args.predictions) if args.predictions else default
    rows = [{"prompt": tokenizer.decode(prompt, skip_special_tokens=False), "answer": answer, "prediction": pred,
             "correct": trainer.normalize_answer(pred) == trainer.normalize_answer(answer)}
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
    check_numbers(args)
    Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad sampling flags stop before loading
    model, tokenizer, n_classes = load_model(args)
    if args.generate is not None:
        return print_continuation(model, tokenizer, args)
    if args.chat:
        return chat_loop(model, tokenizer, args)
    task = data.load_task(args.task, tokenizer, max_len=args.max_len, seed=args.seed, chat_template=args.chat_template)
    if args.few_shot is not None:
        result = fewshot.few_shot_accuracy(model, tokenizer, task, k=args.few_shot, seed=args.seed,
                                           split=args.split, limit=args.limit, calibrate=args.calibrate)
        print(f"{args.model} {args.few_shot}-shot in context{' (calibrated)' if args.calibrate else ''} on "
              f"{args.task} {args.split} ({result['examples']} examples): accuracy {result['accuracy']:.4f}")
        return
    if task.kind == "sft":
        return score_instructions(model, tokenizer, task, args)
    task.splits[args.split] = task.splits[args.split].head(args.limit)
    if task.kind == "classification" and not n_classes:
        model.add_classifier(task.n_classes)
        print(f"note: {'the adapter has no classifier head' if args.adapter else 'no adapter given'}, so the "
              "classifier head is freshly initialized (a chance-level baseline)")
    with torch.no_grad():
        metrics = trainer.evaluate(model, task.splits[args.split], task.kind, args.batch_size)
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {args.task} {args.split}: "
          f"{trainer.headline(metrics)}")


if __name__ == "__main__":
    cli.run(main)
