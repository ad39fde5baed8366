"""Tests for minipeft/core/generate.py: batched left-padded generation equals one-by-one, the cache changes
nothing, sampling (temperature, top-k, top-p, seed), end-of-text and stop strings, streaming."""
import io

import pytest
import torch

import minipeft as mp
from minipeft.core.generate import Sampling, TextStreamer, complete, generate, greedy, next_tokens, seeded_generator
from minipeft.formats.pretrained import byte_tokenizer
from tests.conftest import tiny_model

PROMPTS = [[5, 17, 33, 2, 8, 40, 41], [9, 4], [5, 17, 60, 61, 3], [70]]


def one_by_one(model, prompts, n, **options):
    return [generate(model, [p], n, **options)[0] for p in prompts]


def sharp(model):
    """The model with its query and key weights 20 times larger. At init attention is nearly uniform, so a
    wrong position or a key that should be hidden hardly changes a greedy token; sharpened, it does."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.q.weight", "attn.k.weight")):
                p.mul_(20)
    return model


def forward_shapes(model) -> list:
    """The (B, T) of every token batch the model embeds from now on (a list that grows)."""
    shapes = []
    model.tok_emb.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_batched_left_padded_equals_one_by_one(flavor):
    model = sharp(tiny_model(flavor)).eval()
    assert generate(model, PROMPTS, 8) == one_by_one(model, PROMPTS, 8)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_first_step_logits_do_not_depend_on_the_padding(flavor):
    """What the batch computes for a short row equals what the row computes alone (positions restart)."""
    from minipeft.core.generate import left_pad
    model = tiny_model(flavor).eval()
    ids, mask, positions = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions)[:, -1]  # (B, V)
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt]))[0, -1]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("own", [
    [[70, 71, 72], [80, 81, 82, 83], [90, 91, 92]],  # the rows part after the common start
    [[70], [70, 71, 72], [70, 80]],  # the shortest prompt is all common start: it keeps its last token
    [p + [3] for p in PROMPTS],  # rows of other lengths: left padding after the common start
])
def test_shared_prompt_start_is_computed_once_with_the_same_result(own):
    model = sharp(tiny_model("llama")).eval()
    prompts = [[11, 12, 13, 14] + p for p in own]  # a common "system prompt" of 4 tokens
    shapes = forward_shapes(model)
    batched = generate(model, prompts, 6)
    width = max(len(p) for p in own)
    assert shapes == [(1, 4), (len(prompts), width)] + [(len(prompts), 1)] * 5  # the start once, then one token a step
    assert batched == one_by_one(model, prompts, 6)
    assert batched == generate(model, prompts, 6, use_cache=False)
    shapes.clear()
    generate(model, prompts[:1], 2)
    assert shapes == [(1, len(prompts[0])), (1, 1)]  # one prompt: nothing to share


@pytest.mark.parametrize("family", ["mistral", "phi3", "gemma2"])
def test_shared_prompt_start_with_a_sliding_window(family):
    """Padding after a shared start would sit inside a padded row's window, in the slots the shared tokens
    fill when the row runs alone (row 0 drew other tokens from its first one); rows of different lengths
    are left-padded whole instead. Rows of one length still share the start."""
    model = sharp(tiny_model(family)).eval()
    start = [11, 12, 13, 14]
    prompts = [start + [50], start + [51, 52, 53, 54, 55, 56], start + [60, 61, 62]]
    assert generate(model, prompts, 8) == one_by_one(model, prompts, 8)
    shapes = forward_shapes(model)
    same_length = [start + [50, 51], start + [60, 61]]
    assert generate(model, same_length, 3) == one_by_one(model, same_length, 3)
    assert shapes[:3] == [(1, 4), (2, 2), (2, 1)]


@pytest.mark.parametrize("method, options", [("prompt", {"length": 3}), ("prefix", {"length": 4}),
                                             ("lora", {})])
def test_batched_generation_through_a_method(method, options):
    model = tiny_model("llama")
    mp.apply(model, method, **options)
    for p in model.parameters():  # a method that starts at the identity would not show a position error
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    assert generate(model, PROMPTS, 6) == one_by_one(model, PROMPTS, 6)


def test_cache_changes_nothing_and_greedy_keeps_the_prompt():
    model = sharp(tiny_model("gpt2")).eval()
    idx = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    shapes = forward_shapes(model)
    out = greedy(model, idx, 7)
    assert shapes == [(2, 5)] + [(2, 1)] * 6  # the cache is on by default: one new token a step
    assert out.shape == (2, 12) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, greedy(model, idx, 7, use_cache=False))
    assert out[:, 5:].tolist() == generate(model, idx.tolist(), 7)


def test_end_of_text_stops_a_row_and_is_not_returned():
    model = tiny_model("llama").eval()
    free = generate(model, PROMPTS, 8)
    eos = free[0][2]  # the third token row 0 would generate
    stopped = generate(model, PROMPTS, 8, eos_id=eos)
    assert stopped[0] == free[0][:2]
    for row in range(1, len(PROMPTS)):  # other rows run on, each up to its own first eos
        expected = free[row][:free[row].index(eos)] if eos in free[row] else free[row]
        assert stopped[row] == expected


def test_stop_strings_cut_the_text():
    model, tokenizer = mp.from_pretrained("tiny-gpt2")
    prompt = [tokenizer.encode("Hello").ids]
    sampling = Sampling(temperature=1.0, seed=0)  # varied text (greedy repeats one character)
    text = complete(model, tokenizer, prompt, 12, sampling=sampling)[0]
    stop = next(c for i, c in enumerate(text) if i >= 2 and c.isascii() and c.isprintable() and c not in text[:i])
    cut = complete(model, tokenizer, prompt, 12, stop=[stop], sampling=sampling)[0]
    assert cut == text.split(stop)[0]
    tokens = generate(model, prompt, 12, stop=[stop], tokenizer=tokenizer, sampling=sampling)[0]
    assert stop in tokenizer.decode(tokens) and stop not in tokenizer.decode(tokens[:-1])  # it stopped there
    # a str is one stop string, as transformers' stop_strings reads it, not a set of characters
    assert complete(model, tokenizer, prompt, 12, stop=stop, sampling=sampling)[0] == cut
    assert (absent := stop + "\x00") not in text
    assert complete(model, tokenizer, prompt, 12, stop=absent, sampling=sampling)[0] == text
    # "" is in every text: like transformers, generation stops after the first token, and the answer is empty
    assert len(generate(model, prompt, 12, stop=[""], tokenizer=tokenizer, sampling=sampling)[0]) == 1
    assert complete(model, tokenizer, prompt, 12, stop=["", stop], sampling=sampling) == [""]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, 3, stop=["x"])


def test_generation_ends_at_the_model_length():
    """The last token is chosen at the model's last position (it is never read back), so a sequence ends one
    token past the model's length; greedy adds no end-of-text token to a row cut there."""
    model = tiny_model("llama").eval()  # 64 positions; PROMPTS left-padded to 7 tokens
    idx = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    assert [len(out) for out in generate(model, PROMPTS, 100)] == [64 - 7 + 1] * len(PROMPTS)
    assert len(generate(model, [list(range(1, 65))], 3)[0]) == 1  # a prompt as long as the model: one token
    unused = min(set(range(model.cfg.vocab_size)) - set(greedy(model, idx, 100).flatten().tolist()))
    assert greedy(model, idx, 100, eos_id=unused).shape == (2, 65)
    mp.apply(model, "prefix")  # its virtual tokens take positions too
    room = 64 - model.virtual_tokens - 7 + 1
    assert [len(out) for out in generate(model, PROMPTS, 100)] == [room] * len(PROMPTS)
    unused = min(set(range(model.cfg.vocab_size)) - set(greedy(model, idx, 100).flatten().tolist()))
    assert greedy(model, idx, 100, eos_id=unused).shape == (2, 65 - model.virtual_tokens)
    limit = 64 - model.virtual_tokens
    with pytest.raises(ValueError, match=f"a prompt of 64 tokens is longer than the {limit} positions"):
        generate(model, [list(range(1, 65))], 3)


def test_greedy_tokens_equal_transformers_up_to_the_model_length(tmp_path):
    """transformers' generate on the same GPT-2 weights (learned positions: both stop at the same place):
    a left-padded batch of prompts of different lengths, and a prompt one token short of the model's
    length, which gets two new tokens (minipeft stopped one short: one token, and none at 64)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=97, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.weight.mul_(20)  # sharp attention (see `sharp`); c_attn holds q, k and v
    hf.save_pretrained(tmp_path)
    model = mp.from_pretrained(str(tmp_path))[0].eval()
    for prompts, n in [(PROMPTS, 10), ([list(range(3, 66))], 2), ([list(range(3, 67))], 1)]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, width:].tolist()
        assert generate(model, prompts, n) == theirs


def test_greedy_repeats_end_of_text_after_a_row_ends():
    model = sharp(tiny_model("llama")).eval()
    idx = torch.tensor([[5, 17, 33, 2], [9, 4, 60, 61]])
    free = greedy(model, idx, 8)[:, 4:].tolist()
    eos = free[0][2]  # row 0 ends at its third new token (or sooner)
    ended = [row[:row.index(eos) + 1] if eos in row else row for row in free]  # up to their end-of-text token
    width = max(len(row) for row in ended)
    expected = [row + [eos] * (width - len(row)) for row in ended]
    assert greedy(model, idx, 8, eos_id=eos)[:, 4:].tolist() == expected
    assert greedy(model, idx[:1], 8, eos_id=eos)[0, 4:].tolist() == ended[0]  # alone: its end-of-text token ends it


def test_generation_runs_in_eval_mode_and_leaves_the_mode_as_it_was():
    model = tiny_model("llama", dropout=0.5)
    model.train()
    out = generate(model, PROMPTS, 6)
    assert model.training and out == generate(model.eval(), PROMPTS, 6)  # no dropout while generating


def test_next_token_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).log_softmax(-1)  # probabilities ≈ .61 .22 .14 .03
    assert next_tokens(logits, Sampling()).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = [next_tokens(logits, Sampling(temperature=1.0, top_k=2), g).item() for _ in range(200)]
    assert set(draws) == {0, 1}
    draws = [next_tokens(logits, Sampling(temperature=1.0, top_p=0.7), g).item() for _ in range(200)]
    assert set(draws) == {0, 1}  # .61 < .7, so the second token is needed; .83 reaches it
    draws = [next_tokens(logits, Sampling(temperature=1.0, top_p=0.5), g).item() for _ in range(50)]
    assert set(draws) == {0}
    # top-p exactly the first token's probability, summed as next_tokens sums it: that token alone reaches it
    three = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = three.sort(dim=-1, descending=True).values.softmax(-1)
    first = (probs.cumsum(-1) - probs)[0, 1].item()
    assert {next_tokens(three, Sampling(temperature=1.0, top_p=first), g).item() for _ in range(50)} == {0}
    hot = [next_tokens(logits, Sampling(temperature=100.0), g).item() for _ in range(400)]
    assert set(hot) == {0, 1, 2, 3}  # a high temperature flattens the distribution


def test_sampling_is_repeatable_with_a_seed():
    model = tiny_model("gpt2").eval()
    sampling = Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=7)
    first = generate(model, PROMPTS, 10, sampling=sampling)
    assert first == generate(model, PROMPTS, 10, sampling=sampling)
    assert first != generate(model, PROMPTS, 10, sampling=Sampling(temperature=1.5, seed=8))
    assert generate(model, PROMPTS, 10, sampling=Sampling(temperature=1.0, top_k=1, seed=3)) == \
        generate(model, PROMPTS, 10)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_generator_lives_on_the_logits_device(device):
    """torch.multinomial takes a generator on its input's device only (CUDA refuses a CPU one); on the CPU
    the seeded generator draws what a plain torch.Generator seeded alike draws."""
    probs = torch.rand(4, 50, generator=torch.Generator().manual_seed(0)).to(device)
    generator = seeded_generator(7, probs.device)
    assert generator.device == probs.device
    draws = torch.multinomial(probs, 8, replacement=True, generator=generator)
    assert torch.equal(draws, torch.multinomial(probs, 8, replacement=True,
                                                generator=seeded_generator(7, probs.device)))
    if device == "cpu":
        assert torch.equal(draws, torch.multinomial(probs, 8, replacement=True,
                                                    generator=torch.Generator().manual_seed(7)))
    assert seeded_generator(None, probs.device) is None  # no seed: torch's default generator


def test_bad_sampling_options():
    for options, message in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top-k"),
                             ({"top_p": 1.5}, "top-p"), ({"temperature": float("nan")}, "temperature"),
                             ({"top_k": 2.5}, "top-k must be an integer")]:  # both failed later, in torch
        with pytest.raises(ValueError, match=message):
            Sampling(**options)
    with pytest.raises(ValueError, match="classifier"):
        generate(tiny_model("gpt2", n_classes=2), PROMPTS, 2)
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):  # it returned no tokens
        generate(model, PROMPTS, -1)
    with pytest.raises(ValueError, match="eos_id is one token id"):  # a list was never matched: no row stopped
        generate(model, PROMPTS, 2, eos_id=[2, 3])
    assert generate(model, PROMPTS, 0) == [[]] * len(PROMPTS)


def test_streamer_prints_what_is_returned(capsys):
    model, tokenizer = mp.from_pretrained("tiny-llama")
    streamer = TextStreamer(tokenizer)
    out = generate(model, [tokenizer.encode("Once").ids], 10, on_token=streamer)[0]
    assert capsys.readouterr().out == tokenizer.decode(out)
    assert streamer.tokens == out


def test_streamer_prints_to_the_file_it_is_given(capsys):
    streamer = TextStreamer(byte_tokenizer(), file=(file := io.StringIO()))
    for byte in b"ok":
        streamer(0, byte)
    assert file.getvalue() == "ok" and capsys.readouterr().out == ""


def test_streamer_waits_for_a_whole_character(capsys):
    tokenizer = byte_tokenizer()
    streamer = TextStreamer(tokenizer)
    for byte in "é!".encode():  # é is two bytes, two tokens of the byte tokenizer
        streamer(0, byte)
    streamer(1, 65)  # another row: ignored
    assert capsys.readouterr().out == "é!"


def test_streamer_end_prints_a_character_cut_by_the_last_token(capsys):
    tokenizer = byte_tokenizer()
    streamer = TextStreamer(tokenizer)
    for byte in "aé".encode()[:2]:  # generation stopped after the first of é's two bytes
        streamer(0, byte)
    assert (printed := capsys.readouterr().out) == "a"
    streamer.end()
    assert printed + capsys.readouterr().out == tokenizer.decode(streamer.tokens) == "a\ufffd"  # the answer's text
    streamer.end()
    assert capsys.readouterr().out == ""
