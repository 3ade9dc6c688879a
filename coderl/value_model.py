"""A policy with a value head, as PPO trains it: the adapter-wrapped causal LM and a linear head on
its last hidden state, one module so that checkpoints save both, and the frozen reference a KL
penalty compares with. The algorithm (GAE, losses) stays in train_ppo_lora.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from coderl.adapters import save_adapter
from coderl.errors import UserError
from coderl.logprobs import PackedBatch, completion_logprobs, pack_rollouts, reference_logprobs

VALUE_HEAD_FILE = "value_head.pt"


class ValueHead(torch.nn.Module):
    """A linear map from the last hidden state to a scalar, kept in fp32 whatever the policy's
    dtype. Zero-initialised, so the first advantages are the (KL-shaped) returns themselves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValue(torch.nn.Module):
    """The adapter-wrapped causal LM and (optionally) its value head."""

    def __init__(self, policy, value_head: ValueHead | None, **logprob_options: bool):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        # How log-probs are computed: share_prompts, padding_free (coderl.logprobs).
        self.logprob_options = logprob_options
        # A KL reference other than the base: the adapter's starting weights (None: the base).
        self.reference_weights: list[torch.Tensor] | None = None

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def keep_reference_weights(self, weights: list[torch.Tensor] | None = None) -> None:
        """Freeze a copy of the adapter's weights (or of ``weights``) as the KL reference."""
        source = weights if weights is not None else self.adapter_parameters()
        self.reference_weights = [w.detach().clone() for w in source]

    def forward(
        self, batch: PackedBatch, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of the completion tokens under logits / ``temperature``, the entropies of
        their next-token distributions (with gradient: PPO's entropy bonus) and the values of the
        prefixes before them, each (B, C); log-probs and entropies are 0 outside the completion
        mask, values are given everywhere."""
        out = completion_logprobs(
            self.policy,
            batch,
            temperature,
            with_entropy=True,
            entropy_grad=True,
            with_hidden=self.value_head is not None,
            **self.logprob_options,
        )
        values = self.value_head(out.hidden) if self.value_head is not None else None
        return out.logprobs, out.entropy, values

    @torch.no_grad()
    def reference_logprobs(self, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs under the reference: the same network with the adapter switched off (base),
        or with the adapter's starting weights swapped in for the pass (init)."""
        if self.reference_weights is None:
            return reference_logprobs(self.policy, batch, temperature, **self.logprob_options)
        with swapped_weights(self.adapter_parameters(), self.reference_weights):
            options = self.logprob_options
            return completion_logprobs(self.policy, batch, temperature, **options).logprobs

    def parameter_groups(self, lr: float, value_lr: float = 0.0) -> list[dict]:
        """The adapter's trainable parameters and, as a second group (learning rate
        ``value_lr``, or ``lr`` when 0), the value head's: each is clipped apart."""
        groups = [{"params": self.adapter_parameters(), "name": "adapter"}]
        if self.value_head is not None:
            head = list(self.value_head.parameters())
            groups.append({"params": head, "lr": value_lr or lr, "name": "value_head"})
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of the adapter and of the value head (0 without one)."""
        head = self.value_head.parameters() if self.value_head is not None else []
        return {
            "trainable_params_adapter": sum(p.numel() for p in self.adapter_parameters()),
            "trainable_params_value_head": sum(p.numel() for p in head),
        }

    def save_pretrained(self, path: str) -> None:
        save_adapter(self.policy, path)  # with base_model.json, as the other trainers write
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), Path(path) / VALUE_HEAD_FILE)


@contextlib.contextmanager
def swapped_weights(params: list[torch.nn.Parameter], weights: list[torch.Tensor]):
    """Temporarily give ``params`` the values ``weights`` (no autograd record; restored after)."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)


def hidden_size_of(policy) -> int:
    config = policy.config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise UserError("cannot find the model's hidden size for the value head")
    return int(size)


def value_head_source(init_adapter: str, resume_from: Path | None) -> Path | None:
    """Where a saved value head comes from: the checkpoint resumed (which must hold one), or an
    ``--init_adapter`` folder that holds one (a fresh head otherwise)."""
    if resume_from is not None:
        if not (resume_from / VALUE_HEAD_FILE).is_file():
            raise UserError(
                f"{resume_from} has no {VALUE_HEAD_FILE}: it was not written with a value head"
            )
        return resume_from
    return Path(init_adapter) if init_adapter else None


def build_value_head(policy, source: Path | None, device) -> ValueHead:
    """A fresh value head, or the one saved in ``source`` (a checkpoint or an adapter folder)."""
    head = ValueHead(hidden_size_of(policy))
    if source is not None and (source / VALUE_HEAD_FILE).is_file():
        head.load_state_dict(torch.load(source / VALUE_HEAD_FILE, map_location="cpu"))
    return head.to(device)


def usable(rollout) -> bool:
    """Whether a sample can be learned from: not an infra_error, and at least one token."""
    return bool(rollout.mask) and len(rollout.completion_ids) > 0


@dataclass
class RolloutBatch:
    """A rollout batch in tensors with what is fixed before the first update: the policy's
    log-probs and values and the reference's log-probs. Per-token tensors are (B, C), column j
    for completion token j; ``advantages`` and ``returns`` are the algorithm's to fill in."""

    rows: PackedBatch
    mask: torch.Tensor  # 1 on the completion tokens of usable samples
    sample_mask: torch.Tensor  # B: 1 for usable samples
    scores: torch.Tensor  # B task rewards
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.rows.num_rows


@torch.no_grad()
def rollout_batch(
    model: PolicyWithValue, rollouts, pad_id: int, temperature: float, chunk: int, device
) -> RolloutBatch:
    """Pack ``rollouts`` and run the policy (in its current mode) and the reference over them,
    ``chunk`` rows at a time."""
    rows = pack_rollouts(rollouts, pad_id, device)
    sample_mask = torch.tensor([usable(r) for r in rollouts], dtype=torch.float32, device=device)
    scores = torch.tensor([r.reward for r in rollouts], dtype=torch.float32, device=device)
    logprobs, values, ref = [], [], []
    for start in range(0, rows.num_rows, chunk):
        part = rows.rows(range(start, min(start + chunk, rows.num_rows)))
        lp, _, v = model(part, temperature)
        logprobs.append(lp)
        values.append(v)
        ref.append(model.reference_logprobs(part, temperature))
    return RolloutBatch(
        rows,
        rows.completion_mask * sample_mask[:, None],
        sample_mask,
        scores,
        torch.cat(logprobs),
        torch.cat(ref),
        torch.cat(values) if values[0] is not None else None,
    )
