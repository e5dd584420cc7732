"""What each CUDA C++ module binds (csrc/module.cpp + the binding files CMakeLists.txt links in):
the production ``fastbert._C`` has the ops and no harness, so a planted fault cannot reach it;
the harness modules (``fastbert._C_host``, the device check's ``fastbert._C_harness``) have the
self-test kernels and the faults (csrc/common/fault.h)."""

from __future__ import annotations

import pytest
import torch

from fastbert.backends.cuda import load_extension

OPS = {"attention", "layer_norm", "gelu", "geglu", "rotary"}


def _ext(name: str):
    ext = load_extension(name)
    if isinstance(ext, str):
        pytest.skip(ext)
    return ext


def test_production_module_has_the_ops_and_no_harness():
    ext = _ext("_C")
    info = ext.build_info()
    assert set(info["bindings"]) == OPS and info["attention"] and info["harness"] is False
    assert not hasattr(ext, "_harness")
    buf = torch.zeros(64)
    with pytest.raises(ValueError, match=r"fault_injection: planted faults are compiled only into the harness"):
        ext.gelu_fwd(x=buf.data_ptr(), bias=0, y=buf.data_ptr(), rows=1, hidden=8, dtype=0, device=0,
                     fault_injection=1)
    assert (buf == 0).all()


def test_host_module_has_the_ops_and_the_harness():
    ext = _ext("_C_host")
    info = ext.build_info()
    assert set(info["bindings"]) == OPS | {"harness"} and info["attention"] and info["harness"] is True
    assert callable(ext._harness)
    with pytest.raises(ValueError, match=r"fault_injection: expected >= 0, got -1"):
        ext.gelu_fwd(x=256, bias=0, y=256, rows=1, hidden=8, dtype=0, device=-1, fault_injection=-1)


def test_harness_module_binds_only_the_harness():
    ext = _ext("_C_harness")
    info = ext.build_info()
    assert info["bindings"] == ["harness"] and not info["attention"] and info["harness"] is True
    assert not hasattr(ext, "gelu_fwd")
