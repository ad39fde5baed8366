"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

P trainable "soft token" embeddings are put into the input sequence; the frozen model reads them like
real tokens, and only they train:

    x = [e(x_1) … e(x_T)]  →  [P_1 … P_P, e(x_1) … e(x_T)]

        causal:  [P_1 … P_P] [tok_1 … tok_T]          bert:  [CLS] [P_1 … P_P] [tok_2 … tok_T]

Positions count the soft tokens, the attention mask marks them real, and the model drops them from its
output again, so output shapes never change (model.encode / forward return T positions).

Initialization (`init`): "random" ~ U(−0.5, 0.5) (the paper's random baseline); "vocab": the embeddings of
P random token ids; "text": the embeddings of `init_text`'s tokens, repeated to length P (pass the
tokenizer: mp.apply(model, "prompt", init="text", init_text=..., tokenizer=tokenizer)).
Trainable parameters: P · d. Not mergeable, and not the identity at initialization.
"""
import torch
import torch.nn as nn

from .registry import Method, Option, register


class SoftPrompt(nn.Module):
    def __init__(self, init_embeddings: torch.Tensor, insert_at: int):
        super().__init__()
        self.embedding = nn.Parameter(init_embeddings.clone())  # (P, d)
        self.length, self.insert_at = init_embeddings.shape[0], insert_at

    def insert(self, x, attention_mask=None, token_type_ids=None):
        """x (B, T, d) -> (B, P + T, d), with the mask and token types widened to match."""
        B, i = x.shape[0], self.insert_at
        prompt = self.embedding.to(x.dtype).expand(B, -1, -1)  # (B, P, d), in the embeddings' dtype
        x = torch.cat([x[:, :i], prompt, x[:, i:]], dim=1)

        def widen(t, value):
            if t is None:
                return None
            fill = torch.full((B, self.length), value, dtype=t.dtype, device=t.device)
            return torch.cat([t[:, :i], fill, t[:, i:]], dim=1)
        return x, widen(attention_mask, 1), widen(token_type_ids, 0)

    def remove(self, hidden):  # (B, P + T, d) -> (B, T, d): drop the soft tokens' outputs
        i = self.insert_at
        return torch.cat([hidden[:, :i], hidden[:, i + self.length:]], dim=1)


def initial_embeddings(model, length: int, init: str, init_text: str | None, tokenizer) -> torch.Tensor:
    table = model.tok_emb.weight.detach()  # (V, d)
    if init == "random":
        return torch.empty(length, table.shape[1], device=table.device).uniform_(-0.5, 0.5)
    if init == "vocab":
        return table[torch.randint(0, table.shape[0], (length,), device=table.device)]
    if not init_text or tokenizer is None:
        raise ValueError("init='text' needs init_text and the model's tokenizer: mp.apply(model, 'prompt', "
                         "init='text', init_text=..., tokenizer=tokenizer)")
    ids = tokenizer.encode(init_text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"init_text {init_text!r} has no tokens")
    ids = (ids * (length // len(ids) + 1))[:length]
    return table[torch.tensor(ids, device=table.device)]


def apply_prompt(model, length: int, init: str, init_text: str | None, tokenizer=None):
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    insert_at = 0 if model.cfg.causal else 1  # encoders: keep [CLS] (<s>) first
    model.prompt = SoftPrompt(initial_embeddings(model, length, init, init_text, tokenizer), insert_at)


def prompt_parameter_count(cfg, length: int, **_) -> int:
    return length * cfg.d_model


register(Method(
    "prompt", "soft prompt embeddings prepended to the input (Lester et al. 2021)", apply_prompt,
    prompt_parameter_count,
    (Option("length", int, 20, "virtual tokens P (soft prompt length)"),
     Option("init", str, "random", "how the soft prompt starts: random, vocab (random token embeddings) "
            "or text (the embeddings of init_text's tokens)", choices=("random", "vocab", "text")),
     Option("init_text", str, None, "the text whose token embeddings start the prompt (init=text)")),
    lr=3e-2, exact_at_init=False, uses_tokenizer=True,
    examples=({}, {"length": 3, "init": "vocab"}, {"length": 5, "init": "text", "init_text": "a review"})))
