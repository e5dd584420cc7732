"""Follow-ups of the patch() issue (#14): an additive 2-D mask through ``patch()`` is a named error
(not silently inverted); ``pooler_output`` on rows whose position 0 is padding takes the documented
value; a bad ``backend=`` fails where it is given; the ``window`` argument's entries (numpy ints,
0-d tensors, named errors); one wording for "no GPU"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert  # noqa: E402
import fastbert.models as fm  # noqa: E402
from fastbert.integrations.transformers import is_patched, patch, unpatch  # noqa: E402
from fastbert.nn import LayerNorm, set_backend  # noqa: E402

ADDITIVE = "attention_mask: expected 0/1 or bool values"


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **kw)


def modernbert_config():
    return transformers.ModernBertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def ids_and_mask(left: bool = False):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    if left:
        mask[1, :4] = 0
        mask[2, :8] = 0
    else:
        mask[1, 5:] = 0
        mask[2, 1:] = 0
    return ids, mask


# ---- (1) an additive mask is an error, not an inverted mask ------------------------------------


@pytest.mark.parametrize("family", ["bert", "modernbert"])
@pytest.mark.parametrize("neg", [-10000.0, float("-inf")])
def test_additive_mask_is_a_named_error_through_patch(family, neg):
    torch.manual_seed(0)
    model = (transformers.BertModel(bert_config()) if family == "bert"
             else transformers.ModernBertModel(modernbert_config())).eval()
    patch(model)
    ids, mask = ids_and_mask()
    additive = (1.0 - mask.float()) * neg  # 0 = attend, neg = padding: inverted as a padding mask
    with torch.no_grad():
        for call in (lambda: model(input_ids=ids, attention_mask=additive), lambda: model(ids, additive)):
            with pytest.raises(ValueError, match=ADDITIVE):
                call()
        # the masks transformers documents still run: int, float 0/1, bool
        outs = [model(ids, m).last_hidden_state for m in (mask, mask.float(), mask.bool())]
    real = mask.bool()
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=0, rtol=0)
    torch.testing.assert_close(outs[0][real], outs[2][real], atol=0, rtol=0)
    # fastbert's own model raises the same error
    with pytest.raises(ValueError, match=ADDITIVE):
        fm.BertModel(bert_config()).eval()(ids, attention_mask=additive)
    unpatch(model)  # the check goes with the patch: plain transformers takes what it takes
    with torch.no_grad():
        model(ids, additive)


def test_additive_mask_error_through_a_head():
    model = patch(transformers.BertForSequenceClassification(bert_config(num_labels=2)).eval())
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match=ADDITIVE):
        model(ids, (1.0 - mask.float()) * -10000.0)


# ---- (2) pooler_output where position 0 is padding ---------------------------------------------


def test_pooler_output_on_padding_rows_is_documented_value():
    """Right padding: pooler_output matches transformers. Left padding / an all-padding row: the
    unpadded encoder writes zeros at padding, so pooler_output = tanh(pooler.dense.bias) there (the
    value the integration documents; transformers pools a padding token's hidden state)."""
    torch.manual_seed(1)
    ref = transformers.BertModel(bert_config()).eval()
    with torch.no_grad():
        ref.pooler.dense.bias.normal_()
    model = transformers.BertModel(bert_config()).eval()
    model.load_state_dict(ref.state_dict())
    patch(model)
    with torch.no_grad():
        ids, mask = ids_and_mask(left=False)
        torch.testing.assert_close(model(ids, mask).pooler_output, ref(ids, mask).pooler_output,
                                   atol=1e-5, rtol=1e-5)
        ids, mask = ids_and_mask(left=True)
        mask[2] = 0  # an all-padding row
        got = model(ids, mask).pooler_output
        torch.testing.assert_close(got[0], ref(ids, mask).pooler_output[0], atol=1e-5, rtol=1e-5)
        want = torch.tanh(model.pooler.dense.bias)
        torch.testing.assert_close(got[1:], want.expand(2, -1), atol=1e-6, rtol=1e-6)


# ---- (3) a bad backend= fails where it is given ------------------------------------------------


def test_bad_backend_fails_at_construction():
    with pytest.raises(ValueError, match=r"backend: expected one of \[.*'torch'.*\], 'auto' or None, got 'trition'"):
        patch(transformers.BertModel(bert_config()), backend="trition")
    model = transformers.BertModel(bert_config())
    with pytest.raises(ValueError, match="got 'trition'"):
        patch(model, backend="trition")
    assert not is_patched(model)
    with pytest.raises(ValueError, match="got 'trition'"):
        fm.BertModel(bert_config(), backend="trition")
    with pytest.raises(ValueError, match="got 'nope'"):
        fm.ModernBertModel(modernbert_config(), backend="nope")
    with pytest.raises(TypeError, match="backend: expected a backend name"):
        LayerNorm(8, backend=3)
    good = fm.BertModel(bert_config(), backend="reference")
    with pytest.raises(ValueError, match="got 'x'"):
        good.backend = "x"
    assert good.backend == "reference" and good.encoder.layer[0].attention.self.backend == "reference"  # unchanged
    with pytest.raises(ValueError, match="got 'x'"):
        set_backend(good, "x")
    for name in (None, "auto", "torch"):
        good.backend = name
        assert good.backend == name
    assert is_patched(patch(transformers.BertModel(bert_config()), backend="auto"))


# ---- (4) the window argument -------------------------------------------------------------------


def test_window_accepts_numpy_and_0d_tensor_ints():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 11, 2, 8, generator=g) for _ in range(3))
    want = fastbert.attention(q, k, v, window=(3, 1))
    for window in ((np.int64(3), np.int32(1)), (torch.tensor(3), torch.tensor(1, dtype=torch.int32)),
                   [np.int16(3), 1]):
        torch.testing.assert_close(fastbert.attention(q, k, v, window=window), want, atol=0, rtol=0)


@pytest.mark.parametrize("window,where,got", [
    ((3, 1.5), r"window\[1\]", "1.5 of type float"),
    ((True, 1), r"window\[0\]", "True of type bool"),
    ((torch.tensor([3]), 1), r"window\[0\]", "of type Tensor"),
    ((3, torch.tensor(1.0)), r"window\[1\]", "of type Tensor"),
    ((np.float32(3), 1), r"window\[0\]", "of type float32"),
    ((3, "1"), r"window\[1\]", "'1' of type str"),
])
def test_window_type_error_names_the_entry(window, where, got):
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match=r"window: expected None or a \(left, right\) pair") as info:
        fastbert.attention(q, q, q, window=window)
    assert f"{where.replace(chr(92), '')} is " in str(info.value) and got in str(info.value)


def test_window_shape_and_sign_errors():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match=r"window: expected None or a \(left, right\) pair"):
        fastbert.attention(q, q, q, window=(1, 2, 3))
    with pytest.raises(ValueError, match="left >= 0 and right >= 0"):
        fastbert.attention(q, q, q, window=(np.int64(-1), 2))


# ---- (5) one wording for "no GPU" --------------------------------------------------------------


def test_one_no_gpu_wording():
    import fastbert.env as env
    from fastbert.backends.cuda import NO_GPU, _cuda_probe

    assert env.NO_GPU is NO_GPU
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the probe has no 'no GPU' reason")
    reason = _cuda_probe()
    if reason is None or not reason.startswith(NO_GPU):
        assert reason is not None and "_C" in reason and "not" in reason, reason  # the extension did not load
        pytest.skip(f"fastbert._C does not load here: {reason}")
    assert env.explain_reason(reason, driver=False) == NO_GPU
    assert env.explain_reason(reason, driver=True) == reason  # a driver exists: the runtime's own words


def test_patched_model_rejects_a_wrong_shape_all_ones_mask():
    """An all-ones mask is 'no padding' only once its shape is (batch, seqlen): a (2, 10) mask on a
    (2, 20) batch is an error, not silently ignored (found by a break-it pass)."""
    import transformers

    from fastbert.integrations.transformers import patch

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48)
    model = patch(transformers.BertModel(cfg).eval())
    ids = torch.randint(1, 50, (2, 20))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(batch, seqlen\) = \(2, 20\), got \(2, 10\)"):
        model(input_ids=ids, attention_mask=torch.ones(2, 10, dtype=torch.long))
    model(input_ids=ids, attention_mask=torch.ones(2, 20, dtype=torch.long))  # the right shape still runs


def test_rotary_flag_type_error_names_the_type():
    import numpy as np

    from fastbert.ops import rotary

    q = torch.randn(1, 4, 2, 8)
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(TypeError, match=r"interleaved: expected a bool \(Python True or False\), got .* of type numpy\.bool"):
        rotary(q, q.clone(), cos, sin, interleaved=np.bool_(True))


def test_output_attentions_on_the_config_after_patch_is_transformers_error(tmp_path):
    """transformers allows ``config.output_attentions = True`` only with ``attn_implementation="eager"``
    (by name, in its setter and in the validator ``save_pretrained`` runs; a registered
    implementation cannot declare support), and patch() switches BERT to ``"fastbert"``. What the
    README says: the call keyword works; the config flag set before patch() is honoured, but must be
    set back to False before ``save_pretrained``; setting it after patch() raises transformers'
    ValueError (this test pins it, so the README changes when transformers does)."""
    ids, mask = ids_and_mask()
    model = patch(transformers.BertModel(bert_config(attn_implementation="eager")).eval())
    with pytest.raises(ValueError, match="output_attentions.*not supported.*set to fastbert"):
        model.config.output_attentions = True
    model.config.output_attentions = False  # False is always accepted
    with torch.no_grad():
        assert len(model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions) == 2
    unpatch(model)
    model.config.output_attentions = True  # eager again: transformers accepts it

    before = patch(transformers.BertModel(bert_config(attn_implementation="eager", output_attentions=True)).eval())
    with torch.no_grad():
        assert len(before(input_ids=ids, attention_mask=mask).attentions) == 2
    with pytest.raises(Exception, match="output_attentions.*not supported.*set to fastbert"):
        before.save_pretrained(tmp_path / "flag")
    before.config.output_attentions = False
    before.save_pretrained(tmp_path / "saved")
    transformers.BertModel.from_pretrained(tmp_path / "saved")  # plain transformers loads it
