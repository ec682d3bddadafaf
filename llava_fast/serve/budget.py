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
instead of 884-963 at 16, with ITL p99/p50 2.0-2.1x at 16 clients. A slice of 4/3 steps kept SmolLM2 at its tuned
80 tokens and gives the tiny LLaVA ~195.

The vision tower's cost is measured the same way: one image's tower + preprocessing (13 ms for the tiny
LLaVA's 256 positions, 100 prompt tokens' worth) is charged at that, not at one budget token per position.

What the budget bounds is the iteration's time, a + b rows + c tokens, at most that of a full batch's step plus
SLICE_STEPS of it. With fewer rows decoding, the rows not there leave their time to the prompt
(`spare_row_tokens`): on the tiny LLaVA a row is worth b / c = 7.4 prompt tokens, so beside 7 decoding rows (8
clients) a slice may take ~58 tokens more, while the slowest iteration (the ITL p99 at a full batch) stays as it
was. With no row decoding, nothing waits on the slices: the scheduler then prefills whole prompts (its idle cap).

Beside a full batch the slice is one step's arithmetic (SLICE_STEPS = 1), not 4/3: at 16 clients on SmolLM2 the
ITL p99 is a full batch's iteration with a slice (24 of 88 full-batch iterations carried 82-92 prompt tokens
beside 14-15 rows: 44.5 ms p50 against 22.8 for a plain step), and under the host's other work its ratio to the
p50 was 2.7-3.7x. One step of slice keeps such an iteration at about twice a plain one. The room a slice has
beside fewer rows is still spread from the 4/3-step allowance (SPREAD_STEPS): what a full batch's slice would
delay its rows by, summed, is what the rows waiting share; the full batch alone gives up the excess.

A tower run's cost before the first one is measured is its arithmetic in prompt tokens (`set_tower_prior`):
the tower's and projector's FLOPs per image position over the decoder's per prompt token (tiny LLaVA-1.5: 0.20
of a token per position, 52 tokens for 256 positions against 100 measured with the preprocessing; LLaVA-1.5-7B:
0.048, 28 tokens for 576), so the start-up measurement needs no scratch run of the tower (two ViT-L/14-336 runs
at 7B shapes). The first real image's run is measured, and from then on the runs measured are its cost.
"""

from __future__ import annotations

import collections

import numpy as np

SLICE_STEPS = 1.0  # prompt-slice arithmetic beside a full batch, in decode steps of that batch (see above)
SPREAD_STEPS = 4 / 3  # the slice allowance whose delay, summed over the rows waiting, fewer rows share (see above)
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
        self.tower_prior = None  # prompt tokens per image position before a tower run is measured
        self.added = 0  # calls seen in all

    def add(self, rows: int, tokens: int, seconds: float):
        self.calls.append((rows, tokens, seconds))
        self.added += 1

    def add_tower(self, positions: int, seconds: float):
        self.tower.append((positions, seconds))

    def fit(self, min_calls: int = MIN_CALLS, min_sliced: int = 4):
        """(a, b, c) in seconds, or None (the last fit stays) while the calls cannot tell them apart (fewer than
        min_calls, under min_sliced with a slice, one row count) or the fit is not physical (a negative cost).
        The served calls' fit asks for 4 with a slice: they are noisy and most are decode-only; the start-up
        measurement's calls are chosen to determine the three costs (Scheduler._calibrate)."""
        if len(self.calls) < min_calls:
            return None
        x = np.array(self.calls, dtype=np.float64)  # (N, 3)
        rows, tokens, seconds = x[:, 0], x[:, 1], x[:, 2]
        if (tokens > 0).sum() < min_sliced or np.unique(tokens).size < 2 or np.unique(rows).size < 2:
            return None
        design = np.stack([np.ones_like(rows), rows, tokens], axis=1)  # (N, 3)
        coef, _, rank, _ = np.linalg.lstsq(design, seconds, rcond=None)
        a, b, c = coef
        if rank < 3 or c <= 0 or a + b * self.max_batch <= 0:
            return None
        self.coef = (float(a), float(b), float(c))
        return self.coef

    def slice_tokens(self, steps: float = SLICE_STEPS) -> int | None:
        """Prompt tokens per iteration whose cost is `steps` decode steps of max_batch rows."""
        if self.coef is None:
            return None
        a, b, c = self.coef
        return int(steps * (a + b * self.max_batch) / c)

    def spare_row_tokens(self, idle_rows: int) -> int:
        """The prompt tokens, beyond one token each, whose cost equals `idle_rows` decoding rows': what rows
        that are not decoding leave to the prompt slices without making the iteration slower than a full
        batch's. 0 before a fit, and where a row costs no more than a prompt token."""
        if self.coef is None or idle_rows <= 0:
            return 0
        _, b, c = self.coef
        return int(idle_rows * max(b / c - 1, 0.0))

    def set_tower_prior(self, tower_flops: float, token_flops: float):
        """The tower's cost until a run is measured: `tower_flops` per image position (tower and projector)
        against `token_flops` per prompt token (the decoder's layers), both multiply-adds x 2."""
        self.tower_prior = tower_flops / token_flops

    def tower_tokens(self, positions: int) -> int | None:
        """A tower run over `positions` image positions, in prompt tokens: the recent runs' seconds per
        position over c, or before a run is measured the prior's FLOPs ratio; None before a fit and either."""
        if self.coef is None:
            return None
        if not self.tower:
            return None if self.tower_prior is None else int(np.ceil(positions * self.tower_prior))
        spent = sum(s for _, s in self.tower) / sum(p for p, _ in self.tower)
        return int(np.ceil(positions * spent / self.coef[2]))
