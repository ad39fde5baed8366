"""Evaluate a base model, or a base model plus a saved adapter, on a task's test split; or generate.

    python eval.py --adapter checkpoints/run/adapter                 # accuracy / perplexity on test
    python eval.py --model path/to/hf-folder --adapter path/to/peft-adapter   # an adapter saved by peft
    python eval.py --model smollm2 --generate "The capital of France is"
    python eval.py --model smollm2 --few-shot 4 --limit 200           # in-context baseline, no training
"""
import argparse

import minipeft as mp
from minipeft import cli, data, fewshot, trainer


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a model (and adapter) or generate text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_and_task_flags(p)
    cli.add_import_flag(p)
    p.add_argument("--adapter", default=None, help="adapter folder saved by train.py (its <out>/adapter), by "
                   "mp.save_adapter in either format, or by peft (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="which split to score")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split (use the training run's)")
    p.add_argument("--generate", default=None, metavar="PROMPT", help="print a greedy continuation of PROMPT (causal models)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate with --generate")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first (lora)")
    p.add_argument("--few-shot", type=int, default=None, metavar="K", help="classify in context with K labelled "
                   "training examples in the prompt, by the label words' log-probabilities (causal models)")
    p.add_argument("--limit", type=int, default=None, help="score only the first LIMIT examples of the split")
    return p


def main(argv):
    cli.import_user_files(argv)  # a user's method must be registered before its adapter loads
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    n_classes = None
    if args.adapter:  # either format says whether it carries a classifier head, and its size
        n_classes = mp.read_adapter_config(args.adapter)["base"]["config"].get("n_classes")
    model, tokenizer = mp.from_pretrained(args.model, n_classes=n_classes)
    if args.adapter:
        mp.load_adapter(model, args.adapter, tokenizer=tokenizer)
        if args.merge:
            mp.merge(model)
    model.eval()
    if args.generate is not None:
        import torch
        ids = torch.tensor([tokenizer.encode(args.generate).ids])
        out = model.generate(ids, args.max_new_tokens)
        print(args.generate + tokenizer.decode(out[0, ids.shape[1]:].tolist()))
        return
    task = data.load_task(args.task, tokenizer, max_len=args.max_len, seed=args.seed)
    if args.few_shot is not None:
        result = fewshot.few_shot_accuracy(model, tokenizer, task, k=args.few_shot, seed=args.seed,
                                           split=args.split, limit=args.limit)
        print(f"{args.model} {args.few_shot}-shot in context on {args.task} {args.split} "
              f"({result['examples']} examples): accuracy {result['accuracy']:.4f}")
        return
    task.splits[args.split] = task.splits[args.split].head(args.limit)
    if task.kind == "classification" and not n_classes:
        model.add_classifier(task.n_classes)
        print(f"note: {'the adapter has no classifier head' if args.adapter else 'no adapter given'}, so the "
              "classifier head is freshly initialized (a chance-level baseline)")
    metrics = trainer.evaluate(model, task.splits[args.split], task.kind, args.batch_size)
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {args.task} {args.split}: "
          f"{trainer.headline(metrics)}")


if __name__ == "__main__":
    cli.run(main)
