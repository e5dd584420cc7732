"""The one CUDA-graph check: an op's forward and backward, captured in one CUDA graph and replayed
on new input values, give the bits of an eager call (no host sync, no allocation outside torch's
allocator, the current stream). GPU only; the callers are ``gpu``-marked."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def assert_replay_matches_eager(step: Callable[[], Sequence[torch.Tensor]], refresh: Sequence[torch.Tensor] = (),
                                names: Sequence[str] = (), what: str = "") -> None:
    """Warm ``step()`` up on a side stream (Triton compiles, the allocator grows, outside the
    capture), capture it in a CUDA graph, write new random values into the ``refresh`` tensors, replay,
    and assert every captured output equals (bit for bit) a fresh eager ``step()`` on those values
    (deterministic kernels: no atomics). With nothing to refresh, the replay is compared with an
    eager call made before the capture."""
    eager_before = None if refresh else step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in refresh:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    eager = eager_before if eager_before is not None else step()
    assert len(captured) == len(eager)
    for i, (c, e) in enumerate(zip(captured, eager)):
        name = names[i] if i < len(names) else f"output {i}"
        assert torch.equal(c, e), f"{what} {name}: replay differs from eager"
