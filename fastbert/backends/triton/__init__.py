"""Triton backend (declared; the kernels land with the Triton issues)."""

from fastbert.backends import BackendSpec, register_backend

register_backend(BackendSpec(
    name="triton",
    module="fastbert.backends.triton",
    caps={},
    probe=lambda: "the Triton kernels are not implemented yet",
))
