"""CUDA C++ backend (declared; ``fastbert._C`` lands with the CUDA issue)."""

from fastbert.backends import BackendSpec, register_backend

register_backend(BackendSpec(
    name="cuda",
    module=None,
    caps={},
    probe=lambda: "the CUDA extension fastbert._C is not built yet",
))
