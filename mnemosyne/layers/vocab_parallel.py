"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded up to a multiple of tp and split into contiguous ranges::

    padded vocab:  [ rank 0 ......... | rank 1 ......... | ... | rank tp-1 ....|pad ]
                     0 .. V_p/tp        V_p/tp .. 2V_p/tp                        V .. V_p

Rank t stores rows `[t * V_p / tp, (t + 1) * V_p / tp)`; rows past the real vocab
size V are zero padding. The embedding looks up the ids it owns (zero rows for the
others) and sums over TP; the head computes logits for its range, gathers them
over TP and trims the padding. With tp == 1 both are exactly the unsharded ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnemosyne.parallel.comm import all_gather, all_reduce
from mnemosyne.parallel.groups import GroupHandle


class VocabShard:
    """This rank's range of a vocabulary of `vocab_size` ids padded to a multiple of tp."""

    def __init__(self, vocab_size: int, tp_group: GroupHandle) -> None:
        tp = tp_group.size
        self.vocab_size = vocab_size
        self.padded_vocab_size = -(-vocab_size // tp) * tp
        self.num_rows = self.padded_vocab_size // tp  # rows stored per rank, padding included
        self.start = tp_group.rank_in_group * self.num_rows
        self.end = min(self.start + self.num_rows, vocab_size)  # real ids: [start, end)

    @property
    def num_real_rows(self) -> int:
        return max(self.end - self.start, 0)

    def load_rows(self, target: torch.Tensor, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of the full [vocab_size, hidden] checkpoint tensor; zero the padding."""
        if tensor.shape != (self.vocab_size, target.shape[1]):
            want = (self.vocab_size, target.shape[1])
            raise ValueError(f"vocab tensor expects shape {want}, checkpoint has {tuple(tensor.shape)}")
        n = self.num_real_rows
        target[:n].copy_(tensor.narrow(0, self.start, n))
        target[n:].zero_()


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp_group: GroupHandle | None = None
    ) -> None:
        super().__init__()
        self.tp_group = tp_group or GroupHandle.trivial()
        self.shard = VocabShard(vocab_size, self.tp_group)
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(
            torch.empty(self.shard.num_rows, hidden_size, dtype=dtype), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] (any shape) -> [num_tokens, hidden_size]
        if self.tp_group.size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.shard.start) & (input_ids < self.shard.end)  # [num_tokens]
        local_ids = torch.where(owned, input_ids - self.shard.start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill_(~owned.unsqueeze(-1), 0)
        return all_reduce(out, self.tp_group)

    def load_weight(self, tensor: torch.Tensor) -> None:
        """`tensor`: the full checkpoint embedding [vocab_size, hidden_size]."""
        self.shard.load_rows(self.weight.data, tensor)


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocab range, gathered over TP into the full vocabulary.

    `tied_to`: share that embedding's weight shard (same vocab range, same rows).
    Otherwise the head owns its shard, loaded with `load_weight` from `lm_head.weight`
    (or, for a tied model whose embedding lives on another pipeline stage, from
    `model.embed_tokens.weight`)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        tp_group: GroupHandle | None = None,
        tied_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group or GroupHandle.trivial()
        self.shard = VocabShard(vocab_size, self.tp_group)
        self.is_tied = tied_to is not None
        if tied_to is not None:
            if tied_to.shard.num_rows != self.shard.num_rows or tied_to.hidden_size != hidden_size:
                raise ValueError("tied LM head and embedding have different shapes")
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(
                torch.empty(self.shard.num_rows, hidden_size, dtype=dtype), requires_grad=False
            )

    def load_weight(self, tensor: torch.Tensor) -> None:
        """`tensor`: the full checkpoint head (or embedding) [vocab_size, hidden_size]."""
        self.shard.load_rows(self.weight.data, tensor)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_rows, hidden_size] -> [num_rows, vocab_size], identical on every TP rank
        logits = _logits_fp32(hidden, self.weight)  # [num_rows, padded_vocab_size / tp] float32
        if self.tp_group.size == 1:
            return logits
        logits = all_gather(logits, self.tp_group, dim=-1)  # [num_rows, padded_vocab_size]
        return logits[:, : self.shard.vocab_size]


def _logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T with float32 output. On CUDA, half-precision inputs accumulate in
    float32 and are *not* rounded back to bf16/fp16: bf16 logits tie at the top of a 128K
    vocabulary often enough to flip greedy picks between layouts (one bf16 step at |logit|
    in [4, 8) is 1/32)."""
    if weight.dtype == torch.float32:
        return F.linear(hidden, weight)
    if hidden.is_cuda:
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=)
            pass
    return F.linear(hidden, weight).float()
