"""The server's KV-cache memory on the CPU: resident only where tokens live, under a byte budget.

In:  the decoder's shapes (layers L, KV heads Hkv, head size D, dtype), max_batch rows, max_model_len positions,
     and a budget in bytes (`--kv-cache-memory`).
Out: `KVMemory`: `cache` (a KVCache whose k/v are (L, B, Hkv, Tcap, D) views of two anonymous memory maps, the
     layout the native decode step and the torch attention read), and the block accounting the scheduler
     admits requests by: `reserve(row, tokens)`, `release(row, keep_tokens)`, `fits(...)`, sizes for /metrics.

Why not dense: `max_batch` 16 x `max_model_len` 8192 of SmolLM2-135M's K/V allocated with torch.zeros is 5.6 GiB
resident before the first request (7.0 GB RSS for the whole server). Here the same address space is mapped
but untouched: the kernel backs a 4 KiB page only when a K/V write lands in it, so resident memory follows the
positions each row has written. The page is the block: one (layer, row, head) segment of Tcap x D values is
page-aligned, and a page holds `block_tokens` = 4096 / (D x bytes) positions of it (16 for D = 64 float32, 32
for bfloat16; 8 and 16 for D = 128). Memory is given back with madvise(MADV_DONTNEED) on a row's positions
past what it keeps (reads of them then see zeros, as a fresh map does), when the budget needs it.

Accounting (what admission decides by; all in blocks of block_tokens positions, per row):
  - a running row holds its reservation: positions_needed(prompt, max_tokens), reserved whole at admission,
    so a running row never runs out (no preemption, as in vLLM's; a request waits in the queue instead);
  - a free row holds what it last wrote (its cached prefix + the parked position) until it is released:
    prefix reuse keeps free rows' K/V while the budget allows, and the least recently freed go first.
  `reserved_bytes` never exceeds `budget_bytes`.

What this is not (the native side's part of paging; csrc/decode.cpp is shared by the kernel layer): a row's
positions are still one contiguous range of its own row, so two rows cannot share a prefix's blocks (prefix
reuse copies them), and a row's address range is max_model_len long. Blocks shared between rows need the
native attention to read K/V through a block table: what that needs is written at the end of this file.
"""

from __future__ import annotations

import math
import mmap
import sys

import torch

from llava_fast.errors import InputError
from llava_fast.model import KVCache

# Linux's MAP_NORESERVE (Python's mmap module does not export it): no swap accounting for the whole map, so a
# 7B's 16 rows x 4096 positions (32 GiB of address space) maps on a 16 GiB machine; only touched pages count.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def default_kv_cache_memory() -> int:
    """4 GiB, or a quarter of the machine's memory when that is less (a laptop's 8 GiB: 2 GiB)."""
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(4 << 30, total // 4)


def smallest_block_bytes(text_cfg) -> int:
    """The bytes of a K/V block (KVMemory.block_bytes) for a 2-byte dtype, the smallest a float32 or 4-byte
    model's block can be: 2 L Hkv lcm(page, D x element), and lcm(page, 2D) divides lcm(page, 4D). Known from the
    config alone, so the server refuses a budget under it before the weights load."""
    row = text_cfg.head_dim * 2
    return 2 * text_cfg.num_layers * text_cfg.num_kv_heads * (mmap.PAGESIZE * row // math.gcd(mmap.PAGESIZE, row))


class KVMemory:
    def __init__(self, text_cfg, rows: int, max_tokens: int, dtype, budget_bytes: int):
        L, Hkv, D = text_cfg.num_layers, text_cfg.num_kv_heads, text_cfg.head_dim
        element = torch.empty((), dtype=dtype).element_size()
        page = mmap.PAGESIZE
        # Positions per page of one (layer, row, head) segment; a segment of Tcap positions is whole pages.
        self.block_tokens = page // math.gcd(page, D * element)
        self.capacity = math.ceil(max_tokens / self.block_tokens) * self.block_tokens  # Tcap
        self.rows, self.layers, self.heads = rows, L, Hkv
        self.segment_bytes = self.capacity * D * element
        self.bytes_per_token = 2 * L * Hkv * D * element  # K and V of every layer
        self.block_bytes = self.block_tokens * self.bytes_per_token
        self.budget_bytes = int(budget_bytes)
        self.budget_blocks = self.budget_bytes // self.block_bytes
        shape = (L, rows, Hkv, self.capacity, D)
        nbytes = L * rows * Hkv * self.segment_bytes
        flags = mmap.MAP_PRIVATE | _MAP_NORESERVE
        try:
            self.maps = [mmap.mmap(-1, nbytes, flags=flags) for _ in range(2)]  # K, V; zero-filled by the kernel
        except OSError as e:  # beyond the address space (x86-64: 128 TiB) or the overcommit limit: said as options
            raise InputError(f"a KV cache of {rows} rows (--max-batch) x {self.capacity} positions (--max-model-len) "
                             f"needs {2 * nbytes:,} bytes of address space, which the system refuses "
                             f"({e.strerror}): lower --max-batch or --max-model-len") from e
        k, v = (torch.frombuffer(m, dtype=dtype).view(shape) for m in self.maps)
        self.cache = KVCache.__new__(KVCache)
        self.cache.k, self.cache.v = k, v
        self.held = [0] * rows  # blocks each row holds (reserved, or written and not yet released)

    # ---- accounting --------------------------------------------------------------------------------------

    def blocks(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    @property
    def reserved_blocks(self) -> int:
        return sum(self.held)

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_blocks * self.block_bytes

    @property
    def budget_tokens(self) -> int:
        return self.budget_blocks * self.block_tokens

    def fits(self, row: int, tokens: int) -> bool:
        """Whether row can hold `tokens` positions with every other row's holding as it is."""
        return self.reserved_blocks - self.held[row] + self.blocks(tokens) <= self.budget_blocks

    def reserve(self, row: int, tokens: int):
        assert self.fits(row, tokens), "reserve() past the budget: check fits() first"
        self.held[row] = self.blocks(tokens)

    def hold_written(self, row: int, tokens: int):
        """A free row holds what it wrote: `tokens` positions (its cached prefix and the parked position)."""
        self.held[row] = min(self.held[row], self.blocks(tokens))

    def release(self, row: int, keep_tokens: int = 0):
        """Give the pages of row's positions from keep_tokens on back to the system; they read as zeros after."""
        keep = self.blocks(keep_tokens)
        if keep >= self.capacity // self.block_tokens:
            return
        start = keep * self.block_tokens * self.segment_bytes // self.capacity
        for m in self.maps:
            for layer in range(self.layers):
                for head in range(self.heads):
                    offset = ((layer * self.rows + row) * self.heads + head) * self.segment_bytes
                    m.madvise(mmap.MADV_DONTNEED, offset + start, self.segment_bytes - start)
        self.held[row] = min(self.held[row], keep)

    def describe(self) -> str:
        gib = 1 << 30
        return (f"KV cache: budget {self.budget_bytes / gib:.2f} GiB = {self.budget_tokens} tokens "
                f"({self.bytes_per_token / 1024:.1f} KiB per token, blocks of {self.block_tokens}), "
                f"resident only where written; {self.rows} rows of up to {self.capacity} positions")


# ------------------------------------------------------------------------------------------------------------
# Block tables: what the native side needs (csrc/decode.cpp; the Python side keeps this module's accounting)
# ------------------------------------------------------------------------------------------------------------
# Today a row's K/V for layer l, head h are one contiguous range of its own row:
#     addr(l, row, h, pos) = base + l*s0 + row*s1 + h*s2 + pos*s3          (DecodeModel.step / .forward take s0..s3)
# Paged, they live in blocks of BT positions taken from one pool per tensor, (L, NB, Hkv, BT, D), and a block table
# int32 (B, max_blocks) maps a row's j-th block of positions to a pool block:
#     addr(l, row, h, pos) = base + l*s0 + table[row, pos / BT]*s1 + h*s2 + (pos % BT)*s3
# 1. DecodeModel.step(tokens, lengths, B, k, v, s0..s3, ...) gains (block_table ptr, table row stride, BT); the new
#    token's K/V write goes to addr(l, row, h, lengths[row]); attention visits the row's blocks in position order,
#    positions within a block contiguous as now. Visiting them in the same order keeps each row's sums, and so the
#    greedy-equals-generate() guarantee, bit for bit (tests/test_native_decode.py compares against the torch step).
# 2. DecodeModel.forward (prefill: per-token `slots` and `positions` already) resolves each token's K/V address
#    through the table the same way; its attention in groups of 4 positions needs BT % 4 == 0.
# 3. BT: a whole number of pages per (block, head) so a freed block can be given back with madvise (BT = 16 at
#    D = 64 float32 is one page; 32 in bfloat16), and a multiple of 4 (above).
# 4. The Python side then: a block allocator (free list + reference counts) in place of KVMemory.held; a prompt's
#    prefix shared by reference (rows only append, so full prefix blocks are never written again; the partial last
#    block is copied), image-prefix LRU entries holding block references instead of stacked copies
#    (Scheduler.prefixes), admission by free blocks exactly as now, and the torch reference attention
#    (ops.rotary_cached_attention_reference) gathering k_pool[table] for the tests. The Triton decode attention reads
#    the same table on the GPU.
