"""Train the demo model that ships with param2moe: the Param2MoE layout, small, on an openly licensed corpus.

First build the corpus (Debian packages; see the script), then train:

    python3 scripts/build_demo_corpus.py --out corpus/demo
    # GPU (one H100; 14M parameters, 2,000 steps, a few minutes; it reads corpus/demo/train.jsonl,
    # heldout.jsonl and manifest.json, nothing else, no network; progress every 25 steps):
    PYTHONUNBUFFERED=1 python3 scripts/train_demo_model.py --corpus corpus/demo --preset gpu --device cuda --out OUT_DIR
    # CPU (the same script, 3.6M parameters, 600 steps, ~20 minutes on one core; one thread is faster than two
    # on a shared machine):
    python3 scripts/train_demo_model.py --corpus corpus/demo --preset cpu --device cpu --threads 1 --out OUT_DIR

It trains a byte-level BPE tokenizer on the training split (Param-2's special tokens at ids 0..24, its
chat template: `param2moe.writer`), then the network (scripts/demo_training_model.py) with AdamW on
random windows of the token stream (documents joined by EOS), and updates each MoE layer's expert bias
after every step by the aux-loss-free rule (bias_i += u * sign(mean load - load_i)). It writes a complete
checkpoint folder (weights in bf16, router in fp32), checks that param2moe's network on the written
folder gives the training module's logits, and writes the model card (README.md) with the corpus,
settings, held-out perplexity against a unigram baseline, and the per-layer expert load.
Deterministic for a seed on the CPU (for a thread count); on CUDA with torch's deterministic algorithms.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_training_model import DemoModel  # noqa: E402

from param2moe.config import Param2MoEConfig  # noqa: E402

# Everything Param-2 switches on (SPEC 1): QK-norm, a dense first layer, sigmoid routing with an expert
# bias, grouped top-k, shared experts, routed scaling, a tied head.
ARCH = dict(
    first_k_dense_replace=1, score_function="sigmoid", moe_router_enable_expert_bias=True, router_dtype="fp32",
    routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, use_qkv_bias=False, use_bias=False,
    tie_word_embeddings=True, rope_theta=1e6, partial_rotary_factor=1.0, rope_scaling=None,
    max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu", num_nextn_predict_layers=0,
    torch_dtype="bfloat16", num_shared_experts=2, n_group=4, topk_group=2, num_experts_per_tok=4)

PRESETS = {
    # ~14M parameters (28 MB in bf16), ~6.5M active a token. Head counts split over 2 ranks (TP); every width a
    # multiple of 128, so that every quantization format fits (int4 groups, fp8 blocks).
    "gpu": dict(model=dict(vocab_size=8192, hidden_size=256, num_hidden_layers=7, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, intermediate_size=768, num_experts=16,
                           moe_intermediate_size=128, moe_shared_expert_intermediate_size=128),
                train=dict(steps=2000, batch=32, seq_len=512, lr=2e-3, dropout=0.1, eval_every=250)),
    # ~3.6M parameters for one CPU core (~20 minutes at ~1,000 tokens/s). Head counts split over 2 ranks (TP).
    "cpu": dict(model=dict(vocab_size=4096, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, intermediate_size=512, num_experts=16,
                           moe_intermediate_size=64, moe_shared_expert_intermediate_size=128),
                train=dict(steps=600, batch=8, seq_len=256, lr=3e-3, dropout=0.0, eval_every=100)),
    # Seconds: for checking the script.
    "tiny": dict(model=dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, intermediate_size=128, num_experts=8,
                            moe_intermediate_size=32, moe_shared_expert_intermediate_size=64),
                 train=dict(steps=20, batch=4, seq_len=64, lr=3e-3, dropout=0.0, eval_every=10)),
}

EOS = 3  # <<|EOS|>>: ends every training document
PARITY_LIMIT = 2e-3  # largest |logprob| difference allowed between the engine and the training module (fp32)


# ------------------------------------------------------------------------------------------- data
def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on the texts, Param-2's special tokens first (ids 0..24). Words are split by a
    GPT-2-style pattern that keeps combining marks in their word (Devanagari vowel signs are marks)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from param2moe.writer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    words = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{M}]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def token_stream(docs: list[list[int]]) -> torch.Tensor:
    """The documents back to back, each followed by EOS."""
    out = []
    for ids in docs:
        out.extend(ids)
        out.append(EOS)
    return torch.tensor(out, dtype=torch.int32)


def unigram_ppl(train: torch.Tensor, heldout: list[list[int]], vocab: int) -> float:
    """Perplexity of the held-out tokens (each piece's first token aside, as for the model) under the
    training split's token frequencies with add-one smoothing."""
    counts = torch.bincount(train.long(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    ids = torch.tensor([i for piece in heldout for i in piece[1:]])
    return math.exp(-logp[ids].mean().item())


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def heldout_eval(model: DemoModel, pieces: list[list[int]], device, max_len: int, limit: int | None = None):
    """(perplexity, per-layer expert loads) over the held-out pieces, each scored alone (its first token
    is context only; pieces longer than max_len are cut)."""
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    loads = [torch.zeros(m.expert_bias.numel(), dtype=torch.long) for m in model.moes()]
    for piece in pieces[:limit]:
        ids = torch.tensor(piece[:max_len], device=device)[None]
        if ids.shape[1] < 2:
            continue
        logp = model(ids).log_softmax(-1)[0, :-1]
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
        for total, moe in zip(loads, model.moes()):
            total += moe.load.cpu()
    model.train(was)
    return math.exp(nll / max(1, n)), [t.tolist() for t in loads]


def load_summary(loads: list[list[int]]) -> list[dict]:
    """Per MoE layer: the busiest and the quietest expert as multiples of the mean load, and the
    coefficient of variation (std / mean) of the load."""
    out = []
    for counts in loads:
        c = torch.tensor(counts, dtype=torch.float64)
        mean = c.mean().item()
        out.append({"max_over_mean": round(c.max().item() / mean, 3), "min_over_mean": round(c.min().item() / mean, 3),
                    "cv": round(c.std(unbiased=False).item() / mean, 3)})
    return out


# -------------------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model: DemoModel, lr: float, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train(model: DemoModel, stream: torch.Tensor, heldout: list[list[int]], args, device) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    warmup = max(1, args.steps // 50)
    amp = device.type == "cuda"
    history, t0, seen = [], time.perf_counter(), 0
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        window = torch.stack([stream[s:s + args.seq_len + 1] for s in starts.tolist()]).long().to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_expert_bias(args.bias_update_rate)
        seen += window.numel()
        last = step == args.steps - 1
        if step % args.log_every == 0 or last:
            cv = [s["cv"] for s in load_summary([m.load.tolist() for m in model.moes()])]
            elapsed = time.perf_counter() - t0
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"load cv {max(cv):.2f}  {seen / elapsed:,.0f} tok/s  {elapsed:.0f} s", flush=True)
        if (step + 1) % args.eval_every == 0 or last:
            ppl, _ = heldout_eval(model, heldout, device, args.seq_len, limit=None if last else 60)
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "heldout_ppl": round(ppl, 2),
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(f"  held-out perplexity {ppl:.2f}{' (subset)' if not last else ''}", flush=True)
    return history


# --------------------------------------------------------------------------------------- main
def model_config(preset: str, vocab: int | None) -> Param2MoEConfig:
    raw = {"model_type": "param2moe", "architectures": ["Param2MoEForCausalLM"], **ARCH, **PRESETS[preset]["model"]}
    if vocab:
        raw["vocab_size"] = vocab
    if raw["num_experts"] < 8:
        raw.update(n_group=2, topk_group=1, num_experts_per_tok=2)
    return Param2MoEConfig.from_dict(raw)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the param2moe demo model.")
    p.add_argument("--corpus", required=True, help="folder with train.jsonl, heldout.jsonl, manifest.json")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    for key in ("steps", "batch", "seq_len", "eval_every"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ("lr", "dropout"):
        p.add_argument("--" + key, type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="u of the expert-bias update")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset]["train"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from export_demo_model import check_engine_parity, write_card, write_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train_rows = read_jsonl(os.path.join(args.corpus, "train.jsonl"))
    held_rows = read_jsonl(os.path.join(args.corpus, "heldout.jsonl"))
    cfg = model_config(args.preset, args.vocab)
    tok = train_tokenizer([r["text"] for r in train_rows], cfg.vocab_size)
    stream = token_stream(encode(tok, [r["text"] for r in train_rows]))
    heldout = encode(tok, [r["text"] for r in held_rows])
    print(f"tokenizer and corpus: {stream.numel():,} training tokens, {sum(map(len, heldout)):,} held-out "
          f"tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = DemoModel(cfg, dropout=args.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch} x {args.seq_len} tokens "
          f"({args.steps * args.batch * args.seq_len / stream.numel():.1f} epochs)", flush=True)
    history = train(model, stream, heldout, args, device)
    train_seconds = history[-1]["seconds"]
    write_checkpoint(model, cfg, tok, args.out)
    # On the CPU, where the engine runs it: the same device's arithmetic on both sides.
    parity = check_engine_parity(copy.deepcopy(model).cpu(), args.out, heldout[:4], torch.device("cpu"), math.inf)
    print(f"engine parity: max |logprob difference| {parity:.2e}", flush=True)
    ppl, loads = heldout_eval(model, heldout, device, args.seq_len)  # the written (bf16) weights, in fp32
    result = {"preset": args.preset, "seed": args.seed, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "parameters": n_params,
              "train_tokens": stream.numel(), "heldout_tokens": sum(map(len, heldout)),
              "heldout_pieces": len(heldout), "heldout_ppl": round(ppl, 3),
              "unigram_ppl": round(unigram_ppl(stream, heldout, cfg.vocab_size), 3),
              "train_seconds": train_seconds, "engine_parity_max_abs_logprob_diff": parity,
              "expert_load": load_summary(loads), "expert_load_counts": loads, "history": history,
              "settings": {k: getattr(args, k) for k in ("steps", "batch", "seq_len", "lr", "dropout", "weight_decay",
                                                         "bias_update_rate")}}
    write_card(args.out, cfg, result, read_json(os.path.join(args.corpus, "manifest.json")))
    print(f"held-out perplexity {ppl:.2f} (unigram {result['unigram_ppl']:.2f}); wrote {args.out}", flush=True)
    if parity > PARITY_LIMIT:
        raise SystemExit(f"the engine's logprobs on {args.out} differ from the training model's by {parity:.2e}")
    return result


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
