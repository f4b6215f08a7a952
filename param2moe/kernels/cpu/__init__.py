"""Native CPU kernels, in plain C, built on first use with the system C compiler and loaded with ctypes.

`paged_decode` (paged_decode.c): attention of one query token per sequence over the paged KV cache, K and V
read once straight through the block table (the torch path gathers each sequence's blocks into a copy and runs
SDPA on it: three passes over the KV). It can also run the QK-norm and RoPE of q and the new k and store the
step's new k and v in the cache first: the attention step in one call.

`moe_decode` (moe_decode.c): the routed experts of a decode step in one call (pairs grouped by expert in C, each
expert's weights streamed once for all its rows), instead of two oneDNN calls per expert plus the torch
bookkeeping around them. `P2M_CPU_NATIVE_MOE=0` turns it off alone. `dense_linear` runs its tiles as a linear
layer (one or two rows: oneDNN's call costs more than the product there).

`add_rms_norm` and `gate_route` (decode_ops.c): the residual add + RMSNorm and the router in one call each (in
torch 6-15 small ops of a few microseconds each, much of a batch-1 decode step on a small model).

`quant_linear`, `quant_moe` and `quant_mlp` (quant_decode.c): a linear layer, the routed experts of a MoE
layer and an MLP on int8 / int4 weights (param2moe/quant/formats.py), dequantized in registers, the activations
quantized to int8 per block of 128 columns (VNNI dot products; AMX tiles from 8 rows where the CPU has them).
`P2M_CPU_NATIVE_MOE=0` turns quant_moe off as well.

The library is compiled (`cc -O3 -march=native -fopenmp -shared -fPIC`, about 0.3 s) on the first CPU decode
call, not at import, into a per-user cache directory ($XDG_CACHE_HOME or ~/.cache, then param2moe/) under a
name keyed by a hash of the source, the compiler, its flags and the host CPU's features; later processes load
it from there. A library is loaded from the cache only where the directory and the file belong to this user
and nobody else may write them, and the file's SHA-256 matches the one recorded beside it when it was built
(`<library>.sha256`, which names the source key too); otherwise it is built again (into a private temporary
directory when the cache directory itself is not safe). Without a compiler, or when the build or the load
fails, the callers fall back to the torch path (one log line). `P2M_CPU_NATIVE=0` in the environment turns the
native kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from ...mapped import RowPieces

log = logging.getLogger("param2moe")

_SRC = Path(__file__).with_name("paged_decode.c")
_MOE_SRC = Path(__file__).with_name("moe_decode.c")
_QUANT_SRC = Path(__file__).with_name("quant_decode.c")
_OPS_SRC = Path(__file__).with_name("decode_ops.c")
_COMMON_HEADER = Path(__file__).with_name("cpu_common.h")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# libs: ("paged_decode", query heads per KV head, head size) or ("moe_decode",) -> the library built, or None
# where that failed;
# generic: skip the SIMD path (tests).
_state: dict = {"libs": {}, "enabled": None, "moe_enabled": None, "generic": False}


def enabled() -> bool:
    """Whether the native kernels may run: P2M_CPU_NATIVE is not 0 (paged_decode still returns None where the
    library cannot be built)."""
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("P2M_CPU_NATIVE", "1") != "0"
    return _state["enabled"]


def available(group: int = 4, head_dim: int = 64) -> bool:
    """Enabled, and the library for this shape builds and loads (building it now if need be)."""
    return enabled() and _lib(group, head_dim) is not None


def set_enabled(on: bool | None) -> None:
    """Force the native kernels on or off (None: decide from the environment again)."""
    _state["enabled"] = on


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "param2moe"


def _private(path: Path) -> bool:
    """Whether path belongs to this user and no one else may write it."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _library_dir() -> Path:
    """The cache directory (made private to this user), or a private temporary directory for this process
    where the cache directory is someone else's or others may write it."""
    cache = _cache_dir()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass
    if _private(cache):
        return cache
    if _state.get("private_dir") is None:
        _state["private_dir"] = Path(tempfile.mkdtemp(prefix="param2moe-kernels-"))
        log.warning("param2moe: %s is not private to this user; the native CPU kernels are built in %s instead",
                    cache, _state["private_dir"])
    return _state["private_dir"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(lib: Path, key: str) -> bool:
    """Whether the cached library is the one built for this source key: ours, private, and its hash the one
    recorded beside it."""
    record = lib.with_name(lib.name + ".sha256")
    if not lib.exists():
        return False
    try:
        recorded = record.read_text().split()
    except OSError:
        recorded = []
    if _private(lib) and _private(record) and recorded == [_digest(lib), key]:
        return True
    log.warning("param2moe: %s is not the library recorded when it was built (hash, owner or permissions); "
                "building it again", lib)
    return False


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _build(src_path: Path, defines: tuple[str, ...] = (), more: tuple[Path, ...] = ()) -> Path | None:
    """The library built from src_path (and the sources `more`, with these -D defines) in the cache directory,
    compiled first if it is not there."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.info("param2moe: no C compiler found; the CPU kernels of %s stay on the torch path", src_path.name)
        return None
    src = b"\0".join(p.read_bytes() for p in (src_path, *more, _COMMON_HEADER))  # with the header they include
    flags = [*_FLAGS, *(f"-D{d}" for d in defines)]
    key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), _cpu_features().encode()]))
    key = key.hexdigest()
    out = _library_dir() / f"{src_path.stem}-{key[:16]}.so"
    if _verified(out, key):
        return out
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        # The library needs libgomp.so.1 by soname: torch's CPU builds have loaded theirs by then, and the
        # dynamic loader reuses it, so the process keeps one OpenMP thread pool.
        r = subprocess.run([cc, *flags, str(src_path), *map(str, more), "-o", tmp, "-lm"], capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            log.info("param2moe: building the native CPU kernels failed (torch path instead): %s",
                     (r.stderr or r.stdout).strip()[-500:])
            return None
        os.chmod(tmp, 0o700)
        digest = _digest(Path(tmp))
        _write_private(out.with_name(out.name + ".sha256"), f"{digest} {key}\n")
        os.replace(tmp, out)
        return out
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_private(path: Path, text: str) -> None:
    """Write text to path (owner-only, replaced whole)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(key, src_path: Path, defines: tuple[str, ...], setup, more: tuple[Path, ...] = ()):
    """The library for key (built from src_path and `more` with defines, then setup(lib) declares its functions),
    loaded once; None where building or loading failed (remembered)."""
    libs = _state["libs"]
    if key in libs:
        return libs[key]
    libs[key] = None
    try:
        path = _build(src_path, defines, more)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
        setup(lib)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        log.info("param2moe: native CPU kernels unavailable (torch path instead): %s", e)
        return None
    libs[key] = lib
    return lib


def _setup_paged_decode(lib) -> None:
    i64, i32, p, f = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    fn = lib.p2m_paged_decode
    fn.restype = i32
    fn.argtypes = [p, i64, i64, i32,  # q, token / head strides, bf16
                   p, p, i32, i64,  # k_cache, v_cache, bf16, num_blocks
                   p, i64, p,  # block_tables, row stride, context_lens
                   p, i32, i32, i32, i32, i32, f,  # out, B, nh, nkv, D, block_size, scale
                   p, i64, i64, p, i64, i64, p,  # k_new, strides, v_new, strides, slots
                   p, p, i32, p, p, i32, f,  # q_w, k_w, w bf16, cos, sin, half, eps
                   i32, i32]  # threads, generic


def _lib(group: int, head_dim: int):
    """The paged-decode library. Its SIMD path is built for one shape (constants let the compiler keep the
    accumulators in registers: 2x faster than a general one)."""
    return _load(("paged_decode", group, head_dim), _SRC, (f"P2M_G={group}", f"P2M_D={head_dim}"),
                 _setup_paged_decode)


def _setup_moe(lib) -> None:
    i32, p = ctypes.c_int, ctypes.c_void_p
    fn = lib.p2m_moe_decode
    fn.restype = i32
    fn.argtypes = [p, i32, p, p, p, p, i32, p, p, p,  # x, bf16, w13, w2, their piece tables, bf16, weights, ids, out
                   i32, i32, i32, i32, i32, i32, i32]  # T, K, H, I, E, threads, generic
    _setup_dense(lib)


def _moe_lib():
    return _load(("moe_decode",), _MOE_SRC, (), _setup_moe)


def _setup_dense(lib) -> None:
    i32, p = ctypes.c_int, ctypes.c_void_p
    fn = lib.p2m_dense_linear
    fn.restype = i32
    fn.argtypes = [p, p, p, p, i32, i32, i32, i32, i32, i32, i32]  # x, w, bias, out, bf16, out bf16, T, K, N,
    #                                                                 threads, generic


def dense_linear(x, w, bias=None, out_dtype=None):
    """x @ w.T + bias at decode sizes (moe_decode.c's tiles, one call; oneDNN costs ~60-80 us a call in
    overhead): x [T, K], w [N, K], bias [N] of one dtype (float32 or bfloat16), out in it or float32. None where
    the kernel does not take the inputs."""
    out_dtype = out_dtype or x.dtype
    if not isinstance(w, torch.Tensor) or not enabled() or x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    if x.dim() != 2 or w.dtype != x.dtype:
        return None
    if out_dtype not in (x.dtype, torch.float32) or w.dim() != 2 or w.shape[1] != x.shape[1]:
        return None
    if not (x.is_contiguous() and w.is_contiguous()) or w.device.type != "cpu":
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return None
    lib = _moe_lib()
    if lib is None:
        return None
    out = torch.empty((x.shape[0], w.shape[0]), dtype=out_dtype)
    err = lib.p2m_dense_linear(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(),
                               out.data_ptr(), _DTYPES[x.dtype], _DTYPES[out_dtype], x.shape[0], x.shape[1],
                               w.shape[0], torch.get_num_threads(), int(_state["generic"]))
    if err:
        raise RuntimeError("native dense linear: no memory")
    return out


def moe_enabled() -> bool:
    """Whether the native routed-expert kernel may run: the native kernels are on and P2M_CPU_NATIVE_MOE is not 0."""
    if _state["moe_enabled"] is None:
        _state["moe_enabled"] = os.environ.get("P2M_CPU_NATIVE_MOE", "1") != "0"
    return enabled() and _state["moe_enabled"]


def moe_available() -> bool:
    """moe_enabled, and the library builds and loads (building it now if need be)."""
    return moe_enabled() and _moe_lib() is not None


def set_moe_enabled(on: bool | None) -> None:
    """Force the native routed-expert kernel on or off (None: decide from the environment again)."""
    _state["moe_enabled"] = on


def _moe_dims(x, w13, w2, weights, ids):
    """(tokens, hidden, experts, 2 x width) of an expert call whose shapes agree, else None."""
    t, h = x.shape
    e, i2, h1 = w13.shape
    if h1 != h or i2 % 2 or tuple(w2.shape) != (e, h, i2 // 2) or weights.shape != ids.shape or ids.shape[0] != t:
        return None
    return t, h, e, i2


def _routing_args(weights, ids):
    """The routing weights and expert ids as the C kernels read them: contiguous float32 and int64."""
    wts = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
    idx = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
    return wts, idx


def expert_pointers(w, pieces: int) -> tuple[int, int | None] | None:
    """(address of the stack, address of its piece table or None) of an expert stack [E, N, K] the native kernels
    take: a contiguous CPU tensor, or mapped.RowPieces cut into `pieces` equal pieces a matrix (gate and up: 2;
    down: 1); else None."""
    if isinstance(w, RowPieces):
        if w.device.type != "cpu" or w.pieces_per_matrix() != pieces or not w.stacked:
            return None
        table = w.pointer_table()
        return int(table[0]), table.data_ptr()
    if w.device.type != "cpu" or not w.is_contiguous():
        return None
    return w.data_ptr(), None


def moe_decode(x, w13, w2, weights, ids):
    """moe.moe_experts (its sum and roundings; see moe_decode.c) in one native call: x [T, H], w13 [E, 2I, H],
    w2 [E, H, I] of one dtype (float32 or bfloat16; tensors, or mapped.RowPieces), weights [T, K], ids [T, K] (-1:
    none). Returns [T, H] in x's dtype, or None where the kernel does not take these inputs (also: a gradient is
    wanted) or the library is not there."""
    if not moe_enabled() or x.device.type != "cpu" or x.dim() != 2 or ids.dim() != 2:
        return None
    if x.dtype not in _DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype or w13.dim() != 3 or w2.dim() != 3:
        return None
    dims = _moe_dims(x, w13, w2, weights, ids)
    if dims is None:
        return None
    t, h, e, i2 = dims
    gate_up, down = expert_pointers(w13, 2), expert_pointers(w2, 1)
    if gate_up is None or down is None:
        return None
    if torch.is_grad_enabled() and any(getattr(a, "requires_grad", False) for a in (x, w13, w2, weights)):
        return None  # no autograd here (training runs the torch path)
    lib = _moe_lib()
    if lib is None:
        return None
    x = x.contiguous()
    wts, idx = _routing_args(weights, ids)
    out = torch.empty((t, h), dtype=x.dtype)
    bf = _DTYPES[x.dtype]
    err = lib.p2m_moe_decode(x.data_ptr(), bf, gate_up[0], down[0], gate_up[1], down[1], bf, wts.data_ptr(),
                             idx.data_ptr(), out.data_ptr(), t, ids.shape[1], h, i2 // 2, e, torch.get_num_threads(),
                             int(_state["generic"]))
    if err:
        raise RuntimeError(f"native MoE experts: {'an expert id out of range' if err == 1 else 'no memory'}")
    return out


def _setup_quant(lib) -> None:
    i32, p = ctypes.c_int, ctypes.c_void_p
    fn = lib.p2m_quant_linear
    fn.restype = i32
    fn.argtypes = [p, i32, i32, i32, i32, p, p, i32, i32, i32,  # x, bf16, out bf16, T, K, q, scale, int4, group, N
                   p, p, i32, i32]  # bias, out, threads, generic
    fn = lib.p2m_quant_moe
    fn.restype = i32
    fn.argtypes = [p, i32, p, p, p, p, i32, i32,  # x, bf16, w13 q / scale, w2 q / scale, int4, group
                   p, p, p, i32, i32, i32, i32, i32, i32, i32]  # weights, ids, out, T, K, H, I, E, threads, generic


def _quant_lib():
    return _load(("quant_decode",), _QUANT_SRC, (), _setup_quant)


_QUANT_METHODS = {"int8": 0, "int4": 1}
_QB = 128  # quant_decode.c's activation block; int4 groups are a multiple of it, or 32 or 64


def _quant_ok(qw, lead: int) -> bool:
    """qw is an int8 or int4 QuantizedWeight with `lead` leading (expert) dims the kernels take, on the CPU."""
    if getattr(qw, "method", None) not in _QUANT_METHODS or len(qw.shape) != lead + 2:
        return False
    if qw.qweight.device.type != "cpu" or not (qw.qweight.is_contiguous() and qw.scale.is_contiguous()):
        return False
    if qw.scale.dtype != torch.float32 or qw.qweight.dtype != (torch.int8 if qw.method == "int8" else torch.uint8):
        return False
    if qw.method == "int4" and (not qw.group_size or qw.shape[-1] % qw.group_size
                                or (qw.group_size % _QB and qw.group_size not in (32, 64))):
        return False
    return True


def quant_linear(x, qw, bias=None, out_dtype=None):
    """x @ W.T + bias with W the int8 / int4 QuantizedWeight qw [N, K] (see quant_decode.c for the numerics:
    x is quantized to int8 per block of 128 columns). x [T, K] (or [..., K]) float32 or bfloat16; returns
    [..., N] in out_dtype (default x's; float32 for logits), or None where the native path does not take these
    inputs or is not there."""
    out_dtype = out_dtype or x.dtype
    if not enabled() or x.device.type != "cpu" or x.dtype not in _DTYPES or not _quant_ok(qw, 0):
        return None
    if out_dtype not in (x.dtype, torch.float32):
        return None
    n, k = qw.shape
    if x.shape[-1] != k or x.numel() == 0 or (bias is not None and tuple(bias.shape) != (n,)):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    lib = _quant_lib()
    if lib is None:
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    out = torch.empty((x2.shape[0], n), dtype=out_dtype)
    err = lib.p2m_quant_linear(x2.data_ptr(), _DTYPES[x.dtype], _DTYPES[out_dtype], x2.shape[0], k,
                               qw.qweight.data_ptr(), qw.scale.data_ptr(), _QUANT_METHODS[qw.method], qw.group_size,
                               n, None if b is None else b.data_ptr(), out.data_ptr(), torch.get_num_threads(),
                               int(_state["generic"]))
    if err:
        raise RuntimeError("native quantized linear: no memory")
    return out.reshape(*lead, n)


def quant_moe(x, w13, w2, weights, ids):
    """kernels.moe.moe_experts on int8 / int4 expert weights in one native call: x [T, H] float32 or bfloat16,
    w13 [E, 2W, H] (gate rows, then up rows) and w2 [E, H, W] QuantizedWeights of one method, weights [T, K],
    ids [T, K] (-1: none). Returns sum_k weights[t, k] * down_e(silu(gate_e(x)) * up_e(x)) [T, H] in x's dtype,
    or None where the native path does not take these inputs or is not there."""
    if not moe_enabled() or x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _DTYPES or ids.dim() != 2:
        return None
    if not (_quant_ok(w13, 1) and _quant_ok(w2, 1)) or w13.method != w2.method or w13.group_size != w2.group_size:
        return None
    dims = _moe_dims(x, w13, w2, weights, ids)
    if dims is None:
        return None
    t, h, e, i2 = dims
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    lib = _quant_lib()
    if lib is None:
        return None
    x = x.contiguous()
    wts, idx = _routing_args(weights, ids)
    out = torch.empty((t, h), dtype=x.dtype)
    err = lib.p2m_quant_moe(x.data_ptr(), _DTYPES[x.dtype], w13.qweight.data_ptr(), w13.scale.data_ptr(),
                            w2.qweight.data_ptr(), w2.scale.data_ptr(), _QUANT_METHODS[w13.method], w13.group_size,
                            wts.data_ptr(), idx.data_ptr(), out.data_ptr(), t, ids.shape[1], h, i2 // 2, e,
                            torch.get_num_threads(), int(_state["generic"]))
    if err:
        raise RuntimeError(f"native quantized MoE experts: {'an expert id out of range' if err == 1 else 'no memory'}")
    return out


def _setup_ops(lib) -> None:
    i32, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    fn = lib.p2m_add_rms_norm
    fn.restype = i32
    fn.argtypes = [p, p, p, i32, f, p, p, i32, i32, i32, i32]  # x, res, w, w bf16, eps, normed, res out, T, H, bf16,
    fn = lib.p2m_gate_route                                     # threads
    fn.restype = i32
    fn.argtypes = [p, i32, p, p, i32, i32, i32, i32,  # x, bf16, gate w, bias, T, H, E, K
                   i32, i32, i32, i32, f, p, p, i32, i32]  # softmax, n_group, topk_group, norm, scale, w, ids, ld,
                                                           # threads


def _ops_lib():
    return _load(("decode_ops",), _OPS_SRC, (), _setup_ops)


def add_rms_norm(x, residual, weight, eps: float):
    """(rms_norm(x + residual), x + residual) as kernels/norm.py computes them, in one call (residual None: a
    plain norm, (normed, None)). x [T, H] float32 or bfloat16; None where the kernel does not take the inputs."""
    if not enabled() or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() != 2 or not x.is_contiguous():
        return None
    if residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape
                                 or not residual.is_contiguous()):
        return None
    if weight.dtype not in _DTYPES or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    lib = _ops_lib()
    if lib is None:
        return None
    normed = torch.empty_like(x)
    res = torch.empty_like(x) if residual is not None else None
    err = lib.p2m_add_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                               _DTYPES[weight.dtype], float(eps), normed.data_ptr(),
                               None if res is None else res.data_ptr(), x.shape[0], x.shape[1], _DTYPES[x.dtype],
                               torch.get_num_threads())
    if err:
        raise RuntimeError("native add_rms_norm: no memory")
    return normed, res


def gate_route(x, gate_weight, expert_bias, top_k: int, *, score_function: str = "sigmoid", n_group=None,
               topk_group=None, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
               num_appended: int = 0):
    """kernels/routing.py gate_route in one call: (weights [T, K'] float32, ids [T, K'] int64), K' = top_k +
    num_appended. None where the kernel does not take the inputs."""
    if not enabled() or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() != 2 or not x.is_contiguous():
        return None
    e, h = gate_weight.shape
    if gate_weight.dtype != torch.float32 or not gate_weight.is_contiguous() or h != x.shape[1] or top_k > e:
        return None
    if expert_bias is not None and (expert_bias.dtype != torch.float32 or expert_bias.shape != (e,)
                                    or not expert_bias.is_contiguous()):
        return None
    if score_function not in ("sigmoid", "softmax") or (torch.is_grad_enabled() and x.requires_grad):
        return None
    grouped = n_group is not None and topk_group is not None and n_group > 1
    if grouped and (e % n_group or topk_group > n_group or top_k > topk_group * (e // n_group)):
        return None
    lib = _ops_lib()
    if lib is None:
        return None
    t, k = x.shape[0], top_k + num_appended
    weights = torch.empty((t, k), dtype=torch.float32)
    ids = torch.empty((t, k), dtype=torch.int64)
    err = lib.p2m_gate_route(x.data_ptr(), _DTYPES[x.dtype], gate_weight.data_ptr(),
                             None if expert_bias is None else expert_bias.data_ptr(), t, h, e, top_k,
                             int(score_function == "softmax"), n_group if grouped else 0, topk_group if grouped else 0,
                             int(norm_topk_prob), float(routed_scaling_factor), weights.data_ptr(), ids.data_ptr(),
                             k, torch.get_num_threads())
    if err:
        raise RuntimeError("native gate_route: no memory")
    if num_appended:
        weights[:, top_k:] = 1.0
        ids[:, top_k:] = torch.arange(e, e + num_appended)
    return weights, ids


def quant_mlp(x, gate_up, down):
    """down(silu(gate(x)) * up(x)) on int8 / int4 QuantizedWeights gate_up [2W, H] (gate rows, then up rows) and
    down [H, W]: quant_moe with them as one expert every token takes with weight 1 (one call instead of two
    quant_linear and the activation between). x [T, H]; None where the kernel does not take the inputs."""
    if x.dim() != 2 or getattr(gate_up, "method", None) not in _QUANT_METHODS or len(gate_up.shape) != 2:
        return None
    if getattr(down, "method", None) != gate_up.method or len(down.shape) != 2:
        return None
    one = [type(w)(w.method, w.qweight[None], w.scale[None], (1, *w.shape), w.group_size) for w in (gate_up, down)]
    t = x.shape[0]
    return quant_moe(x, *one, torch.ones(t, 1), torch.zeros(t, 1, dtype=torch.int64))


def _i32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 and x.stride(-1) == 1 else x.to(torch.int32).contiguous()


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale: float, max_context_len: int,
                 new_kv=None, norm_rope=None):
    """Single-query paged attention (see attention.paged_attention, whose decode results it reproduces):
    q [B, nh, D] (one token per sequence, in order), context_lens [B] including the new token, block_tables
    [B, max_blocks]. new_kv = (k, v, slot_mapping): store k, v [B, nkv, D] at their slots first. norm_rope =
    (q_weight, k_weight, cos, sin, eps) with new_kv: rope.qk_norm_rope on q and the new k first (in the same
    call). Returns [B, nh, D] in q's dtype, or None when these inputs are not ones the kernel takes (nothing
    written then)."""
    if not enabled() or not _usable(q, k_cache, v_cache, block_tables, context_lens, max_context_len, new_kv):
        return None
    nr = _norm_rope_args(q, norm_rope) if norm_rope is not None else (None, None, 0, None, None, 0, 0.0)
    if nr is None or (norm_rope is not None and new_kv is None):
        return None
    b, nh, d = q.shape
    nblocks, bs, nkv, _ = k_cache.shape
    lib = _lib(nh // nkv, d)
    if lib is None:
        return None
    tables, lens = _i32(block_tables), _i32(context_lens)
    out = torch.empty((b, nh, d), dtype=q.dtype)
    kn = vn = slots = None
    ks = vs = (0, 0)
    if new_kv is not None:
        kn, vn, slots = new_kv
        slots = slots if slots.dtype == torch.int64 and slots.stride(0) == 1 else slots.to(torch.int64).contiguous()
        ks, vs = kn.stride()[:2], vn.stride()[:2]
    err = lib.p2m_paged_decode(
        q.data_ptr(), q.stride(0), q.stride(1), _DTYPES[q.dtype],
        k_cache.data_ptr(), v_cache.data_ptr(), _DTYPES[k_cache.dtype], nblocks,
        tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        out.data_ptr(), b, nh, nkv, d, bs, float(scale),
        kn.data_ptr() if kn is not None else None, ks[0], ks[1],
        vn.data_ptr() if vn is not None else None, vs[0], vs[1],
        slots.data_ptr() if slots is not None else None, *(a.data_ptr() if isinstance(a, torch.Tensor) else a
                                                            for a in nr),
        torch.get_num_threads(), int(_state["generic"]))
    if err:
        raise RuntimeError("native paged decode attention: "
                           f"{'a block id or slot out of range' if err == 1 else 'no memory'}")
    return out


def _norm_rope_args(q, norm_rope):
    """paged_decode's QK-norm / RoPE arguments (q_w, k_w, w_bf16, cos, sin, half, eps), or None where the kernel
    does not take them."""
    qw, kw, cos, sin, eps = norm_rope
    d = q.shape[-1]
    if (qw is None) != (kw is None):
        return None
    if qw is not None and (qw.dtype not in _DTYPES or kw.dtype != qw.dtype or qw.shape != (d,) or kw.shape != (d,)
                           or not (qw.is_contiguous() and kw.is_contiguous())):
        return None
    if cos is not None:
        if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.dim() != 2 or cos.shape != sin.shape:
            return None
        if cos.shape[0] != q.shape[0] or 2 * cos.shape[1] > d:
            return None
        cos, sin = cos.contiguous(), sin.contiguous()
    return (qw, kw, _DTYPES[qw.dtype] if qw is not None else 0, cos, sin, 0 if cos is None else cos.shape[1],
            float(eps))


def _usable(q, k_cache, v_cache, block_tables, context_lens, max_context_len, new_kv) -> bool:
    if q.device.type != "cpu" or q.dim() != 3 or k_cache.dim() != 4 or q.dtype not in _DTYPES:
        return False
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or v_cache.device.type != "cpu":
        return False
    b, nh, d = q.shape
    _, bs, nkv, dk = k_cache.shape
    if dk != d or nkv == 0 or nh % nkv or q.stride(2) != 1 or b == 0:
        return False
    if block_tables.dim() != 2 or block_tables.shape[0] != b or context_lens.shape != (b,):
        return False
    if max_context_len > block_tables.shape[1] * bs:  # a context past its table
        return False
    if new_kv is not None:
        k, v, slots = new_kv
        for x in (k, v):
            if x.dtype != k_cache.dtype or x.shape != (b, nkv, d) or x.stride(2) != 1 or x.device.type != "cpu":
                return False
        if slots.shape != (b,):
            return False
    return True
