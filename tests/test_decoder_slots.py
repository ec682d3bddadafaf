"""The server's decoding path at the Decoder level (generate.Decoder), against a full-sequence forward.

What continuous batching does to a Decoder and what it must not change in any row's logits: one row prefilled
into cache row `slot` (prefill_slot) while the other rows hold K/V; a prefix copied from another row
(copy_prefix) and only the rest prefilled; partial steps over rows [0, n) (n < batch); rows whose cache holds
stale keys and values beyond their length (a freed row's old reply, random here); parked rows stepped with a
dummy token and their length reset (the scheduler's parking). Odd shapes: grouped-query attention 6/2 with a
head_dim of 12, tied embeddings, a vocabulary of 97, rows of 5, 11 and 17 tokens. Float32, the CPU path the
server runs (the native GEMV for <= 8 rows where it is built); every logit within 1e-4 of the forward.
"""

import pytest
import torch

from llava_fast.checkpoints.config import LlavaConfig, TextConfig
from llava_fast.cpu.quantize import prepare_for_inference
from llava_fast.generate import Decoder
from llava_fast.model import LlavaForCausalLM

VOCAB = 97


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    text = TextConfig(vocab_size=VOCAB, hidden_size=72, intermediate_size=136, num_layers=3, num_heads=6,
                      num_kv_heads=2, max_position_embeddings=64, rope_theta=1000.0, tie_word_embeddings=True)
    net = LlavaForCausalLM(LlavaConfig(vision=None, text=text)).eval()
    with torch.no_grad():
        for p in net.parameters():  # RMSNorm weights too: not all ones
            p.copy_(torch.randn_like(p) * 0.3)
    assert net.lm_head.weight is net.language_model.embed_tokens.weight
    return prepare_for_inference(net.fuse_projections(), None)


def full_logits(net, seq):
    with torch.inference_mode():
        return net(torch.tensor([seq]))[0, -1].float()


def stale_decoder(net, batch, max_tokens, seed):
    """A Decoder whose cache holds random K/V everywhere and whose rows have random lengths (a server's
    cache after other requests)."""
    d = Decoder(net, batch, max_tokens)
    g = torch.Generator().manual_seed(seed)
    d.cache.k.copy_(torch.randn(d.cache.k.shape, generator=g) * 3)
    d.cache.v.copy_(torch.randn(d.cache.v.shape, generator=g) * 3)
    d.lengths.copy_(torch.randint(0, max_tokens // 2, (batch,), generator=g, dtype=torch.int32))
    return d


def test_slot_prefill_partial_steps_and_prefix_copy_equal_a_full_forward(net):
    g = torch.Generator().manual_seed(1)
    prompts = {slot: torch.randint(0, VOCAB, (n,), generator=g).tolist() for slot, n in ((2, 11), (0, 5))}
    prompts[1] = prompts[2][:7] + torch.randint(0, VOCAB, (10,), generator=g).tolist()  # shares 7 with slot 2
    d = stale_decoder(net, batch=4, max_tokens=48, seed=2)
    seqs, next_logits = {}, {}
    for slot in (2, 0):  # the highest slot first: rows 0 and 1 hold stale K/V when it prefills
        next_logits[slot] = d.prefill_slot(slot, prompts[slot])[0]
        seqs[slot] = list(prompts[slot])
    d.copy_prefix(2, 1, 7)
    next_logits[1] = d.prefill_slot(1, prompts[1][7:], start_pos=7)[0]
    seqs[1] = list(prompts[1])
    assert d.lengths[:3].tolist() == [5, 17, 11]
    parked_length = int(d.lengths[3])  # row 3 is never stepped: its length and K/V must stay
    row3 = d.cache.k[:, 3].clone(), d.cache.v[:, 3].clone()

    def check():
        for slot, logits in next_logits.items():
            torch.testing.assert_close(logits, full_logits(net, seqs[slot]), atol=1e-4, rtol=1e-4,
                                       msg=lambda m, slot=slot: f"row {slot} after {len(seqs[slot])} tokens: {m}")

    check()
    # Steps over 3 rows (n < batch), then over row 0 alone (rows 1 and 2 wait: their lengths stay), then row 1
    # ends and is parked while rows 0 and 2 go on (the scheduler steps it with token 0 and resets its length).
    for active in ([0, 1, 2], [0, 1, 2], [0], [0, 1, 2], [0, 2], [0, 2]):
        n = max(active) + 1
        tokens = torch.zeros(n, dtype=torch.long)
        for slot in active:
            tokens[slot] = int(next_logits[slot].argmax())
            seqs[slot].append(int(tokens[slot]))
        before = d.lengths.clone()
        logits = d.step(tokens)
        assert logits.shape == (n, VOCAB)
        for slot in range(len(before)):
            moved = int(d.lengths[slot] - before[slot])
            assert moved == (1 if slot < n else 0), f"row {slot}'s length moved by {moved} in a {n}-row step"
        for slot in range(n):
            if slot in active:
                next_logits[slot] = logits[slot].clone()
            else:
                d.lengths[slot] = before[slot]  # parked
        if active == [0, 2]:
            next_logits.pop(1, None)
        check()
    assert int(d.lengths[3]) == parked_length
    assert torch.equal(d.cache.k[:, 3], row3[0]) and torch.equal(d.cache.v[:, 3], row3[1])


def test_slot_prefill_equals_a_batch_prefill_of_the_same_rows(net):
    """prefill_slot row by row (the server) and Decoder.prefill of all rows at once (generate()) give the same
    next-token logits and the same first decode step, whatever stale content the cache held."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14)]
    by_slot = stale_decoder(net, batch=3, max_tokens=32, seed=4)
    batched = Decoder(net, 3, 32)
    first = torch.cat([by_slot.prefill_slot(s, r) for s, r in reversed(list(enumerate(rows)))][::-1])
    torch.testing.assert_close(first, batched.prefill(rows), atol=1e-4, rtol=1e-4)
    tokens = first.argmax(-1)
    torch.testing.assert_close(by_slot.step(tokens), batched.step(tokens), atol=1e-4, rtol=1e-4)
    assert by_slot.lengths.tolist() == batched.lengths.tolist() == [10, 4, 15]
