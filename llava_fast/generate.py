"""Prefill, the one-token decode step, and sampling (gpt-fast's structure, with batches of ragged rows).

Rows of different lengths share one batch without left padding: each row's tokens sit at positions
0..len-1 (RoPE positions are exact), the static KV cache holds each row's keys at those positions, and every
decode step writes row b's new key at its own position `lengths[b]`. A row therefore attends to exactly the
tokens it would see alone, so greedy output per row equals running the row by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_fast.errors import InputError
from llava_fast.model import KVCache, LlavaForCausalLM


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise InputError(f"top_k must be a non-negative integer, got {self.top_k}")

    def generator(self, device):
        if self.temperature == 0:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample_next_token(logits, sampling: Sampling, generator):
    """logits (B, V) -> next token ids (B,), on the device, without a host sync."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keeps the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # argmax(p / E), E ~ Exp(1), draws from p (the exponential race) with no multinomial host sync.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


class Decoder:
    """One generate call's state: the static KV cache and each row's length. Allocated once."""

    def __init__(self, net: LlavaForCausalLM, batch_size: int, max_tokens: int):
        self.net = net
        weight = net.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = KVCache(net.cfg.text, batch_size, max_tokens, self.device, self.dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)  # tokens cached per row

    @torch.inference_mode()
    def prefill(self, rows, pixel_values=None, start_pos=None):
        """Append rows (lists of ids, image tokens expanded) after start_pos[b] cached tokens per row.

        Returns the logits of each row's last token, (B, V). start_pos None means an empty cache.
        """
        B, T = len(rows), max(len(r) for r in rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        ids = ids.to(self.device)
        seq_lens = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=self.device)
        if start_pos is not None:
            self.lengths.copy_(torch.as_tensor(start_pos, dtype=torch.int32))
        x = self.net.embed(ids, pixel_values)
        hidden = self.net.decode_hidden(x, self.cache, self.lengths.clone(), seq_lens)  # (B, T, C)
        last = hidden[torch.arange(B, device=self.device), seq_lens.long() - 1]  # (B, C): lm_head on B rows only
        self.lengths += seq_lens
        return self.net.lm_head(last).float()

    @torch.inference_mode()
    def step(self, tokens):
        """tokens (B,) -> logits (B, V) for the next position."""
        x = self.net.embed(tokens.view(-1, 1))
        ones = torch.ones_like(self.lengths)
        hidden = self.net.decode_hidden(x, self.cache, self.lengths.clone(), ones)  # (B, 1, C)
        self.lengths += 1
        return self.net.lm_head(hidden[:, 0]).float()


def generate_token_steps(decoder: Decoder, first_logits, max_new_tokens, sampling: Sampling):
    """Yield the (B,) tensor of new tokens at each step, max_new_tokens times at most; the caller stops early
    by closing the generator (EOS, stop strings)."""
    generator = sampling.generator(decoder.device)
    tokens = sample_next_token(first_logits, sampling, generator)
    for i in range(max_new_tokens):
        yield tokens
        if i + 1 < max_new_tokens:
            tokens = sample_next_token(decoder.step(tokens), sampling, generator)
