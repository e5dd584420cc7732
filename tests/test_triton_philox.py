"""The Triton Philox4x32-10 (interpreted on CPU) is bit-identical to the torch one in
``fastbert.backends._philox``, which is itself checked against Random123's known answers; the
Triton keep tile (one call per 8 columns, spec v2) equals the spec's expansion of the words."""

import pytest
import torch

pytest.importorskip("triton")

from fastbert.backends._philox import MASK32, keep_from_words, philox4x32  # noqa: E402
from fastbert.backends.triton._philox import philox_keep, philox_words  # noqa: E402

_DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Random123's kat_vectors for philox4x32-10: counter, key, the four output words.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, words", KNOWN_ANSWERS)
def test_known_answers(counter, key, words):
    assert tuple(philox4x32(*counter, *key)) == words
    c = torch.tensor(counter, dtype=torch.int64, device=_DEV).view(4, 1)
    out = philox_words(c, torch.tensor(key, dtype=torch.int64, device=_DEV))
    assert tuple(out.view(-1).tolist()) == words


def test_random_counters_match_torch():
    g = torch.Generator().manual_seed(1234)
    n = 4099  # not a multiple of the block: masked lanes
    counters = torch.randint(0, 2**32, (4, n), generator=g, dtype=torch.int64)
    counters[:, :3] = torch.tensor([0, MASK32, 1]).view(1, 3)  # extremes in every word
    key = torch.randint(0, 2**32, (2,), generator=g, dtype=torch.int64)
    ref = torch.stack(philox4x32(*counters, key[0].item(), key[1].item()))
    assert torch.equal(philox_words(counters.to(_DEV), key.to(_DEV)).cpu(), ref)


def _spec_keep(key, p, rows, cols, c2, c3):
    groups = -(-cols // 8)
    r = torch.arange(rows).view(-1, 1)
    words = philox4x32(torch.arange(groups).view(1, -1), r, torch.full((1, 1), c2), torch.full((1, 1), c3),
                       key[0].item(), key[1].item())
    return keep_from_words([w.expand(rows, groups) for w in words], p)[:, :cols]


# p = 0 (keep all), 2**-16 (threshold 1: a value Triton may specialize), not a multiple of 2**-16,
# and the cap (threshold 65535: only u16 == 0xFFFF is kept); tiles of 1, 4 and 8 groups, and the
# per-element form for tiles narrower than 8 columns.
@pytest.mark.parametrize("dropout_p, block_n, per_element", [
    (0.0, 32, False), (2.0**-16, 8, False), (0.3, 64, False), (1.0 - 2.0**-17, 32, False), (0.3, 4, True),
])
def test_keep_tile_matches_the_spec(dropout_p, block_n, per_element):
    key = torch.tensor([0x9E3779B9, 0x7F4A7C15], dtype=torch.int64)
    rows, cols = 37, 100  # neither a multiple of the tile: masked rows and columns
    got = philox_keep(key.to(_DEV), dropout_p, rows, cols, 3, 5, block_m=64 if per_element else 16,
                      block_n=block_n, per_element=per_element)
    assert torch.equal(got.cpu(), _spec_keep(key, dropout_p, rows, cols, 3, 5))
