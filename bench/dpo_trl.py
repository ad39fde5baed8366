"""The reference for docs/dpo.md's result on real data: trl's DPOTrainer, with a peft LoRA (its reference is
the adapter disabled, as minipeft's), trained on the same preference pairs, from the same model, with the same
settings as `train.py --model smollm2 --task <pairs> --targets all --max-len 256 --steps 200 --batch-size 8
--precompute-reference` (LoRA r 8, α 16, no dropout, on every linear layer; β 0.1, the sigmoid loss; AdamW at
5e-4, weight decay 0.01, 6 % warmup then cosine, gradients clipped to 1; seed 0). Prints reward accuracy,
margin and rewards on the test pairs before and after training.

    python bench/dpo_trl.py                 # the pairs of docs/dpo.md's table (bench/dpo.py's draw, seed 0)
    python bench/dpo_trl.py my/pairs        # a folder of train.jsonl and test.jsonl pairs

SmolLM2-135M-Instruct comes from the same GGUF file minipeft loads, read by transformers (whose logits equal
minipeft's: tests/test_pretrained.py), with its own chat template. Needs trl, peft, transformers and datasets
(requirements-dev.txt).
"""
import argparse
import json
import time
from pathlib import Path

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, nargs="?", help="a folder of train.jsonl and test.jsonl pairs "
                        "(default: bench/dpo.py's 1,600 training and 512 test pairs, written into --out)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (DPO's default in minipeft)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's β")
    parser.add_argument("--train-pairs", type=int, default=None, help="train on the first N training pairs only")
    parser.add_argument("--test-pairs", type=int, default=None, help="score the first N test pairs only")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/dpo-trl"), help="trl's output folder")
    args = parser.parse_args()

    import datasets
    import peft
    import transformers
    import trl

    from dpo import write_data  # bench/dpo.py: the draw of docs/dpo.md's table
    from minipeft.formats.assets import asset_path

    pairs = args.pairs or write_data(args.out / "data", 1600, 128, 512)[0]
    torch.manual_seed(0)
    path = asset_path("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers dequantizes a GGUF file's weights into fp32 tensors as it loads them; the quantizer it keeps
    # on the model only records where they came from, and its Trainer refuses to train any model that has one
    model.hf_quantizer, model.is_quantized = None, False
    rows = {split: [json.loads(line) for line in (pairs / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "test")}
    train, test = rows["train"][:args.train_pairs], rows["test"][:args.test_pairs]
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = trl.DPOConfig(
        output_dir=str(args.out / "trl"), report_to=[], use_cpu=True, seed=0, loss_type=["sigmoid"], beta=args.beta,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.06, lr_scheduler_type="cosine", max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=False, bf16=False,  # as the train.py run: fp32, no checkpointing
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_steps=args.steps, max_length=256, precompute_ref_log_probs=True, save_strategy="no",
        logging_steps=10, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(train),
                             eval_dataset=datasets.Dataset.from_list(test), processing_class=tokenizer,
                             peft_config=lora)
    before = trainer.evaluate()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()
    print(f"trl {trl.__version__}, peft {peft.__version__}, transformers {transformers.__version__}; "
          f"{len(train)} training pairs, {len(test)} test pairs, {args.steps} steps × {args.batch_size}")
    print("| | reward accuracy | reward margin | chosen reward | rejected reward |\n|---|---:|---:|---:|---:|")
    for name, metrics in (("before", before), ("after", after)):
        print(f"| {name} | {metrics['eval_rewards/accuracies']:.3f} | {metrics['eval_rewards/margins']:.3f} | "
              f"{metrics['eval_rewards/chosen']:.3f} | {metrics['eval_rewards/rejected']:.3f} |")
    print(f"training: {seconds:.0f} s, {seconds / args.steps:.2f} s/step (the reference log-probabilities were "
          "computed before, as the trainer was built)")
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    main()
