"""transformers is a dependency of fastbert.models / fastbert.integrations only: the torch-only
layers import and run with it blocked, and ``import fastbert`` does not import it."""

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def test_torch_only_layers_run_with_transformers_blocked():
    """One subprocess (importing torch costs seconds): import fastbert, then the layers, then models."""
    r = _run(BLOCK + """
    import fastbert
    assert "transformers" not in sys.modules
    import torch
    import fastbert.ops, fastbert.nn, fastbert.backends
    from types import SimpleNamespace
    cfg = SimpleNamespace(hidden_size=16, num_attention_heads=2, intermediate_size=24, hidden_act="gelu",
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    enc = fastbert.nn.Encoder(fastbert.nn.BertLayer(cfg) for _ in range(2)).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    out = enc(x, mask)
    assert out.packed.shape == (7, 16) and (out.last_hidden_state[1, 2:] == 0).all()
    try:
        import fastbert.models
    except ImportError as e:
        assert "transformers" in str(e), e
    else:
        raise AssertionError("fastbert.models imported without transformers")
    print("ok")
    """.replace("\n    ", "\n"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
