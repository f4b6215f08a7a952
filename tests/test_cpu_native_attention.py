"""The native CPU decode attention (param2moe/kernels/cpu/paged_decode.c) against the torch path
(kernels/attention.py, the oracle) on fresh random inputs, its KV-cache write, the dispatch from
kernels.paged_attention, and the fallback when it is off or cannot be built."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from param2moe import kernels
from param2moe.kernels import cpu as native
from param2moe.kernels.attention import paged_attention, write_kv_cache
from param2moe.kernels.norm import rms_norm
from param2moe.kernels.rope import qk_norm_rope

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no C compiler (or the native CPU kernels failed to build)")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def _inputs(ctxs, nh, nkv, d, bs, dtype, seed, extra_cols=1, poison=True):
    """A shuffled paged cache holding len(ctxs) sequences; table columns past each context are -1, plus
    extra_cols unused columns; unwritten cache slots hold NaN (a kernel reading them would show)."""
    g = torch.Generator().manual_seed(seed)
    b = len(ctxs)
    width = max(-(-c // bs) for c in ctxs) + extra_cols
    nblocks = b * width + 5
    kc = torch.randn(nblocks, bs, nkv, d, generator=g).to(dtype)
    vc = torch.randn(nblocks, bs, nkv, d, generator=g).to(dtype)
    table = torch.full((b, width), -1, dtype=torch.int32)
    perm = torch.randperm(nblocks, generator=g)
    used = torch.zeros(nblocks, bs, dtype=torch.bool)
    for i, c in enumerate(ctxs):
        n = -(-c // bs)
        table[i, :n] = perm[i * width:i * width + n].int()
        for j in range(c):
            used[table[i, j // bs], j % bs] = True
    if poison:
        kc[~used] = float("nan")
        vc[~used] = float("nan")
    q = torch.randn(b, nh, d, generator=g).to(dtype)
    return q, kc, vc, table, torch.tensor(ctxs, dtype=torch.int32)


def _oracle(q, kc, vc, table, lens, scale):
    qsl = torch.arange(q.shape[0] + 1)
    return paged_attention(q, kc, vc, table, lens, qsl, scale, 1, int(lens.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_matches_torch_path(dtype, group, d, native_path):
    bs, nkv = 16, 2
    ctxs = [1, 2, bs - 1, bs, bs + 1, 2 * bs, 3 * bs + 5, 150]  # one token, block edges, many blocks
    q, kc, vc, table, lens = _inputs(ctxs, nkv * group, nkv, d, bs, dtype, seed=d * 10 + group)
    scale = 1 / math.sqrt(d)
    out = native.paged_decode(q, kc, vc, table, lens, scale, int(lens.max()))
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    ref = _oracle(q, kc, vc, table, lens, scale)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh, nkv, d", [(3, 1, 48), (6, 2, 80), (8, 1, 64), (16, 2, 16)])
def test_other_shapes(nh, nkv, d, dtype, native_path):
    """Groups of 3 and 8, head sizes not a power of two (80) or not a multiple of 16 (48)."""
    ctxs = [1, 7, 16, 17, 64, 99]
    q, kc, vc, table, lens = _inputs(ctxs, nh, nkv, d, 16, dtype, seed=nh * d)
    out = native.paged_decode(q, kc, vc, table, lens, 0.3, int(lens.max()))
    torch.testing.assert_close(out, _oracle(q, kc, vc, table, lens, 0.3), **TOL[dtype])


@pytest.mark.parametrize("bs", [1, 8, 32, 48])
def test_block_sizes_and_strided_query(bs, native_path):
    """Other block sizes, a query that is a strided view, int64 tables and lengths, and a wide table."""
    ctxs = [1, bs, bs + 1, 5 * bs + 3]
    q, kc, vc, table, lens = _inputs(ctxs, 8, 2, 64, bs, torch.float32, seed=bs, extra_cols=4)
    wide = torch.randn(q.shape[0], 8, 96)
    wide[..., :64] = q
    qv = wide[..., :64]
    assert not qv.is_contiguous()
    out = native.paged_decode(qv, kc, vc, table.long(), lens.long(), 0.1, int(lens.max()))
    torch.testing.assert_close(out, _oracle(q, kc, vc, table, lens, 0.1), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_new_kv_then_attends(dtype, native_path):
    """new_kv: the step's k, v stored at their slots (v a strided view, as from a fused projection) before the
    attention, with the same cache contents and output as write_kv_cache + the torch path."""
    bs, nkv, d = 16, 2, 64
    ctxs = [1, 17, 40, 16]
    q, kc, vc, table, lens = _inputs(ctxs, 8, nkv, d, bs, dtype, seed=7)
    b = len(ctxs)
    pos = lens.long() - 1
    slots = table.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    g = torch.Generator().manual_seed(3)
    k = torch.randn(b, nkv, d, generator=g).to(dtype)
    v = torch.randn(b, 2 * nkv, d, generator=g).to(dtype)[:, nkv:]
    kc2, vc2 = kc.clone(), vc.clone()
    out = native.paged_decode(q, kc, vc, table, lens, 0.125, int(lens.max()), new_kv=(k, v, slots))
    write_kv_cache(k, v, kc2, vc2, slots)
    ref = _oracle(q, kc2, vc2, table, lens, 0.125)
    assert torch.equal(kc.nan_to_num(), kc2.nan_to_num()) and torch.equal(vc.nan_to_num(), vc2.nan_to_num())
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_slot_outside_the_cache_is_an_error(native_path):
    """A new token's slot past the cache: nothing written there, a clear error (not a write out of bounds)."""
    q, kc, vc, table, lens = _inputs([3, 5], 8, 2, 64, 16, torch.float32, seed=2, poison=False)
    k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    before = kc.clone()
    for norm_rope in (None, (torch.ones(64), torch.ones(64), torch.ones(2, 32), torch.zeros(2, 32), 1e-6)):
        with pytest.raises(RuntimeError, match="out of range"):
            native.paged_decode(q, kc, vc, table, lens, 0.1, 5, new_kv=(k, v, torch.tensor([2, kc.shape[0] * 16])),
                                norm_rope=norm_rope)
    changed = (kc != before).flatten(2).any(-1)  # [blocks, slots in a block]
    assert changed.nonzero().tolist() == [[0, 2]]  # the valid slot only


def test_dispatch_uses_native_and_matches():
    """kernels.paged_attention with new_kv (QK-norm, RoPE, cache write) on a CPU decode: the native path gives
    the torch path's result and cache; prefill-shaped calls stay on the torch path."""
    bs, nkv, nh, d = 16, 2, 8, 64
    ctxs = [3, 16, 33, 70]
    q, kc, vc, table, lens = _inputs(ctxs, nh, nkv, d, bs, torch.float32, seed=11)
    b = len(ctxs)
    pos = lens.long() - 1
    slots = table.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(b, nkv, d, generator=g), torch.randn(b, nkv, d, generator=g)
    qw, kw = torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    ang = pos[:, None].float() * torch.rand(d // 2, generator=g)
    nrm = (k, v, slots, qw, kw, ang.cos(), ang.sin(), 1e-6)
    qsl = torch.arange(b + 1)
    results = []
    for on in (True, False):
        native.set_enabled(on)
        try:
            k1, v1 = kc.clone(), vc.clone()
            o = kernels.paged_attention(q, k1, v1, table, lens, qsl, 0.125, 1, int(lens.max()), new_kv=nrm)
            results.append((o, k1, v1))
        finally:
            native.set_enabled(None)
    (o_nat, k_nat, v_nat), (o_ref, k_ref, v_ref) = results
    torch.testing.assert_close(o_nat, o_ref, **TOL[torch.float32])
    # k: normed and rotated in C (the same operations, another summation order in the norm)
    torch.testing.assert_close(k_nat.nan_to_num(), k_ref.nan_to_num(), atol=1e-6, rtol=1e-6)
    assert torch.equal(v_nat.nan_to_num(), v_ref.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, rot", [(True, 32), (True, 16), (False, 32), (True, 0)])
def test_fused_norm_rope(dtype, norm, rot, native_path):
    """norm_rope: QK-norm (or none) and RoPE over all of the head (32 = D / 2), part of it (partial RoPE) or
    none, in the kernel, against rope.qk_norm_rope + write_kv_cache + the torch attention. bf16: both round the
    normed and the rotated values; a value near a rounding boundary may land an ulp apart."""
    bs, nkv, nh, d = 16, 2, 8, 64
    ctxs = [1, 16, 33, 70]
    q, kc, vc, table, lens = _inputs(ctxs, nh, nkv, d, bs, dtype, seed=13)
    b = len(ctxs)
    pos = lens.long() - 1
    slots = table.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    g = torch.Generator().manual_seed(8)
    k, v = torch.randn(b, nkv, d, generator=g).to(dtype), torch.randn(b, nkv, d, generator=g).to(dtype)
    qw = (torch.rand(d, generator=g) + 0.5).to(dtype) if norm else None
    kw = (torch.rand(d, generator=g) + 0.5).to(dtype) if norm else None
    ang = pos[:, None].float() * torch.rand(rot, generator=g)
    cos, sin = (ang.cos(), ang.sin()) if rot else (None, None)
    kc2, vc2 = kc.clone(), vc.clone()
    out = native.paged_decode(q, kc, vc, table, lens, 0.125, int(lens.max()), new_kv=(k, v, slots),
                              norm_rope=(qw, kw, cos, sin, 1e-6))
    assert out is not None
    if rot:
        q2, k2 = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    elif norm:
        q2, k2 = rms_norm(q, qw, 1e-6), rms_norm(k, kw, 1e-6)
    else:
        q2, k2 = q, k
    write_kv_cache(k2, v, kc2, vc2, slots)
    tol = TOL[dtype] if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kc.nan_to_num(), kc2.nan_to_num(), **tol)
    torch.testing.assert_close(out, _oracle(q2, kc2, vc2, table, lens, 0.125), **TOL[dtype])


def test_off_by_environment_falls_back(monkeypatch):
    """P2M_CPU_NATIVE=0: paged_decode declines and kernels.paged_attention runs the torch path."""
    monkeypatch.setenv("P2M_CPU_NATIVE", "0")
    native.set_enabled(None)
    try:
        assert not native.enabled()
        q, kc, vc, table, lens = _inputs([5, 20], 4, 2, 32, 16, torch.float32, seed=1)
        assert native.paged_decode(q, kc, vc, table, lens, 0.2, 20) is None
        out = kernels.paged_attention(q, kc, vc, table, lens, torch.arange(3), 0.2, 1, 20)
        assert torch.equal(out, _oracle(q, kc, vc, table, lens, 0.2))
    finally:
        monkeypatch.delenv("P2M_CPU_NATIVE")
        native.set_enabled(None)
    assert native.enabled()


def test_no_compiler_falls_back(failing_compiler):
    """A compiler that fails (or none): no library, one log line, and the torch path still answers."""
    assert native.enabled() and not native.available(4, 32)
    q, kc, vc, table, lens = _inputs([9], 4, 1, 32, 8, torch.float32, seed=2)
    assert native.paged_decode(q, kc, vc, table, lens, 0.3, 9) is None
    out = kernels.paged_attention(q, kc, vc, table, lens, torch.arange(2), 0.3, 1, 9)
    assert torch.equal(out, _oracle(q, kc, vc, table, lens, 0.3))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_builds_into_the_cache_dir(fresh_native):
    """A fresh cache directory: the library is compiled there (no temporary files left) and loads."""
    assert native.available(2, 32)
    files = sorted(p.name for p in fresh_native.iterdir())
    assert len(files) == 2 and files[0].startswith("paged_decode-") and files[0].endswith(".so")
    assert files[1] == files[0] + ".sha256"  # its hash, checked before a later process loads it


def _reload(native_cache):
    """A new process's view: nothing loaded; returns the library path the next load would use."""
    native._state["libs"] = {}
    assert native.available(2, 32)
    return next(p for p in native_cache.iterdir() if p.suffix == ".so")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_cached_library_is_verified_before_loading(fresh_native, caplog):
    """A library in the cache that is not the one recorded at its build (changed bytes, a record for
    another source key, or no record) is built again, never loaded as it is."""
    lib = _reload(fresh_native)
    record = lib.with_name(lib.name + ".sha256")
    digest, key = record.read_text().split()
    assert digest == native._digest(lib)

    def replace(path, data: bytes) -> None:  # a new file: the loaded one stays mapped as it was
        tmp = path.with_name("tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o700)
        tmp.replace(path)

    for tamper in (lambda: replace(lib, lib.read_bytes() + b"\0"),
                   lambda: record.write_text(f"{digest} {'0' * 64}\n"),
                   lambda: record.unlink()):
        tamper()
        assert not native._verified(lib, key)
        caplog.clear()
        with caplog.at_level("WARNING", logger="param2moe"):
            assert _reload(fresh_native) == lib
        assert "building it again" in caplog.text
        assert native._verified(lib, key)
    caplog.clear()
    with caplog.at_level("WARNING", logger="param2moe"):
        _reload(fresh_native)  # verified: loaded without a rebuild
    assert "building it again" not in caplog.text


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_cache_dir_others_may_write_is_not_used(fresh_native, caplog, monkeypatch):
    fresh_native.mkdir(parents=True)
    fresh_native.chmod(0o777)
    native._state["private_dir"] = None
    with caplog.at_level("WARNING", logger="param2moe"):
        assert native.available(2, 32)
    assert "not private" in caplog.text and list(fresh_native.iterdir()) == []
    private = native._state.pop("private_dir")
    assert (private.stat().st_mode & 0o077) == 0 and any(p.suffix == ".so" for p in private.iterdir())
    shutil.rmtree(private)


def test_declines_what_it_does_not_take():
    q, kc, vc, table, lens = _inputs([4, 9], 4, 2, 32, 8, torch.float32, seed=4)
    assert native.paged_decode(q.half(), kc, vc, table, lens, 0.2, 9) is None  # fp16
    assert native.paged_decode(q, kc, vc, table[:1], lens, 0.2, 9) is None  # table rows != batch
    assert native.paged_decode(q, kc, vc, table, lens, 0.2, 10 ** 6) is None  # contexts past the table
    assert native.paged_decode(q[:, :3], kc, vc, table, lens, 0.2, 9) is None  # heads not a multiple of kv heads
