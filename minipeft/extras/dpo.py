"""Preference tuning with an adapter: DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and IPO
(Azar et al. 2023, https://arxiv.org/abs/2310.12036), the reference model being the model itself with its
adapter switched off (disable.py): no second copy of the weights.

For a prompt x with a chosen answer y_c and a rejected one y_r (formats/preference.py):

    log π(y|x) = Σ_t log π(y_t | x, y_<t)               summed over the answer's tokens (labels ≠ −100)
    r(y)       = β · (log π(y|x) − log π_ref(y|x))       the implicit reward: how much likelier the policy π
                                                         makes y than the reference π_ref does (β: --beta)
    z          = r(y_c) − r(y_r)                         the reward margin

    sigmoid (DPO, eq. 7):   ℓ = −log σ(z)                the Bradley-Terry likelihood of the preference
    ipo     (IPO, eq. 17):  ℓ = (h − 1/(2β))²            h = (log π(y_c) − log π_ref(y_c)) / |y_c|
                                                             − (log π(y_r) − log π_ref(y_r)) / |y_r|

DPO keeps pushing z up, however sure it already is; IPO regresses h onto the fixed target 1/(2β), so it
stops there. h uses each answer's log-ratio per token (|y| = its labelled tokens), as trl does (the
normalization the IPO authors confirmed to trl). β sets how far the policy may move from the reference.

                      the policy, with its adapter:  model(x ⊕ y)  ─► log π(y_c), log π(y_r) ─┐
                                                                                              ├─► z ─► ℓ
    no_grad, eval mode, with adapters_disabled(model):  model(x ⊕ y)  ─► log π_ref(y_c), … ───┘

The reference pass runs on the same weights with every adapter switched off, without gradients and with
dropout off (the reference is a fixed function), or not at all once `precompute_reference` has stored each
pair's reference log-probabilities with the examples (train.py --precompute-reference): a step then costs
one forward and backward instead of two forwards and a backward. From an SFT adapter (train.py
--init-adapter) the reference is still the base model, so the SFT adapter's own preference counts as reward
from the first step (trl instead keeps a frozen copy of the starting adapter as its reference).

A batch of B pairs is 2B rows, the chosen answers first, so a pair's two answers share a forward pass. The
loss of a step is the mean over the P pairs of the global batch, L = 1/P · Σ_p ℓ_p, however they are split
into micro-batches and processes (core/loop.py, with DPOLoss as its Objective: terms = P). Metrics (means
over the pairs): loss, reward margin z, reward accuracy (z > 0; a tie counts as wrong, as trl counts it),
chosen and rejected rewards; evaluation adds the policy's own preference, how often log π(y_c) > log π(y_r).
"""
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minipeft.core.data import IGNORE_INDEX
from minipeft.extras.disable import adapters_disabled

VARIANTS = ("sigmoid", "ipo")
METRICS = ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "policy_accuracy")


class Pairs(NamedTuple):
    """Per pair (B,): the loss, the chosen and rejected rewards, the policy's log-probabilities of both."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    def sums(self) -> torch.Tensor:
        """(7,) fp64: the sums over the pairs of METRICS, then the number of pairs (added across batches)."""
        margin = self.chosen_rewards - self.rejected_rewards
        return torch.stack([self.losses.detach().sum(), margin.sum(), (margin > 0).sum(), self.chosen_rewards.sum(),
                            self.rejected_rewards.sum(), (self.chosen_logps > self.rejected_logps).sum(),
                            torch.tensor(len(self.losses), device=self.losses.device)]).double()


@dataclass(frozen=True)
class DPOLoss:
    """ℓ per pair from the summed answer log-probabilities (module docstring): β and the variant."""
    beta: float = 0.1
    variant: str = "sigmoid"

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --dpo-loss {self.variant!r}; choose one of {', '.join(VARIANTS)}")

    def __call__(self, policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor) -> Pairs:
        """policy, reference (2B,) log π(y|x) of the answers, chosen first; lengths (2B,) their tokens."""
        chosen, rejected = (policy - reference.to(policy.dtype)).chunk(2)  # (B,) each: log π − log π_ref
        if self.variant == "sigmoid":
            losses = -F.logsigmoid(self.beta * (chosen - rejected))
        else:
            chosen_tokens, rejected_tokens = lengths.chunk(2)
            losses = (chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * self.beta)) ** 2
        chosen_logps, rejected_logps = policy.detach().chunk(2)
        return Pairs(losses, self.beta * chosen.detach(), self.beta * rejected.detach(), chosen_logps, rejected_logps)

    # what core/loop.py asks of an Objective
    def losses(self, net, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' summed loss (the reference pass, then the policy's) and their metric sums."""
        pairs = pair_losses(net, batch, self)
        return pairs.losses.sum(), pairs.sums()

    def terms(self, batch: dict) -> int:
        """The pairs of the batch: a step's loss is the mean over its pairs."""
        return int(batch["examples"])

    def step_metrics(self, sums: torch.Tensor) -> dict:
        """A step's metrics from the sums over its global batch, without the policy's own preference (kept
        for evaluation)."""
        metrics = summarize(sums)
        metrics.pop("policy_accuracy")
        return metrics

    @torch.no_grad()
    def evaluate(self, model, dataset, batch_size: int, processes) -> dict:
        """METRICS over a split of pairs (each process scores its shard and `processes` adds up the sums:
        core/loop.py's OneProcess; every process must call)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)
        for batch in dataset.batches(batch_size, rank=processes.rank, world_size=processes.size, sort_by_length=True):
            if len(batch["input_ids"]):  # this process's shard of the last batch may be empty
                sums += pair_losses(model, {k: v.to(device) for k, v in batch.items()}, self).sums()
        model.train(was_training)
        return summarize(processes.total(sums))


def answer_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) log π(y|x) of each row: minus the summed cross-entropy of its labelled tokens (fp32)."""
    per_token = model(batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=batch["labels"],
                      reduction="none")  # (2B, T), 0 where unlabelled
    return -per_token.sum(1)


@torch.no_grad()
def reference_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) log π_ref(y|x): the batch's precomputed ones, else the model's with its adapters switched off, in
    eval mode (under data parallelism, the wrapped model: no gradient to synchronize)."""
    if "reference" in batch:
        return batch["reference"]
    model = getattr(model, "module", model)  # the model inside a data-parallel wrapper
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return answer_logps(model, batch)
    finally:
        model.train(was_training)


def pair_losses(model, batch: dict, loss: DPOLoss) -> Pairs:
    """Forward a batch of pairs: the reference first (its activations are freed before the policy's)."""
    reference = reference_logps(model, batch)
    lengths = (batch["labels"] != IGNORE_INDEX).sum(1)  # (2B,)
    return loss(answer_logps(model, batch), reference, lengths)


def summarize(sums: torch.Tensor) -> dict:
    """The means of METRICS from Pairs.sums added over batches (and processes)."""
    *totals, count = sums.tolist()
    return {name: total / max(count, 1) for name, total in zip(METRICS, totals)}


@torch.no_grad()
def precompute_reference(model, dataset, batch_size: int = 64, progress=iter):
    """The split with each pair's reference log-probabilities stored (PreferenceDataset.reference, (N, 2)),
    computed once with the adapters switched off, in batches of similar length. `progress` wraps the
    batches' start offsets (a progress bar, for instance)."""
    device = next(model.parameters()).device
    values = torch.empty(len(dataset), 2)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    for start in progress(range(0, len(order), batch_size)):
        indices = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in dataset.collate(indices).items()}
        values[indices] = reference_logps(model, batch).float().cpu().view(2, -1).T  # (B, 2)
    return replace(dataset, reference=values)
