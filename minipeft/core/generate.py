"""Text generation with a causal LM: greedy or sampled, one prompt or a left-padded batch, with the KV cache.

One step of decoding turns the logits of the last position into the next token:

    z = logits / temperature                  temperature 0: the argmax (greedy), nothing is drawn
    top-k: keep the k largest z               top-p (nucleus, Holtzman et al. 2020): keep the smallest set
                                              of tokens, most likely first, whose probabilities reach p
    next ~ softmax(z) over what is kept       from a torch.Generator seeded with `seed` (repeatable), on
                                              the logits' device: torch.multinomial draws from a generator
                                              on its input's device (CUDA refuses a CPU one)

A batch of prompts of different lengths is padded on the *left*, so every row's last prompt token sits
in the last column and the rows generate in lockstep:

    row 0   ▢ ▢ The capital of     ->  next tokens appended on the right, one column per step
    row 1   Once upon a time there
    mask    0 0 1 1 1 ...           position_ids count real tokens only (0 at each row's first token),
                                    so a padded row computes what it would alone

The first forward pass fills the KV cache with the prompts' keys and values (the tokens all prompts
start with, such as a system prompt, are run once and shared); after it each step feeds one token per
row (B, 1). A row stops at the end-of-text token (`eos_id`) or once its text contains a
stop string; the batch stops when every row has, or after max_new_tokens, or once a token has been chosen
at the model's last position (the widest prompt decides, for every row). `on_token(row, id)` is called
for each new token as it is chosen (TextStreamer prints row 0 to the terminal as it grows).
"""
import sys
from dataclasses import dataclass

import torch

from .kv_cache import KVCache


@dataclass
class Sampling:
    """How the next token is chosen: temperature 0 = greedy; top_k / top_p None = no cut."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"--top-k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    """A torch.Generator on `device` seeded with `seed`, or None (torch's default generator) without a seed.
    On the CPU it draws what torch.Generator().manual_seed(seed) draws."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> the next token of each row (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / sampling.temperature  # (B, V)
    if sampling.top_k is not None and sampling.top_k < z.shape[-1]:
        kth = z.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        z = z.masked_fill(z < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_z, order = z.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_z.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= sampling.top_p  # the set already reached p without this token
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(z.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T): the prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def shared_cache(prefix: KVCache, batch_size: int) -> KVCache:
    """A cache for batch_size rows that all continue the one-row `prefix` (expanded, not copied)."""
    cache = KVCache(len(prefix.layers))
    if prefix.length:
        cache.layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                        for k, v in prefix.layers]
    return cache


def _start(model, prompts: list[list[int]], pad_id: int, use_cache: bool, device, adapter_names):
    """(cache, input_ids, attention_mask, position_ids) to begin decoding. Tokens every prompt begins
    with (a system prompt, an instruction) are run once, for one row, and their keys and values shared
    by all rows; the rest is left-padded after them: [shared][pad pad][own tokens]. Without padding the
    model's own positions are right, and position_ids is None. Not with a sliding window and rows of
    different lengths: the padding would take slots of the window that the shared tokens fill alone; nor
    with adapter_names, where each row's keys and values are its own adapter's."""
    first = prompts[0]
    shared = min(len(p) for p in prompts) - 1  # every row keeps at least one token of its own
    shared = next((i for i in range(shared) if any(p[i] != first[i] for p in prompts)), shared)
    windowed = any(block.window for block in model.blocks) and len({len(p) for p in prompts}) > 1
    if not use_cache or len(prompts) == 1 or shared == 0 or windowed or adapter_names is not None:
        ids, mask, positions = (t.to(device) for t in left_pad(prompts, pad_id))
        if bool(mask.all()):  # no padding: the positions are the model's own 0, 1, 2, ...
            positions = None
        return (KVCache(model.cfg.n_layer) if use_cache else None), ids, mask, positions
    prefix = KVCache(model.cfg.n_layer)
    model(torch.tensor([first[:shared]], device=device), cache=prefix)  # (1, Hkv, shared, hd) per layer
    ids, mask, positions = (t.to(device) for t in left_pad([p[shared:] for p in prompts], pad_id))
    positions = None if bool(mask.all()) else positions + shared  # (B, T), after the shared tokens
    mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=1)  # (B, shared + T)
    return shared_cache(prefix, len(prompts)), ids, mask, positions


def _check_model(model, prompts, max_new_tokens: int):
    if not model.cfg.causal or model.cfg.n_classes:
        raise ValueError("generation needs a causal LM (no classifier head)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    longest, limit = max(len(p) for p in prompts), model.cfg.max_seq_len - model.virtual_tokens
    if longest > limit:
        raise ValueError(f"a prompt of {longest} tokens is longer than the {limit} positions the model reads "
                         "(its method's virtual tokens taken); shorten it")


def _room(model, width: int) -> int:
    """How many tokens prompts of `width` columns can get: the last one is chosen at the model's last
    position and never read back."""
    return model.cfg.max_seq_len - model.virtual_tokens - width + 1


def _stop_strings(stop) -> tuple[str, ...]:
    """One stop string or several, as transformers' stop_strings takes them (a str is one, not its characters)."""
    return (stop,) if isinstance(stop, str) else tuple(stop)


class _Stops:
    """Which rows are done: an end-of-text token, or a stop string in the decoded new text."""

    def __init__(self, n: int, eos_id, stop, tokenizer):
        if isinstance(eos_id, (list, tuple, set)):
            raise ValueError(f"eos_id is one token id, not {eos_id}: pass the one that ends the answers")
        self.eos_id, self.stop, self.tokenizer = eos_id, _stop_strings(stop), tokenizer
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need the tokenizer (to read the text)")
        self.done = [False] * n

    def update(self, outputs: list[list[int]], new: list[int]) -> list[int]:
        """Append each running row's new token to its output; returns the rows that got one."""
        appended = []
        for row, token in enumerate(new):
            if self.done[row]:
                continue
            if token == self.eos_id:
                self.done[row] = True
                continue
            outputs[row].append(token)
            appended.append(row)
            if self.stop and any(s in self.tokenizer.decode(outputs[row][-64:]) for s in self.stop):
                self.done[row] = True
        return appended


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
             eos_id: int | None = None, stop=(), tokenizer=None, on_token=None, pad_id: int = 0,
             use_cache: bool = True, adapter_names: list[str] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (without the end-of-text token), generated together in one
    left-padded batch; see the module docstring. Without the cache every step reruns the whole
    sequence (slow; a check that the cache changes nothing). adapter_names: each row's adapter, with
    adapters loaded side by side (extras/multi.py)."""
    _check_model(model, prompts, max_new_tokens)
    sampling = sampling or Sampling()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # where the ids, the logits and the generator live
    generator = seeded_generator(sampling.seed, device)
    cache, ids, mask, positions = _start(model, prompts, pad_id, use_cache, device, adapter_names)
    outputs, stops = [[] for _ in prompts], _Stops(len(prompts), eos_id, stop, tokenizer)
    step_ids, step_positions = ids, positions
    for _ in range(min(max_new_tokens, _room(model, mask.shape[1]))):
        logits = model(step_ids, attention_mask=mask, cache=cache, position_ids=step_positions,
                       adapter_names=adapter_names)[:, -1]  # (B, V)
        new = next_tokens(logits, sampling, generator)  # (B,)
        for row in stops.update(outputs, new.tolist()):
            if on_token is not None:
                on_token(row, outputs[row][-1])
        if all(stops.done):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        ids = torch.cat([ids, new[:, None]], dim=1)
        if positions is not None:
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        step_ids = new[:, None] if use_cache else ids
        step_positions = positions if positions is None or not use_cache else positions[:, -1:]
    model.train(was_training)
    return outputs


def complete(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop=(), **options) -> list[str]:
    """The decoded answers of `generate`, each cut before the first stop string it contains."""
    outputs = generate(model, prompts, max_new_tokens, stop=stop, tokenizer=tokenizer, **options)
    return [cut_at_stop(tokenizer.decode(tokens), stop) for tokens in outputs]


def cut_at_stop(text: str, stop) -> str:
    """The text before the first of the stop strings it contains (all of it when it contains none)."""
    return min((text[:text.index(s)] for s in _stop_strings(stop) if s in text), key=len, default=text)


def greedy(model, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
           eos_id: int | None = None) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (Transformer.generate): idx (B, T) -> (B, T + new),
    a row's end-of-text token included and repeated after it while other rows go on."""
    outputs = generate(model, idx.tolist(), max_new_tokens, eos_id=eos_id, use_cache=use_cache)
    limit = min(max_new_tokens, _room(model, idx.shape[1]))
    ended = [o + [eos_id] if eos_id is not None and len(o) < limit else o for o in outputs]  # stopped at eos
    width = max(len(o) for o in ended)
    tail = [o + [eos_id] * (width - len(o)) for o in ended]  # only rows that ended are short
    return torch.cat([idx, torch.tensor(tail, dtype=torch.long, device=idx.device).view(len(tail), width)], dim=1)


class TextStreamer:
    """on_token for one row: prints the text as it grows (holding back a half-decoded character until
    the rest comes, or `end()` is called: then the row's whole decoded text has been printed)."""

    def __init__(self, tokenizer, row: int = 0, file=None):
        self.tokenizer, self.row, self.file = tokenizer, row, file or sys.stdout
        self.tokens, self.shown = [], 0

    def __call__(self, row: int, token: int):
        if row != self.row:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # a UTF-8 character split across tokens: wait for the rest
            self._show(text)

    def end(self):
        """Print what was held back: the generation stopped inside a character (decoded as \ufffd)."""
        self._show(self.tokenizer.decode(self.tokens))

    def _show(self, text: str):
        print(text[self.shown:], end="", flush=True, file=self.file)
        self.shown = len(text)
