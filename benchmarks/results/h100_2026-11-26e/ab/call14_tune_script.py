import torch, itertools, json, sys
from param2moe.kernels.triton import moe as TM
torch.manual_seed(0)
dev = "cuda"; bf = torch.bfloat16
E, H, I = 66, 2048, 2048
w13 = (torch.randn(E, 2 * I, H, device=dev) * 0.02).to(bf)
w2 = (torch.randn(E, H, I, device=dev) * 0.02).to(bf)
def g(bn, bk, w, s, gm=1): return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s)
def timeit(t, cfg, n=40):
    x = torch.randn(t, H, device=dev).to(bf)
    ids = torch.cat([torch.rand(t, 64, device=dev).topk(6).indices, torch.tensor([[64, 65]], device=dev).expand(t, 2)], 1).contiguous()
    wts = torch.rand(t, 8, device=dev)
    f = lambda: TM.moe_experts(x, w13, w2, wts, ids, config=cfg, unsummed=True)
    for _ in range(3): f()
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        f()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    gr.replay(); a.record()
    for _ in range(n): gr.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3
res = {}
for t in map(int, sys.argv[1:]):
    cur = TM.get_config(t, E, H, I, 8, bf)
    base = timeit(t, cur); res[f"{t} table"] = base; print(t, "table", round(base, 1), cur, flush=True)
    bm = cur["BLOCK_M"]
    gus = [g(64,128,4,3), g(64,128,4,4), g(128,128,4,3), g(128,64,4,4), g(64,256,4,3), g(128,128,8,3), g(128,64,8,4), g(256,64,8,3)]
    dns = [g(128,128,8,3), g(64,128,4,4), g(128,64,4,4), g(64,256,4,3), g(128,128,4,3), g(256,64,8,3), g(128,64,8,4)]
    best_gu, best = cur["gate_up"], base
    for gu in gus:
        c = dict(cur, gate_up=gu)
        try: ms = timeit(t, c)
        except Exception as e: print("fail", gu, e); continue
        res[f"{t} gu {gu}"] = ms; print(t, "gu", round(ms, 1), gu, flush=True)
        if ms < best: best, best_gu = ms, gu
    best_dn = cur["down"]
    for dn in dns:
        c = dict(cur, gate_up=best_gu, down=dn)
        try: ms = timeit(t, c)
        except Exception as e: print("fail", dn, e); continue
        res[f"{t} dn {dn}"] = ms; print(t, "dn", round(ms, 1), dn, flush=True)
        if ms < best: best, best_dn = ms, dn
    for bm2 in (16, 64):
        c = dict(BLOCK_M=bm2, gate_up=best_gu, down=best_dn)
        try: ms = timeit(t, c)
        except Exception as e: print("fail bm", bm2, e); continue
        res[f"{t} bm{bm2}"] = ms; print(t, "bm", bm2, round(ms, 1), flush=True)
    print(t, "BEST", round(best, 1), "vs table", round(base, 1), json.dumps(dict(BLOCK_M=bm, gate_up=best_gu, down=best_dn)), flush=True)
json.dump(res, open(__import__("os").environ.get("OUT", "/tmp") + "/tune256.json", "w"), indent=1)
