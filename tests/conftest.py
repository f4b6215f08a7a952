"""Fixtures shared by the test files."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU tensors under Triton's interpreter. Chosen once, before any test module imports
# torch or transformers code that touches triton: a test file setting it at its own import, after others ran
# transformers, saw its kernels fail to call their @triton.jit helpers ("outside of the scope of a kernel").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny matmuls gain nothing from threads, and on a shared 2-core
    machine a second OpenMP thread that waits for a busy core makes each step 5-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native CPU kernels (param2moe.kernels.cpu) with no library loaded, their switches read from the
    environment again, and an empty cache directory (returned); their state is restored afterwards."""
    from param2moe.kernels import cpu as native

    saved = dict(native._state, libs=dict(native._state["libs"]))
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    native._state.update(libs={}, enabled=None, moe_enabled=None)
    yield cache / "param2moe"
    native._state.clear()
    native._state.update(saved)


@pytest.fixture
def failing_compiler(fresh_native, monkeypatch, tmp_path):
    """`fresh_native`, with CC a compiler that always fails."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))


@pytest.fixture(params=["simd", "generic"])
def native_path(request):
    """The native CPU kernels' SIMD code (AVX-512 where the CPU has it), then their plain C code."""
    from param2moe.kernels import cpu as native

    native._state["generic"] = request.param == "generic"
    yield request.param
    native._state["generic"] = False
