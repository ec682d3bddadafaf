"""The CPU scheduler's token budget, measured: how many prompt tokens an iteration's slices may take.

In:  each mixed native call's (decoding rows, prompt-slice tokens, seconds), and each vision tower run's
     (image positions, seconds).
Out: `slice_tokens()`, the prompt tokens whose arithmetic costs `SLICE_STEPS` decode steps of a full batch
     (max_batch rows), and `tower_tokens(positions)`, a tower run's cost in prompt tokens; None until the
     calls seen so far determine them.

A fixed token count cannot say what a slice costs beside a decode step: that ratio is the model's. On the
2-core Sapphire Rapids VM, bfloat16, the fit below gave (a, b per row, c per prompt token):
  - SmolLM2-135M (30 layers, tied 49k x 576 head):   16.4 ms, 1.17 ms, 0.59 ms: a 16-row step = 60 tokens;
  - tiny LLaVA-1.5 (6 x 512 layers, 49k x 512 head):  3.9 ms, 0.96 ms, 0.13 ms: a 16-row step = 146 tokens,
since a decode step reads the whole vocabulary head and a prompt token (but the last) does not. The fixed
budget of 96 was tuned on SmolLM2 (80 prompt tokens beside 16 rows, 1.33 steps: ITL p99/p50 2.9x, TTFT p50
184 ms at 16 clients); on the tiny LLaVA, whose prompts hold 256 image positions, it cut each prompt into 4
slices, and a budget of 256 (1.1-1.9 steps) gave TTFT p50 125-133 ms instead of 201-207 at 8 clients, 404-420
instead of 884-963 at 16, with ITL p99/p50 2.0-2.1x at 16 clients. SLICE_STEPS = 4/3 keeps SmolLM2 at its tuned
80 tokens and gives the tiny LLaVA ~195.

The vision tower's cost is measured the same way: one image's tower + preprocessing (13 ms for the tiny
LLaVA's 256 positions, 100 prompt tokens' worth) is charged at that, not at one budget token per position.

What the budget bounds is the iteration's time, a + b rows + c tokens, at most that of a full batch's step plus
SLICE_STEPS of it. With fewer rows decoding, the rows not there leave their time to the prompt
(`spare_row_tokens`): on the tiny LLaVA a row is worth b / c = 7.4 prompt tokens, so beside 7 decoding rows (8
clients) a slice may take ~58 tokens more, while the slowest iteration (the ITL p99 at a full batch) stays as it
was. With no row decoding, nothing waits on the slices: the scheduler then prefills whole prompts (its idle cap).
"""

from __future__ import annotations

import collections

import numpy as np

SLICE_STEPS = 4 / 3  # prompt-slice arithmetic per iteration, in decode steps of a full batch (see above)
WINDOW = 256  # recent calls in the fit: a few seconds of serving, so the fit follows the host's load
MIN_CALLS = 32  # calls before the first fit, with decode-only and slice calls and several row counts among them


class IterationCost:
    """Least squares over the last WINDOW mixed calls: seconds = a + b * rows + c * tokens (a: the pass over
    the weights and the call's fixed work; b: a decoding row's arithmetic and attention; c: a prompt token's)."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.calls = collections.deque(maxlen=WINDOW)  # (rows, tokens, seconds)
        self.tower = collections.deque(maxlen=64)  # (positions, seconds)
        self.coef = None  # (a, b, c) of the last successful fit
        self.added = 0  # calls seen in all

    def add(self, rows: int, tokens: int, seconds: float):
        self.calls.append((rows, tokens, seconds))
        self.added += 1

    def add_tower(self, positions: int, seconds: float):
        self.tower.append((positions, seconds))

    def fit(self, min_calls: int = MIN_CALLS):
        """(a, b, c) in seconds, or None (the last fit stays) while the calls cannot tell them apart (fewer than
        min_calls, under 4 with a slice, one row count) or the fit is not physical (a negative cost)."""
        if len(self.calls) < min_calls:
            return None
        x = np.array(self.calls, dtype=np.float64)  # (N, 3)
        rows, tokens, seconds = x[:, 0], x[:, 1], x[:, 2]
        if (tokens > 0).sum() < 4 or np.unique(tokens).size < 2 or np.unique(rows).size < 2:
            return None
        design = np.stack([np.ones_like(rows), rows, tokens], axis=1)  # (N, 3)
        coef, _, rank, _ = np.linalg.lstsq(design, seconds, rcond=None)
        a, b, c = coef
        if rank < 3 or c <= 0 or a + b * self.max_batch <= 0:
            return None
        self.coef = (float(a), float(b), float(c))
        return self.coef

    def slice_tokens(self) -> int | None:
        """Prompt tokens per iteration whose cost is SLICE_STEPS decode steps of max_batch rows."""
        if self.coef is None:
            return None
        a, b, c = self.coef
        return int(SLICE_STEPS * (a + b * self.max_batch) / c)

    def spare_row_tokens(self, idle_rows: int) -> int:
        """The prompt tokens, beyond one token each, whose cost equals `idle_rows` decoding rows': what rows
        that are not decoding leave to the prompt slices without making the iteration slower than a full
        batch's. 0 before a fit, and where a row costs no more than a prompt token."""
        if self.coef is None or idle_rows <= 0:
            return 0
        _, b, c = self.coef
        return int(idle_rows * max(b / c - 1, 0.0))

    def tower_tokens(self, positions: int) -> int | None:
        """A tower run over `positions` image positions, in prompt tokens (the recent runs' seconds per
        position over c); None before a fit and a tower run."""
        if self.coef is None or not self.tower:
            return None
        spent = sum(s for _, s in self.tower) / sum(p for p, _ in self.tower)
        return int(np.ceil(positions * spent / self.coef[2]))
