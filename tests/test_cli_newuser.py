"""What a new user meets on the command line: ``fastbert env`` fits the terminal (the CUDA build's
one-line summaries, ``_C: available=...``, 200 characters with the shipped build's fields, fold to
the width instead of running past it), and bad arguments are refused naming the flag, the expected
and the actual value instead of running something else."""

import importlib.util
import re

import pytest

from fastbert.cli import main

# _C's scalar fields as the shipped build reports them (cuda_build()["_C"] less its ptxas records)
_C_FIELDS = {"available": True, "version": "0.1.0", "host": False, "cuda_version": "13.0",
             "archs": ["80-real", "90a-real", "80-virtual"], "attention": True,
             "bindings": ["attention", "layer_norm", "gelu"], "harness": False, "compiler": "12.2.0"}


@pytest.mark.parametrize("plain", [False, True], ids=["rich", "plain"])
@pytest.mark.parametrize("columns", [80, 120])
def test_env_build_lines_fold_to_the_terminal(capsys, monkeypatch, columns, plain):
    if not plain and importlib.util.find_spec("rich") is None:
        pytest.skip("rich is not installed")
    import fastbert.backends.cuda as cuda_backend

    info = {"_C": dict(_C_FIELDS), "_C_host": {**_C_FIELDS, "host": True, "archs": []},
            "cuda_backend_unavailable_reason": "no NVIDIA driver / GPU found " * 4}
    monkeypatch.setattr(cuda_backend, "build_info", lambda: info, raising=False)
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["env", "--device", "cpu"] + (["--plain"] if plain else [])) == 0
    out = capsys.readouterr().out
    build = out[out.index("CUDA build"):]
    assert max(len(line.rstrip()) for line in build.splitlines()) <= columns, build
    # folded, not cut: every field is still there, each continuation line indented
    flat = re.sub(r"\s*\n\s+", " ", build)
    for key, value in _C_FIELDS.items():
        assert f"{key}={value}" in flat, (key, build)
    first = build.index("_C: available=True")
    if len(f"_C: {_C_FIELDS}") > columns:
        assert build[first:].splitlines()[1].startswith("    "), build


@pytest.mark.parametrize("argv, message", [
    (["env", "--head-dim", "0"], "--head-dim: expected a positive int, got 0"),
    (["bench", "--quick", "--op", "gelu", "--backend", "trition"],
     "--backend: expected names from ['cuda', 'cuda-host', 'reference', 'torch', 'triton'], got 'trition'"),
])
def test_bad_arguments_name_the_flag(capsys, argv, message):
    try:
        rc = main(argv)
    except SystemExit as exc:  # the bench runner exits with its message
        rc, err = 2, str(exc.code)
    else:
        err = capsys.readouterr().err
    assert rc == 2 and message in err, err
