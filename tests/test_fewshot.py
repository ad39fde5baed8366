"""Tests for minipeft/extras/fewshot.py: the cached prompt scores exactly what the whole prompt scores."""
import csv

import pytest
import torch

import minipeft as mp
from minipeft.formats import tasks
from minipeft.extras import fewshot


def write_reviews(path, n=24):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            writer.writerow([f"review number {i} was {'great' if i % 2 else 'dull'}", "positive" if i % 2 else "negative"])
    return path


@pytest.fixture
def tiny_task(tmp_path):
    model, tokenizer = mp.from_pretrained("tiny-llama")
    task = tasks.load_task(write_reviews(tmp_path / "reviews.csv"), tokenizer, max_len=64)
    return model, tokenizer, task


def whole_prompt_score(model, tokenizer, prompt: str, label: str) -> float:
    """log p(label | prompt) from one uncached forward pass over prompt + label."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    label_ids = tokenizer.encode(" " + label, add_special_tokens=False).ids
    ids = torch.tensor([prompt_ids + label_ids])
    log_probs = model(ids)[0].log_softmax(-1)  # (T, V)
    return sum(log_probs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(label_ids))


@pytest.mark.parametrize("k", [0, 3])
def test_cached_scores_equal_whole_prompt_scores(tiny_task, k):
    model, tokenizer, task = tiny_task
    scores, labels = fewshot.few_shot_scores(model, tokenizer, task, k=k, seed=1, batch_size=2)
    train, test = task.splits["train"], task.splits["test"]
    demos = "".join(fewshot.TEMPLATE.format(text=tokenizer.decode(train.input_ids[i], skip_special_tokens=True))
                    + f" {task.label_names[train.labels[i]]}\n\n"
                    for i in fewshot.pick_demonstrations(train, k, task.n_classes, seed=1))  # the whole prompt's text
    assert scores.shape == (len(test), task.n_classes) and labels.tolist() == test.labels
    for i in range(len(test)):
        prompt = demos + fewshot.TEMPLATE.format(text=tokenizer.decode(test.input_ids[i], skip_special_tokens=True))
        for c, name in enumerate(task.label_names):
            assert scores[i, c].item() == pytest.approx(whole_prompt_score(model, tokenizer, prompt, name), abs=1e-4)


def test_demonstrations_are_balanced_and_seeded(tiny_task):
    _, _, task = tiny_task
    train = task.splits["train"]
    picked = fewshot.pick_demonstrations(train, 4, 2, seed=0)
    assert sorted(train.labels[i] for i in picked) == [0, 0, 1, 1]
    assert picked == fewshot.pick_demonstrations(train, 4, 2, seed=0)
    assert picked != fewshot.pick_demonstrations(train, 4, 2, seed=5)
    with pytest.raises(ValueError, match="too few examples"):
        fewshot.pick_demonstrations(train, len(train) + 2, 2, seed=0)


def test_accuracy_and_limit(tiny_task):
    model, tokenizer, task = tiny_task
    result = fewshot.few_shot_accuracy(model, tokenizer, task, k=2, limit=2)
    assert result["examples"] == 2 and result["shots"] == 2 and 0.0 <= result["accuracy"] <= 1.0


def test_refuses_what_it_cannot_score(tmp_path, tiny_task):
    model, tokenizer, task = tiny_task
    bert, bert_tokenizer = mp.from_pretrained("tiny-bert")
    with pytest.raises(ValueError, match="causal language model"):
        fewshot.few_shot_scores(bert, bert_tokenizer, task)
    lm_path = tmp_path / "text.txt"
    lm_path.write_text("to be or not to be " * 200)
    with pytest.raises(ValueError, match="classification task"):
        fewshot.few_shot_scores(model, tokenizer, tasks.load_task(lm_path, tokenizer, max_len=16))
    with pytest.raises(ValueError, match=">= 0"):
        fewshot.few_shot_scores(model, tokenizer, task, k=-1)


def test_eval_cli_few_shot(tmp_path, capsys):
    import eval as eval_cli
    path = write_reviews(tmp_path / "reviews.csv")
    eval_cli.main(["--model", "tiny-llama", "--task", str(path), "--few-shot", "2", "--limit", "2"])
    assert "tiny-llama 2-shot in context" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        eval_cli.main(["--model", "tiny-llama", "--task", str(path), "--few-shot", "2", "--limit", "0"])


def test_cached_demonstrations_tokenize_as_the_whole_prompt():
    """The defect behind the 4-shot collapse: cached demonstrations that end with "\\n\\n" tokenize it
    as the one token ĊĊ, where the whole prompt has Ċ Ċ (BPE on SmolLM2's vocabulary)."""
    _, tokenizer = mp.from_pretrained("smollm2")
    demos = "Review: A fine film.\nSentiment: positive" + fewshot.SEPARATOR + "Review: Dull.\nSentiment: negative"
    query = fewshot.SEPARATOR + fewshot.TEMPLATE.format(text="Bad movie.")
    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids
    assert encode(demos) + encode(query) == encode(demos + query)
    assert encode(demos + fewshot.SEPARATOR) + encode(query[2:]) != encode(demos + query)  # the old split


def test_one_token_labels_are_read_from_one_forward_pass(tmp_path):
    """Label words that are one token each are scored at the query's last position; the same numbers
    as scoring each label's continuation."""
    from tests.conftest import tiny_model, tiny_tokenizer
    tokenizer = tiny_tokenizer()
    (tmp_path / "words.csv").write_text("text,label\n" + "".join(
        f"{'the movie is great' if i % 2 else 'a review is awful'},{'great' if i % 2 else 'awful'}\n" for i in range(30)))
    task = tasks.load_task(tmp_path / "words.csv", tokenizer, max_len=16)
    model = tiny_model("llama").eval()
    prompt = fewshot.InContext(model, tokenizer, task, k=2, seed=0)
    assert all(len(label) == 1 for label in prompt.labels)
    texts = ["the movie is great", "a review"]
    queries = [prompt.query(t) for t in texts]
    with torch.no_grad():
        fast = prompt.scores(texts)
        slow = torch.stack([fewshot._continuation_log_probs(model, prompt.prefix, queries, label)
                            for label in prompt.labels], dim=1)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_contextual_calibration_divides_by_the_content_free_distribution(tiny_task):
    model, tokenizer, task = tiny_task
    raw, labels = fewshot.few_shot_scores(model, tokenizer, task, k=2, seed=1)
    calibrated, _ = fewshot.few_shot_scores(model, tokenizer, task, k=2, seed=1, calibrate=True)
    with torch.no_grad():
        prompt = fewshot.InContext(model, tokenizer, task, k=2, seed=1)
        p_cf = prompt.scores(list(fewshot.CONTENT_FREE)).softmax(-1).mean(0)  # (C,)
    torch.testing.assert_close(calibrated, raw.log_softmax(-1) - p_cf.log())
    result = fewshot.few_shot_accuracy(model, tokenizer, task, k=2, seed=1, calibrate=True)
    assert sum(result["predicted"]) == result["examples"] == len(labels)
