"""Encoder benchmarks: fastbert's ``BertModel`` (unpadded) vs ``transformers.BertModel``.

Random weights at BERT-base / BERT-large shapes, shared by every implementation (fastbert loads
the Hugging Face state_dict), on padded batches with realistic variable lengths (``--fill``).
Two modes: ``infer`` (a forward under ``torch.inference_mode``, eval mode) and ``train`` (one
training step: forward in train mode with the config's dropout, a loss over the real tokens,
backward and an ``AdamW`` step). On a GPU the inference forward is also timed replayed from a
CUDA graph (``+graph``); fastbert's unpadded mode then gets its packing metadata precomputed
outside the graph. tokens/s counts real tokens only.

Check before timing: the last hidden state at real tokens of the first two sequences against
Hugging Face's eager model run in fp64 (tolerance 3x Hugging Face's own error in the benchmark
dtype). The train mode checks the same forward (eval mode, before any step); its gradients are
covered by the encoder's parity tests, not here.
"""

from __future__ import annotations

from functools import cached_property

import torch

from fastbert.backends import CallInfo
from fastbert.bench.core import (MODEL_SHAPES, Case, Impl, Options, Prepared, emulated_skip,
                                 fastbert_backends, optional_import, padding_mask, variable_lengths)
from fastbert.bench.formulas import encoder_tokens

CHECK_ROWS = 2  # sequences compared against the fp64 reference

_MODELS: dict = {}  # (impl, shape, layers, device, dtype) -> model, reused across cases


def release() -> None:
    """Drop the cached models (the runner calls this when it is done)."""
    _MODELS.clear()


def sizes(opts: Options) -> list[tuple[int, int]]:
    """``(seqlen, batch)`` pairs, the same padded tokens per batch at each size of a device and
    mode (so rates compare along the plot's batch x seqlen axis)."""
    if opts.seqlens:
        return [(s, opts.batch or max(1, 4096 // s)) for s in opts.seqlens]
    if opts.device != "cpu":
        pairs = [(128, 32), (512, 8)] if opts.quick else [(128, 32), (256, 16), (512, 8)]
    else:
        pairs = [(64, 8), (128, 4)] if opts.quick else [(128, 8), (512, 2)]
    return [(s, opts.batch or b) for s, b in pairs]


def num_layers(opts: Options, model: str) -> int:
    """Quick mode on the CPU runs 2 layers (the shape of every layer stays BERT's)."""
    if opts.layers:
        return opts.layers
    if opts.quick and opts.device == "cpu":
        return 2
    return MODEL_SHAPES[model].num_hidden_layers


class _Setup:
    """Config, shared random weights and one batch, created on first use."""

    def __init__(self, model, layers, batch, seqlen, opts: Options):
        self.model, self.layers, self.batch, self.seqlen = model, layers, batch, seqlen
        self.device, self.dtype, self.seed = opts.device, opts.dtype, opts.seed
        self.lengths = variable_lengths(batch, seqlen, opts.fill, opts.seed)

    @cached_property
    def hf_config(self):
        from transformers import BertConfig

        s = MODEL_SHAPES[self.model]
        return BertConfig(hidden_size=s.hidden_size, num_hidden_layers=self.layers,
                          num_attention_heads=s.num_attention_heads, intermediate_size=s.intermediate_size,
                          hidden_act="gelu", max_position_embeddings=512)

    @cached_property
    def state_dict(self):
        """Hugging Face's random init, fp32 on the CPU (shared by all models of this shape)."""
        key = ("state", self.model, self.layers, self.seed)
        if key not in _MODELS:
            from transformers import BertModel

            torch.manual_seed(self.seed)
            _MODELS[key] = BertModel._from_config(self.hf_config, attn_implementation="eager").state_dict()
        return _MODELS[key]

    @cached_property
    def batch_tensors(self):
        """input_ids ``(batch, seqlen)`` (0 = [PAD] at padding), attention_mask, loss target."""
        g = torch.Generator().manual_seed(self.seed)
        mask = padding_mask(self.lengths, self.seqlen, "cpu")
        ids = torch.randint(1, self.hf_config.vocab_size, (self.batch, self.seqlen), generator=g) * mask
        target = torch.randn(self.batch, self.seqlen, self.hf_config.hidden_size, generator=g) * mask[..., None]
        return ids.to(self.device), mask.long().to(self.device), target.to(self.device)

    def build(self, impl: str, backend=None, unpad=True, dtype=None):
        """A model of this shape with the shared weights loaded, on the benchmark device in
        ``dtype`` (default: the benchmark dtype); cached, and reloaded on every call."""
        dtype = dtype or self.dtype
        key = (impl, backend, unpad, self.model, self.layers, self.device, dtype)
        model = _MODELS.get(key)
        if model is None:
            with torch.device(self.device):  # initialise on the device: fast for large models
                if impl.startswith("hf-"):
                    from transformers import BertModel

                    model = BertModel._from_config(self.hf_config, attn_implementation=impl[3:])
                else:
                    from fastbert.models import BertModel

                    model = BertModel(self.hf_config, unpad=unpad, backend=backend)
            model = model.to(self.device, dtype)
            _MODELS[key] = model
        sd = {k: v.to(self.device, dtype) for k, v in self.state_dict.items()}
        model.load_state_dict(sd)  # the same keys (fastbert models are transformers PreTrainedModels)
        return model

    def reference(self, dtype):
        """Hugging Face's eager model in ``dtype`` on the first CHECK_ROWS sequences, real tokens."""
        model = self.build("hf-eager", dtype=dtype).eval()
        ids, mask, _ = self.batch_tensors
        n = min(CHECK_ROWS, self.batch)
        with torch.inference_mode():
            out = model(ids[:n], attention_mask=mask[:n]).last_hidden_state
        return out[mask[:n].bool()].clone()

    def select(self, out):
        """Real tokens of the first CHECK_ROWS sequences of a ``(batch, seqlen, hidden)`` output."""
        mask = self.batch_tensors[1]
        n = min(CHECK_ROWS, self.batch)
        return out[:n][mask[:n].bool()]


def _forward_fn(model, setup: _Setup, precomputed: bool):
    ids, mask, _ = setup.batch_tensors
    if precomputed:  # fastbert unpadded: packing metadata outside the timed/captured region
        from fastbert.models import unpad_metadata

        indices, cu_seqlens, max_seqlen = unpad_metadata(mask)
        return lambda: model(ids, attention_mask=mask, indices=indices, cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen).last_hidden_state
    return lambda: model(ids, attention_mask=mask).last_hidden_state


def _cuda_graph(fn):
    """Capture ``fn()`` (after warm-up on a side stream) and return ``(replay, static_output)``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _prepare(setup: _Setup, impl: str, mode: str, backend=None, unpad=True, graph=False,
             compiled=False) -> Prepared:
    model = setup.build(impl, backend, unpad)
    model.eval()
    fwd = _forward_fn(model, setup, precomputed=graph and impl == "fastbert" and unpad)
    if compiled:
        fwd = _forward_fn(torch.compile(model), setup, precomputed=False)

    def check():
        model.eval()
        with torch.inference_mode():
            return setup.select(fwd())

    if mode == "infer":
        if graph:
            replay, out = _cuda_graph(fwd)
            return Prepared(run=replay, result=lambda: (replay(), setup.select(out))[1])

        def run():
            with torch.inference_mode():
                return fwd()
        return Prepared(run=run, result=check)

    _, _, target = setup.batch_tensors
    target = target.to(setup.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = (fwd().float() * target).sum()
        loss.backward()
        optimizer.step()

    return Prepared(run=step, result=check)


def _fastbert_variants(mode: str, graphs: bool) -> list[tuple[str, bool, bool]]:
    """``(label, unpad, cuda_graph)`` of the fastbert rows of a mode."""
    if mode == "train":
        return [("fastbert", True, False)]
    return [("fastbert", True, False), ("fastbert-padded", False, False)] + (
        [("fastbert+graph", True, True)] if graphs else [])


def _fastbert_impls(setup: _Setup, mode: str, variant, shape, opts: Options) -> list[Impl]:
    """One row per fastbert backend; a backend runs the encoder when it takes all three ops with
    the features this mode uses (varlen or padded attention, dropout when training)."""
    label, unpad, graph = variant
    device = torch.device(opts.device).type
    dropout = {"dropout"} if mode == "train" else set()
    calls = [CallInfo("attention", device, opts.dtype, shape.head_dim,
                      frozenset({"varlen" if unpad else "attention_mask"} | dropout)),
             CallInfo("layer_norm", device, opts.dtype, None,
                      frozenset({"weight", "bias", "residual", "x_bias"} | dropout)),
             CallInfo("gelu", device, opts.dtype, None, frozenset({"bias"}))]
    listed = [fastbert_backends(c, opts) for c in calls]
    impls = []
    for name, _, default in listed[0]:
        reasons = [r for per_op in listed for n, r, _ in per_op if n == name and r]
        reason = emulated_skip(name, opts.device) or ("; ".join(dict.fromkeys(reasons)) or None)
        impls.append(Impl(f"{label}[{name}]", "fastbert", skip=reason, default=default and label == "fastbert",
                          prepare=lambda n=name, s=setup, m=mode: _prepare(s, "fastbert", m, backend=n,
                                                                           unpad=unpad, graph=graph)))
    return impls


def cases(opts: Options) -> list[Case]:
    """Every encoder case of ``opts``: model shapes x sequence lengths x modes (infer, train)."""
    _MODELS.clear()
    out = []
    gpu = opts.device != "cpu"
    _, hf_reason = optional_import("transformers")
    for model in opts.models:
        layers = num_layers(opts, model)
        shape = MODEL_SHAPES[model]
        for mode in opts.encoder_modes:
            for seqlen, batch in sizes(opts):
                setup = _Setup(model, layers, batch, seqlen, opts)
                impls = [impl for variant in _fastbert_variants(mode, gpu and opts.cuda_graphs)
                         for impl in _fastbert_impls(setup, mode, variant, shape, opts)]
                for kind in ("sdpa", "eager"):
                    impls.append(Impl(f"hf-{kind}", "competitor", skip=hf_reason,
                                      prepare=lambda k=kind, s=setup, m=mode: _prepare(s, f"hf-{k}", m)))
                if mode == "infer" and gpu and opts.cuda_graphs:
                    impls.append(Impl("hf-sdpa+graph", "competitor", skip=hf_reason,
                                      prepare=lambda s=setup: _prepare(s, "hf-sdpa", "infer", graph=True)))
                if mode == "infer":
                    impls.append(Impl("hf-sdpa+compile", "competitor",
                                      skip=hf_reason or (None if opts.compile else
                                                         "torch.compile competitors are off (--quick or --no-compile)"),
                                      prepare=lambda s=setup: _prepare(s, "hf-sdpa", "infer", compiled=True)))
                fill = sum(setup.lengths) / (batch * seqlen)
                out.append(Case(
                    op="encoder", direction=mode,
                    label=f"{model} L{layers} b{batch} s{seqlen} fill{fill:.2f}",
                    params=dict(model=model, layers=layers, batch=batch, seqlen=seqlen, fill=fill,
                                hidden=shape.hidden_size, seqlens=list(setup.lengths),
                                optimizer="AdamW" if mode == "train" else None,
                                dropout=0.1 if mode == "train" else 0.0),
                    x=seqlen, x_tick=f"{batch}x{seqlen}", x_name="batch x seqlen", dtype=opts.dtype,
                    device=opts.device,
                    work=encoder_tokens(setup.lengths),
                    reference=lambda s=setup: (s.reference(torch.float64), s.reference(s.dtype)),
                    impls=impls, check_factor=3.0, floor_eps=64.0,
                    notes=(["train: forward + backward + AdamW step, dropout 0.1; checked on the "
                            "eval-mode forward before the first step"] if mode == "train" else [])))
    return out
