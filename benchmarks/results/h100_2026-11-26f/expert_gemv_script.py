# ruff: noqa
# The script that made expert_gemv.json, as run (against the code of c88a1dc: it times that commit's
# tile kernels through moe.gate_up/down and single_token_align, since replaced by the one-token GEMVs).
"""Microbenchmark (`python benchmarks/expert_gemv.py out.json` on the GPU): one-token expert GEMMs, tensor-core tiles (as shipped) vs GEMV-style (whole weight rows
loaded at once, no K loop), Param2 shapes, 8 pairs (6 routed + 2 shared pieces) of 64+2 experts."""
import json, sys, torch, triton, triton.language as tl
from param2moe.kernels.triton import moe as M
from param2moe.kernels.triton.moe_configs import get_config

@triton.jit
def _silu_mul1(g, u, dt: tl.constexpr):
    g = g.to(dt).to(tl.float32); u = u.to(dt).to(tl.float32)
    return ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt)

@triton.jit
def gate_up_gemv(x_ptr, w_ptr, out_ptr, ids_ptr, N, stride_we, stride_wn, stride_ot, H: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    col = pid // num_n
    e = tl.load(ids_ptr + col).to(tl.int64)
    n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    base = w_ptr + e * stride_we
    g = tl.load(base + n[:, None].to(tl.int64) * stride_wn + h[None, :])
    u = tl.load(base + (N + n)[:, None].to(tl.int64) * stride_wn + h[None, :])
    x = tl.load(x_ptr + h).to(tl.float32)
    ag = tl.sum(g.to(tl.float32) * x[None, :], axis=1)
    au = tl.sum(u.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + col * stride_ot + n, _silu_mul1(ag, au, out_ptr.dtype.element_ty))

@triton.jit
def down_gemv(a_ptr, w_ptr, out_ptr, ids_ptr, N, stride_at, stride_we, stride_wn, stride_ot, I: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    col = pid // num_n
    e = tl.load(ids_ptr + col).to(tl.int64)
    n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, BLOCK_I)
    w = tl.load(w_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn + i[None, :])
    a = tl.load(a_ptr + col * stride_at + i).to(tl.float32)
    tl.store(out_ptr + col * stride_ot + n, tl.sum(w.to(tl.float32) * a[None, :], axis=1).to(out_ptr.dtype.element_ty))

def timeit(fn, reps=50):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 1e9
    for _ in range(5):
        s.record(); g.replay(); e.record(); e.synchronize()
        best = min(best, s.elapsed_time(e) * 1e3 / reps)
    return best

torch.manual_seed(0)
E, H, I, K = 66, 2048, 2048, 8
bf = torch.bfloat16
w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=bf) * 0.02
w2 = torch.randn(E, H, I, device="cuda", dtype=bf) * 0.02
x = torch.randn(1, H, device="cuda", dtype=bf)
res = {}
for trial in range(3):
    ids = torch.cat([torch.randperm(64, device="cuda")[:6], torch.tensor([64, 65], device="cuda")])[None]
    cfg = get_config(1, E, H, I, K, bf)
    bm = cfg["BLOCK_M"]
    align = M.single_token_align(ids, bm)
    inter_ref = M.gate_up(x, w13, align, K, bm, cfg["gate_up"])
    out_ref = M.down(inter_ref, w2, align, K, bm, cfg["down"])
    bytes_gu, bytes_dn = K * 2 * I * H * 2, K * H * I * 2
    res.setdefault("mma_gate_up", []).append(timeit(lambda: M.gate_up(x, w13, align, K, bm, cfg["gate_up"])))
    res.setdefault("mma_down", []).append(timeit(lambda: M.down(inter_ref, w2, align, K, bm, cfg["down"])))
    flat = ids.reshape(-1)
    inter = torch.empty(K, I, device="cuda", dtype=bf)
    for bn, warps in [(1, 2), (1, 4), (2, 2), (2, 4), (2, 8), (4, 4)]:
        f = lambda: gate_up_gemv[(K * I // bn,)](x, w13, inter, flat, I, w13.stride(0), w13.stride(1), inter.stride(0), H=H, BLOCK_N=bn, BLOCK_H=H, num_warps=warps)
        res.setdefault(f"gemv_gate_up_bn{bn}_w{warps}", []).append(timeit(f))
        f()
        err = (inter.float() - inter_ref[::bm].float()).abs().max().item()
        res.setdefault(f"gemv_gate_up_bn{bn}_w{warps}_maxerr", []).append(err)
    out = torch.empty(K, H, device="cuda", dtype=bf)
    a = inter_ref[::bm].contiguous()
    for bn, warps in [(1, 2), (2, 2), (2, 4), (4, 2), (4, 4), (8, 4)]:
        f = lambda: down_gemv[(K * H // bn,)](a, w2, out, flat, H, a.stride(0), w2.stride(0), w2.stride(1), out.stride(0), I=I, BLOCK_N=bn, BLOCK_I=I, num_warps=warps)
        res.setdefault(f"gemv_down_bn{bn}_w{warps}", []).append(timeit(f))
        f()
        res.setdefault(f"gemv_down_bn{bn}_w{warps}_maxerr", []).append((out.float() - out_ref.float()).abs().max().item())
    src = torch.empty(bytes_gu // 2, device="cuda", dtype=bf); dst = torch.empty_like(src)
    res.setdefault("copy_gate_up_bytes(r+w)", []).append(timeit(lambda: dst.copy_(src)))
print(torch.cuda.get_device_name())
for k, v in res.items():
    if k.endswith("maxerr"):
        print(f"{k:<32} {max(v):.2e}")
    else:
        b = bytes_gu if "gate_up" in k else bytes_dn
        print(f"{k:<32} {min(v):8.2f} us  {b / min(v) / 1e6:7.3f} TB/s (weights read)")
json.dump(res, open(sys.argv[1], "w"), indent=1)
