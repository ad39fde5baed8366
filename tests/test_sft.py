"""Instruction tuning end to end: the three row shapes, labels on the answers only, EOS, cutting long rows,
packing (equal loss and gradients), exact-match evaluation, the command lines and their bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minipeft as mp
from minipeft.core import data, loop
from minipeft.formats import tasks
from minipeft.run import exact_match
from minipeft.formats.pretrained import byte_tokenizer
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
EOS = 256  # the byte tokenizer's <|endoftext|>


def run(script, *args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def sums(n=40):
    return [{"prompt": f"{i} plus {i % 3}?", "completion": f"{i + i % 3}"} for i in range(n)]


def decoded_labels(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != data.IGNORE_INDEX], skip_special_tokens=False)


# ------------------------------------------------------------------------------ data


def test_prompt_completion_rows_learn_only_the_answer_and_its_eos(tmp_path):
    tokenizer = byte_tokenizer()
    task = tasks.load_task(write_jsonl(tmp_path / "sums.jsonl", sums()), tokenizer, max_len=64)
    assert task.kind == "sft" and task.info["shape"] == "prompt/completion" and task.info["eos_id"] == EOS
    train = task.splits["train"]
    assert (len(train), len(task.splits["validation"]), len(task.splits["test"])) == (32, 4, 4)
    for ids, labels, prompt, answer in zip(train.input_ids, train.labels, train.prompts, train.answers):
        text = tokenizer.decode(ids + [labels[-1]], skip_special_tokens=False)  # the whole rendering
        assert text.startswith("User: ") and text.endswith(f"Assistant: {answer.strip()}<|endoftext|>\n")
        assert decoded_labels(tokenizer, labels) == f" {answer}<|endoftext|>\n"  # after "Assistant:"
        assert text.startswith(tokenizer.decode(prompt) + " " + answer)


def test_messages_and_alpaca_rows(tmp_path):
    tokenizer = byte_tokenizer()
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"},
                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name?"},
                           {"role": "assistant", "content": f"bot {i}"}]} for i in range(10)]
    task = tasks.load_task(write_jsonl(tmp_path / "chat.jsonl", chats), tokenizer, max_len=128)
    example = task.splits["test"]
    assert decoded_labels(tokenizer, example.labels[0]) == \
        f" hello<|endoftext|>\n {example.answers[0]}<|endoftext|>\n"  # every assistant turn
    assert tokenizer.decode(example.prompts[0]).endswith("User: name?\nAssistant:")
    alpaca = [{"instruction": "Add one.", "input": str(i), "output": str(i + 1)} for i in range(9)] + \
             [{"instruction": "Say yes.", "output": "yes"}]
    task = tasks.load_task(write_jsonl(tmp_path / "alpaca.jsonl", alpaca), tokenizer, max_len=128)
    assert task.info["shape"] == "alpaca"
    everything = [tokenizer.decode(p) for s in tasks.SPLITS for p in task.splits[s].prompts]
    assert any(p.startswith("User: Add one.\n\n") for p in everything)
    assert "User: Say yes.\nAssistant:" in everything


def conversational_pairs(n=10):
    """trl's conversational prompt/completion rows: a prompt with an answer of its own, one completion."""
    return [{"prompt": [{"role": "system", "content": "Add one."}, {"role": "user", "content": f"{i}"},
                        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "so?"}],
             "completion": [{"role": "assistant", "content": str(i + 1)}], "id": i} for i in range(n)]


def test_conversational_prompt_completion_rows_learn_the_completion_only(tmp_path):
    """The prompt's own assistant turn is context, as in trl (completion_only_loss): the rendering is the
    messages row's, the labels those of the completion alone."""
    tokenizer = byte_tokenizer()
    rows = conversational_pairs()
    task = tasks.load_task(write_jsonl(tmp_path / "conv.jsonl", rows), tokenizer, max_len=128)
    chats = tasks.load_task(write_jsonl(tmp_path / "chats.jsonl", [{"messages": r["prompt"] + r["completion"]}
                                                                    for r in rows]), tokenizer, max_len=128)
    assert task.info["shape"] == "prompt/completion"
    for split in tasks.SPLITS:
        ours, theirs = task.splits[split], chats.splits[split]
        assert (ours.input_ids, ours.prompts, ours.answers) == (theirs.input_ids, theirs.prompts, theirs.answers)
        for labels, chat_labels, answer in zip(ours.labels, theirs.labels, ours.answers):
            assert decoded_labels(tokenizer, labels) == f" {answer}<|endoftext|>\n"
            assert decoded_labels(tokenizer, chat_labels) == f" ok<|endoftext|>\n {answer}<|endoftext|>\n"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_conversational_prompt_completion_rows_tokenize_as_trls_sft_trainer(tmp_path):
    trl, transformers, datasets = (pytest.importorskip(m) for m in ("trl", "transformers", "datasets"))
    from minipeft.formats.chat import PLAIN_TEMPLATE
    rows = conversational_pairs(4)
    for split in tasks.SPLITS:
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    ours = tasks.load_task(tmp_path, byte_tokenizer(), max_len=128).splits["train"]
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token="<|endoftext|>",
                                                        pad_token="<|endoftext|>")
    hf_tokenizer.chat_template = PLAIN_TEMPLATE  # the template minipeft gives a model without one
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=EOS + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None)
    theirs = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=hf_tokenizer).train_dataset
    for ids, labels, row in zip(ours.input_ids, ours.labels, theirs):
        assert ids + labels[-1:] == row["input_ids"] and labels == row["labels"][1:]  # trl's labels: unshifted


def test_train_on_prompt_labels_every_token(tmp_path):
    tokenizer = byte_tokenizer()
    task = tasks.load_task(write_jsonl(tmp_path / "s.jsonl", sums()), tokenizer, max_len=64, train_on_prompt=True)
    train = task.splits["train"]
    assert all(labels == ids[1:] + [labels[-1]] for ids, labels in zip(train.input_ids, train.labels))
    follow_up = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "thanks"}]}] * 10
    with pytest.raises(ValueError, match=r"line 1: the conversation goes on after its last answer \(a user turn\), "
                                         r"which --train-on-prompt would leave out"):
        tasks.load_task(write_jsonl(tmp_path / "follow_up.jsonl", follow_up), tokenizer, train_on_prompt=True)


def test_long_rows_are_cut_from_the_prompt_and_counted(tmp_path):
    tokenizer = byte_tokenizer()
    rows = [{"prompt": "x" * (10 + 10 * (i % 2)), "completion": "yes"} for i in range(20)]
    task = tasks.load_task(write_jsonl(tmp_path / "long.jsonl", rows), tokenizer, max_len=36)
    assert task.info["truncated"] == 10  # "User: " + n x's + "\nAssistant: yes<eos>\n" is n + 23 tokens
    for split in tasks.SPLITS:
        for ids, labels, prompt in zip(task.splits[split].input_ids, task.splits[split].labels,
                                       task.splits[split].prompts):
            assert len(ids) <= 35 and decoded_labels(tokenizer, labels) == " yes<|endoftext|>\n"
            answer = sum(label != data.IGNORE_INDEX for label in labels)
            assert ids[:len(prompt)] == prompt and len(prompt) + answer == len(ids) + 1  # the prompt cut alike
    assert tasks.load_task(write_jsonl(tmp_path / "long.jsonl", rows), tokenizer, max_len=32).info["truncated"] == 20
    with pytest.raises(ValueError, match=r"line \d+: its last answer takes 43 tokens.* raise --max-len"):
        tasks.load_task(write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "a", "completion": "y" * 40}] * 10),
                       tokenizer, max_len=36)


def test_a_tokenizer_that_adds_special_tokens_adds_none_to_conversations(tmp_path):
    """The template writes every special token: a tokenizer whose post-processor adds a start token (as
    Llama's do) gives the same rows and generation prompts as one that adds nothing."""
    from tokenizers.processors import TemplateProcessing
    adds = byte_tokenizer()
    adds.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", EOS)])
    assert adds.encode("hi").ids[0] == EOS
    path = write_jsonl(tmp_path / "sums.jsonl", sums(10))
    plain, theirs = (tasks.load_task(path, tokenizer, max_len=64).splits["train"]
                     for tokenizer in (byte_tokenizer(), adds))
    assert (theirs.input_ids, theirs.labels, theirs.prompts) == (plain.input_ids, plain.labels, plain.prompts)


def test_rotten_tomatoes_instruct_is_rotten_tomatoes_as_questions():
    texts, labels, names = tasks._rotten_tomatoes(seed=0)
    shape, rows, _ = tasks._instruct_rows("rotten_tomatoes_instruct", seed=0)
    assert shape == "messages"
    for split in tasks.SPLITS:  # the same sentences, split by movie in the same way
        assert [row.messages for row in rows[split]] == [
            [{"role": "user", "content": tasks.REVIEW_INSTRUCTION.format(text=text)},
             {"role": "assistant", "content": names[label]}] for text, label in zip(texts[split], labels[split])]
    assert tasks.REVIEW_INSTRUCTION.startswith("Is this movie review positive or negative? Answer with one word.")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "a"}]}],
     "line 2 is a messages row but line 1 is a prompt/completion row"),
    ([{"prompt": "a", "completion": "b"}, "", {"question": "a", "answer": "b"}],
     "line 3 has no 'prompt' field, which every prompt/completion row of this file needs"),
    ([{"question": "a", "answer": "b"}], "line 1 fits no row shape \\(its fields are: question, answer\\); give each row"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "line 1: the conversation has no assistant turn"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}], "line 2: an empty completion"),
    ([{"prompt": "a", "completion": 3}], "line 1: 'completion' is int, not a string"),
    ([{"messages": [{"role": "bot", "content": "a"}]}], "line 1: message 0 is not"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     "line 1: turn 1 is not {\"from\": one of human, user, gpt, assistant, system"),
    ([{"conversations": "hello"}], "line 1: 'conversations' is text but not valid JSON"),
    ([{"conversations": [{"from": "human", "value": "a"}]}], "line 1: the conversation has no assistant turn"),
    ([{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "completion": [{"role": "assistant", "content": "c"}]}], "line 1: the prompt ends with an assistant turn"),
    ([{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}],
     "line 1: the prompt is a list of messages, so 'completion' must be a list of one message"),
    ([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}],
     "line 1: the prompt is a list of messages, so 'completion' must be a list of one message"),
    ([{"prompt": [{"role": "tool", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}],
     "line 1: the prompt: message 0 is not"),
])
def test_bad_rows_name_their_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        tasks.load_instruct(path, byte_tokenizer())


# ------------------------------------------------------------------------------ packing


def packed_and_padded(flavor, method=None):
    torch.manual_seed(0)
    model = tiny_model(flavor)
    if method:
        mp.apply(model, method)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9, 30, 3, 12, 21]
    input_ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]
    labels = [[t if j >= n // 2 else data.IGNORE_INDEX for j, t in enumerate(torch.randint(1, 97, (n,),
                                                                                          generator=g).tolist())]
              for n in lengths]
    dataset = data.Dataset("sft", input_ids, labels, pad_id=0)
    return model, dataset.collate(list(range(7))), dataset.packed(40).collate(list(range(7)))


@pytest.mark.parametrize("flavor, method", [("llama", None), ("gpt2", None), ("llama", "lora"), ("llama", "prefix"),
                                            ("gpt2", "llama_adapter")])
def test_packed_loss_and_gradients_equal_the_padded_batch(flavor, method):
    model, padded, packed = packed_and_padded(flavor, method)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows ...
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # ... the same tokens
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = loop.loss_fn(model, batch, "sft")
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert abs(loss_a - loss_b) < 1e-5 and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_restart_positions_and_number_their_examples():
    batch = data.pack_examples([[1] * 5, [2] * 3, [3] * 4], [[7] * 5, [8] * 3, [9] * 4], max_len=8, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [3, 3, 3, 3, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert batch["document_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [9, 9, 9, 9, -100, -100, -100, -100] and int(batch["examples"]) == 3


@pytest.mark.parametrize("flavor", ["llama", "gpt2"])
def test_rows_packed_to_the_last_token_keep_each_example_to_itself(flavor):
    """Rows that packing fills exactly carry no padding (an all-ones attention mask, which the model treats as no
    mask at all): each example's logits are still those of the example alone."""
    model = tiny_model(flavor).eval()
    examples = [list(range(3, 8)), list(range(20, 23)), list(range(40, 48))]  # 5 + 3 tokens and 8: two full rows
    batch = data.pack_examples(examples, examples, max_len=8, pad_id=0)
    assert batch["input_ids"].tolist() == [examples[2], examples[0] + examples[1]]  # longest first
    assert batch["attention_mask"].all()
    packed = model(batch["input_ids"], **{k: batch[k] for k in loop.MODEL_INPUTS})  # (2, 8, V)
    alone = [model(torch.tensor([example]))[0] for example in examples]
    for got, want in zip([packed[1, :5], packed[1, 5:], packed[0]], alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_classification_and_prompt_tuning_cannot_be_packed():
    import train as train_cli
    classes = data.Dataset("classification", [[1, 2]], [0], pad_id=0)
    with pytest.raises(ValueError, match="one label per example"):
        classes.packed(16)
    task = data.TaskData("sft", {"train": data.Dataset("sft", [[1, 2]], [[2, 3]], pad_id=0)}, None, None, 0)
    with pytest.raises(ValueError, match="soft tokens start every row"):
        train_cli.pack_training_split(mp.apply(tiny_model("llama"), "prompt", length=2), task, 16)


# ------------------------------------------------------------------------------ command lines


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    task = write_jsonl(folder / "sums.jsonl", sums())
    out = folder / "run"
    done = run("train.py", "--model", "tiny-llama", "--task", task, "--steps", "3", "--batch-size", "4", "--pack",
               "--max-len", "64", "--eval-generate", "2", "--out", out)
    assert done.returncode == 0, done.stderr
    return task, out, done


def test_train_reports_exact_match_and_the_data(sft_run):
    _, out, done = sft_run
    assert "exact match" in done.stdout and "prompt/completion rows" in done.stdout
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    lr, options = mp.task_defaults("lora", "sft")  # instruction data's defaults, not classification's
    assert start["config"]["lr"] == lr == 1e-3 and start["method"]["options"]["targets"] == options["targets"] == ["all"]
    assert mp.task_defaults("qlora", "sft") == (lr, options)  # QLoRA trains as LoRA does
    summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["data"]["truncated"] == 0 and "exact_match" in summary["test_after"]
    validation = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                  if '"validation"' in line]
    assert validation and all(v["exact_match_examples"] == 2 for v in validation)


def test_eval_writes_the_predictions(sft_run, tmp_path):
    task, out, _ = sft_run
    done = run("eval.py", "--model", "tiny-llama", "--task", task, "--adapter", out / "adapter",
               "--predictions", tmp_path / "p.jsonl", "--max-len", "64")
    assert done.returncode == 0, done.stderr
    assert "exact match" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "answer", "prediction", "correct"}


def test_eval_scores_a_file_whole_beside_the_run(sft_run):
    """No --model: the adapter's base; --split all: every row of the file; the predictions go to the run folder
    (beside the adapter folder, not inside it)."""
    task, out, _ = sft_run
    done = run("eval.py", "--task", task, "--adapter", out / "adapter", "--split", "all", "--max-len", "64")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tiny-llama + ") and "all (40 examples" in done.stdout
    rows = [json.loads(line) for line in (out / "predictions-all.jsonl").read_text().splitlines()]
    assert sorted(r["answer"] for r in rows) == sorted(r["completion"] for r in sums())
    assert not list((out / "adapter").glob("predictions*"))


def test_chat_streams_answers_in_the_template():
    done = run("eval.py", "--model", "tiny-llama", "--chat", "--max-new-tokens", "5", "--temperature", "0.7",
               "--seed", "1", stdin="hello\nagain\n")  # the input ends: Ctrl-D
    assert done.returncode == 0, done.stderr
    assert "plain fallback" in done.stderr and done.stdout.count("> ") == 3


BAD_INPUT = [
    ([{"prompt": "a", "completion": "b"}] * 3 + [{"text": "a", "label": 1}], [],
     "line 4 is a text/label row but line 1 is a prompt/completion row"),
    ([{"prompt": "a", "completion": "b"}] * 5 + [{"messages": []}], [], "line 6 is a messages row"),
    ([{"messages": [{"role": "user", "content": "a"}]}] * 6, [], "no assistant turn"),
    ([{"prompt": "a", "completion": ""}] * 6, [], "empty completion"),
    ([{"prompt": "a", "completion": "b"}] * 6, ["--chat-template", "TEMPLATE"], "bad.jinja failed to render"),
    (None, ["--pack"], "--pack needs a task with a label per token"),
    (None, ["--train-on-prompt"], "--train-on-prompt is for instruction data"),
]


def bad_input_args(tmp_path, rows, extra):
    if rows is None:
        task = tmp_path / "classes.csv"
        task.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)))
    else:
        task = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "bad.jinja").write_text("{{ messages[0].content.nope() }}")
    extra = [str(tmp_path / "bad.jinja") if e == "TEMPLATE" else e for e in extra]
    return ["--model", "tiny-llama", "--task", str(task), "--steps", "1", "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("rows, extra, message", BAD_INPUT)
def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, capsys, rows, extra, message):
    import train as train_cli
    from minipeft.run import cli
    with pytest.raises(SystemExit) as stopped:
        cli.run(train_cli.main, bad_input_args(tmp_path, rows, extra))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_input_exit_code_from_the_shell(tmp_path):
    done = run("train.py", *bad_input_args(tmp_path, *BAD_INPUT[0][:2]))
    assert done.returncode == 2 and "Traceback" not in done.stderr and BAD_INPUT[0][2] in done.stderr


def test_exact_match_and_choice_accuracy_read_the_answer():
    assert exact_match.normalize_answer("  Positive. ") == "positive"
    assert exact_match.first_choice("This review is positive, not negative.", ["negative", "positive"]) == "positive"
    assert exact_match.first_choice("Unpositively so", ["negative", "positive"]) is None  # whole words only
