"""A small checkpoint whose next tokens are confident: random weights, then trained to memorise a corpus.

Random weights give near-ties everywhere: comparing two numerically different paths (bf16 kernels
against bf16 plain torch, or fp32) by their greedy tokens then measures how a random network amplifies
last-bit differences (expert choices flip, near-tie logits swap), not the kernels. Scaling the head
does not help (the argmax margin and the error grow together). Here the network is trained, briefly,
with Adam to memorise a fixed synthetic corpus (a few random token sequences, ids >= 30 so no special
tokens): on prefixes of those sequences every next token leads by a wide margin, as in a trained model.

The training forward and backward run the product's own network (`Param2MoEForCausalLM` with the plain
torch kernels, which are differentiable; oneDNN weight packing is turned off meanwhile, as its packed
copies would go stale), so the engine on the written folder computes the very function trained. The
router's expert bias is a load-balancing bias, not trained by gradient: it stays as written. The
trained weights go back into the folder's safetensors files under the same names, dtypes and files
(the loader's name map, `checkpoint.load_targets`, run backwards).

`python benchmarks/peaked_checkpoint.py [OUT.json]`: trains on the CPU, then compares greedy tokens of
the bf16 plain torch path against the fp32 path and against itself with matmuls summed in another order
(32 corpus prefixes x 64 steps), on the trained checkpoint and on the old random one.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

# The checkpoint of benchmarks/gpu_correctness.py: the "small" preset, deeper and with more experts.
CONFIG = {"torch_dtype": "float32", "num_hidden_layers": 6, "num_experts": 32, "num_experts_per_tok": 6}
FIRST_TOKEN = 30  # corpus ids from here up: no special tokens


def peaked_config(overrides: dict | None = None):
    from param2moe.writer import preset_config

    return preset_config("small", {**CONFIG, **(overrides or {})})


def make_corpus(vocab_size: int, n_seq: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n_seq, seq_len] random token ids in [FIRST_TOKEN, vocab_size), from the seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, vocab_size, (n_seq, seq_len), generator=g)


def corpus_prompts(corpus: torch.Tensor, n: int, min_len: int = 8, max_len: int = 200,
                   seed: int = 0) -> list[list[int]]:
    """n prefixes of the corpus sequences (round robin), of random lengths in [min_len, max_len)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len, (n,), generator=g).tolist()
    return [corpus[i % corpus.shape[0], :m].tolist() for i, m in enumerate(lens)]


class _TrainingKernels:
    """No oneDNN packing while training (its packed weight copies would go stale); restored after. The model
    itself is built on the plain torch kernels (differentiable): load_model(kernels=Kernels("torch"))."""

    def __enter__(self):
        from param2moe.kernels import matmul

        self.onednn = matmul._state["enabled"]
        matmul.set_onednn(False)

    def __exit__(self, *exc):
        from param2moe.kernels import matmul

        matmul.set_onednn(self.onednn)


def _expert_load(model, ids, pos, attn) -> list[list[int]]:
    """Tokens routed to each expert, per MoE layer, in one forward over the corpus."""
    from param2moe.model.network import MoE

    counts, hooks = [], []
    for module in model.modules():
        if isinstance(module, MoE):
            def hook(mod, args):
                a, residual, norm = args  # the attention output; the post-attention norm makes the input
                _, chosen = mod.route(norm(a, residual)[0])
                counts.append(torch.bincount(chosen.reshape(-1).cpu(), minlength=mod.cfg.num_experts).tolist())
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(ids, pos, attn)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _write_back(model, path: str) -> None:
    """Write the model's parameters into the folder's safetensors files, each tensor under its name, in
    its file and dtype; the expert biases stay as they are in the files (the loader centres its copy)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from param2moe.checkpoint import load_targets, weight_files

    targets = load_targets(model)
    for file in weight_files(path):
        tensors = {}
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                old = f.get_tensor(name)
                if name.endswith("expert_bias") or name not in targets:
                    tensors[name] = old
                    continue
                new = torch.empty(old.shape, dtype=torch.float32)
                for dest, index in targets[name].parts:
                    new[index if index else ...] = dest.detach().float().cpu()
                tensors[name] = new.to(old.dtype)
        save_file(tensors, file + ".tmp", metadata={"format": "pt"})
        os.replace(file + ".tmp", file)


def make_peaked_checkpoint(path: str, device: str = "cpu", steps: int = 200, seed: int = 0, *,
                           n_seq: int = 8, seq_len: int = 272, lr: float = 5e-3, decay_from: float = 0.5,
                           config_overrides: dict | None = None, log_every: int = 0) -> dict:
    """Write a random checkpoint to `path` (param2moe.writer, so config and tokenizer are complete), train it
    on `device` with Adam for `steps` full-batch steps to memorise `make_corpus(vocab, n_seq, seq_len, seed)`,
    and write the trained weights back. Deterministic on the CPU for a given seed (and thread count); on a
    GPU with torch's deterministic algorithms (their cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before
    CUDA starts: gpu_correctness.py sets it), so that runs on the same card check the same checkpoint.
    Returns what happened: the corpus, loss and accuracy at the start and the end, seconds, and the
    number of tokens routed to each expert of each MoE layer (forward over the corpus, after training)."""
    from param2moe.checkpoint import load_model
    from param2moe.kernels import Kernels
    from param2moe.model.attention import CausalAttention
    from param2moe.writer import write_checkpoint

    cfg = peaked_config(config_overrides)
    # Small weights that train well; a router wide enough to spread tokens over the experts, and small
    # expert biases (not trained) so that the router, not the bias, decides.
    write_checkpoint(path, cfg, seed=seed, std=0.02, head_std=0.02, router_std=0.1, bias_std=0.01)
    torch.manual_seed(seed)
    corpus = make_corpus(cfg.vocab_size, n_seq, seq_len, seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # (warns where an op has no such version)
    with _TrainingKernels():
        model = load_model(path, dtype=torch.float32, device=device, progress=False, kernels=Kernels("torch"))
        params = []
        for name, p in model.named_parameters():
            if not name.endswith("expert_bias"):
                params.append(p.requires_grad_(True))
        ids = corpus.reshape(-1).to(device)
        pos = torch.arange(seq_len, device=device).repeat(n_seq)
        attn = CausalAttention([seq_len] * n_seq, ops=model.ops)
        last = torch.arange(n_seq * seq_len, device=device) % seq_len == seq_len - 1
        inputs, targets = ~last, corpus[:, 1:].reshape(-1).to(device)
        opt = torch.optim.Adam(params, lr=lr)
        # lr constant, then (from step decay_from * steps) falling linearly to 5% of it at the end.
        start = int(decay_from * steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 1.0 if i < start else 1.0 - 0.95 * (i - start) / max(1, steps - start))
        history = []
        t0 = time.perf_counter()
        for step in range(steps + 1):
            logits = model.compute_logits(model(ids, pos, attn)[inputs])
            loss = F.cross_entropy(logits, targets)
            acc = (logits.argmax(-1) == targets).float().mean()
            history.append((loss.item(), acc.item()))
            if log_every and step % log_every == 0:
                print(f"step {step}: loss {history[-1][0]:.4f}, accuracy {history[-1][1]:.4f}, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            if step == steps:  # the last pass only measures
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        seconds = time.perf_counter() - t0
        for p in params:
            p.requires_grad_(False)
        load = _expert_load(model, ids, pos, attn)
        _write_back(model, path)
    torch.use_deterministic_algorithms(deterministic)
    return {"steps": steps, "seed": seed, "lr": lr, "decay_from": decay_from, "n_seq": n_seq, "seq_len": seq_len,
            "device": str(device),
            "initial_loss": history[0][0], "final_loss": history[-1][0], "final_accuracy": history[-1][1],
            "train_seconds": seconds, "expert_load": load, "corpus": corpus}


def load_summary(load: list[list[int]]) -> dict:
    """Spread of the expert load over each layer: experts used, and the busiest / quietest expert as
    multiples of the mean."""
    out = []
    for counts in load:
        mean = sum(counts) / len(counts)
        out.append({"experts_used": sum(c > 0 for c in counts), "max_over_mean": round(max(counts) / mean, 2),
                    "min_over_mean": round(min(counts) / mean, 2)})
    return {"per_layer": out, "experts": len(load[0]) if load else 0}


def cpu_check(out_path: str | None = None) -> dict:
    """Train on the CPU; then on the trained checkpoint, and for contrast on the old random one, count
    prompts whose 64 greedy tokens agree: bf16 torch vs fp32, and bf16 torch vs bf16 torch summed in
    another order."""
    import tempfile

    from gpu_correctness import N_PROMPTS, STEPS, greedy_same, run, run_other_order

    from param2moe.writer import write_checkpoint

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        trained, old = os.path.join(tmp, "trained"), os.path.join(tmp, "random")
        info = make_peaked_checkpoint(trained, "cpu", log_every=25)
        corpus = info.pop("corpus")
        result["training"] = {**info, "expert_load": load_summary(info["expert_load"]),
                              "expert_load_counts": info["expert_load"]}
        print(f"trained {info['steps']} steps in {info['train_seconds']:.0f} s: loss {info['initial_loss']:.3f} -> "
              f"{info['final_loss']:.4f}, accuracy {info['final_accuracy']:.4f}")
        for layer in result["training"]["expert_load"]["per_layer"]:
            print("  expert load:", layer)
        ids = corpus_prompts(corpus, N_PROMPTS)
        write_checkpoint(old, peaked_config(), seed=3, router_std=0.02, bias_std=1.0, head_std=0.3)
        g = torch.Generator().manual_seed(0)  # gpu_correctness's old random prompts
        rand_ids = [torch.randint(FIRST_TOKEN, 2048, (int(n),), generator=g).tolist()
                    for n in torch.randint(8, 200, (N_PROMPTS,), generator=g)]
        for name, path, prompts in (("trained", trained, ids), ("random", old, rand_ids)):
            t = time.perf_counter()
            f32, _ = run(path, prompts, device="cpu", dtype="float32")
            b16, _ = run(path, prompts, device="cpu", dtype="bfloat16", kernels="torch")
            other, _ = run_other_order(path, prompts, device="cpu")
            r = {"bf16_vs_fp32_greedy_identical": f"{greedy_same(b16, f32)}/{N_PROMPTS}",
                 "bf16_vs_bf16_other_sum_order_greedy_identical": f"{greedy_same(b16, other)}/{N_PROMPTS}"}
            if name == "trained":
                follows = sum(o.outputs[0].token_ids == corpus[i % corpus.shape[0], len(p):len(p) + STEPS].tolist()
                              for i, (o, p) in enumerate(zip(f32, prompts)))
                r["fp32_greedy_equals_corpus"] = f"{follows}/{N_PROMPTS}"
            result[name] = r
            print(f"{name}: {r} ({time.perf_counter() - t:.0f} s)", flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    import sys

    cpu_check(sys.argv[1] if len(sys.argv) > 1 else None)
