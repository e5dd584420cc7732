"""The Triton Philox4x32-10 (interpreted on CPU) is bit-identical to the torch one in
``fastbert.backends._philox``, which is itself checked against Random123's known answers."""

import pytest
import torch

pytest.importorskip("triton")

from fastbert.backends._philox import MASK32, dropout_threshold, philox4x32  # noqa: E402
from fastbert.backends.triton._philox import philox_words  # noqa: E402

_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("counter, key, word0", [
    ((0, 0, 0, 0), (0, 0), 0x6627E8D5),
    ((MASK32,) * 4, (MASK32, MASK32), 0x408F276D),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 0xD16CFE09),
])
def test_known_answers(counter, key, word0):
    c = torch.tensor(counter, dtype=torch.int64, device=_DEV).view(4, 1)
    out, _ = philox_words(c, torch.tensor(key, dtype=torch.int64, device=_DEV))
    assert out.item() == word0


# thresholds from 0 (keep all) through 1 (the smallest nonzero; a value Triton may specialize)
# and above 2**31 (an int64 kernel argument) to 0xFFFFFFFF (keep only word 0xFFFFFFFF)
@pytest.mark.parametrize("dropout_p", [0.0, 2.0**-32, 0.1, 0.5, 0.9, 1.0 - 2.0**-33])
def test_random_counters_match_torch(dropout_p):
    g = torch.Generator().manual_seed(1234 + int(dropout_p * 1000))
    n = 4099  # not a multiple of the block: masked lanes
    counters = torch.randint(0, 2**32, (4, n), generator=g, dtype=torch.int64)
    counters[:, :3] = torch.tensor([0, MASK32, 1]).view(1, 3)  # extremes in every word
    key = torch.randint(0, 2**32, (2,), generator=g, dtype=torch.int64)
    ref = philox4x32(counters[0], counters[1], counters[2], counters[3], key[0].item(), key[1].item())[0]
    out, keep = philox_words(counters.to(_DEV), key.to(_DEV), dropout_p)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(keep.cpu(), ref >= dropout_threshold(dropout_p))
