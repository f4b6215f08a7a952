"""Write the trained demo model as a checkpoint folder, check it in param2moe's engine, write its model card.

Used by scripts/train_demo_model.py: `write_checkpoint` (weights in bf16, the router in fp32, the
folder's other files from `param2moe.writer`), `check_engine_parity` (the engine on the written folder
against the training module holding the same rounded weights) and `write_card` (README.md, and the
numbers as training_report.json).
"""

from __future__ import annotations

import json
import os

import torch

ROUTER = ("mlp.gate.weight", "mlp.gate.expert_bias")


def write_checkpoint(model, cfg, tokenizer, out: str) -> None:
    """model.safetensors and the folder's files; then the model holds the written (rounded) weights, so
    that what is measured after this is what ships."""
    from safetensors.torch import save_file

    from param2moe.writer import write_folder_files

    os.makedirs(out, exist_ok=True)
    tensors = {k: v if k.endswith(ROUTER) else v.to(torch.bfloat16) for k, v in model.state_dict_hf().items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_folder_files(out, cfg, tokenizer)
    model.load_hf({k: v.float() for k, v in tensors.items()})


@torch.no_grad()
def check_engine_parity(model, out: str, pieces: list[list[int]], device, limit: float = 2e-3) -> float:
    """Prompt logprobs of a few held-out pieces from param2moe's engine (LLM, fp32, CPU) on the written
    folder, against the training module's log-softmax on the same weights (fp32). Raises when the largest
    difference passes `limit`; returns it."""
    from param2moe import LLM, SamplingParams

    pieces = [p[:256] for p in pieces if len(p) >= 2]
    llm = LLM(out, device="cpu", dtype="float32", max_model_len=512, kv_cache_memory=1 << 26)
    outs = llm.generate(pieces, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    was = model.training
    model.eval()
    worst = 0.0
    for piece, o in zip(pieces, outs):
        ids = torch.tensor(piece, device=device)[None]
        mine = model(ids).log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0].cpu()
        engine = torch.tensor([entry[t].logprob for entry, t in zip(o.prompt_logprobs[1:], piece[1:])])
        worst = max(worst, (mine - engine).abs().max().item())
    model.train(was)
    if worst > limit:
        raise AssertionError(f"the engine's logprobs on {out} differ from the training model's by {worst:.2e}")
    return worst


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_card(out: str, cfg, result: dict, manifest: dict) -> None:
    with open(os.path.join(out, "training_report.json"), "w") as f:
        json.dump({**result, "corpus": manifest}, f, indent=1)
        f.write("\n")
    sources = _table(["source", "Debian package (version)", "licence", "training / held-out bytes"], [
        [s["name"], f"`{s['package']}` ({s['version']})", s["licence"],
         f"{s['train_bytes']:,} / {s['heldout_bytes']:,}"] for s in manifest["sources"]])
    loads = _table(["layer", "busiest expert / mean", "quietest / mean", "coefficient of variation"], [
        [i + cfg.first_k_dense_replace, s["max_over_mean"], s["min_over_mean"], s["cv"]]
        for i, s in enumerate(result["expert_load"])])
    history = _table(["step", "training loss", "held-out perplexity", "seconds"], [
        [h["step"], h["train_loss"], h["heldout_ppl"] if h is result["history"][-1] else f"{h['heldout_ppl']} (subset)",
         h["seconds"]] for h in result["history"]])
    s = result["settings"]
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    card = f"""# param2-demo

A small language model of the Param2MoE layout (BharatGen's Param-2 / BailingMoeV2), trained from scratch by
`scripts/train_demo_model.py` on openly licensed English text and a little Hindi. It is the default model of
param2moe (`LLM()`, `generate`, `chat`, `serve`): it writes readable, if rambling, text in the styles of its
corpus. It is a demonstration of the engine, not an assistant: it was never tuned to follow instructions.

## Architecture
{cfg.num_hidden_layers} layers (the first dense, the rest MoE), hidden {cfg.hidden_size}, {cfg.num_attention_heads}
query heads and {cfg.num_kv_heads} KV heads of {cfg.head_size}, QK-norm, RoPE (theta {cfg.rope_theta:g});
MoE: {cfg.num_experts} routed experts of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}
by sigmoid scores plus an expert bias, grouped routing ({cfg.n_group} groups, best {cfg.topk_group} kept),
weights normalised and scaled by {cfg.routed_scaling_factor}, {cfg.num_shared_experts} shared experts (width
{cfg.shared_expert_intermediate_size}); dense layer width {cfg.intermediate_size}; tied embeddings, vocabulary
{cfg.vocab_size:,}. {result['parameters'] / 1e6:.2f}M parameters, {size / 1e6:.1f} MB (bf16, the router in fp32).

## Corpus
Built by `scripts/build_demo_corpus.py` from Debian packages; pieces of up to 2,000 characters, every 50th
piece held out (none of it trained on).

{sources}

Tokenizer: byte-level BPE trained on the training split (`tokenizers`), {cfg.vocab_size:,} tokens; Param-2's
special tokens at ids 0-24 and its chat template, so chat, reasoning and tool-call parsing work unchanged.

## Training
{s['steps']} steps of {s['batch']} windows of {s['seq_len']} tokens ({result['train_tokens']:,} training tokens,
{s['steps'] * s['batch'] * s['seq_len'] / result['train_tokens']:.1f} epochs), AdamW (lr {s['lr']}, betas 0.9/0.95,
weight decay {s['weight_decay']}, warm-up then cosine to a tenth), dropout {s['dropout']}, gradient clipping 1.0,
seed {result['seed']}, on {result['device_name']} ({result['threads']} CPU thread(s), torch {result['torch']}):
{result['train_seconds']:.0f} s. Expert biases get no gradient: after every step each MoE layer's bias moves by
the aux-loss-free rule of DeepSeek-V3 / BailingMoeV2, bias_i += {s['bias_update_rate']} * sign(mean load - load_i).

{history}

## Quality
Held-out perplexity {result['heldout_ppl']:.2f} ({result['heldout_tokens']:,} tokens, {result['heldout_pieces']}
pieces, each scored alone); a unigram model of the training split's token frequencies (add-one) gives
{result['unigram_ppl']:.2f}. param2moe's engine on this folder reproduces the training module's log-probabilities
within {result['engine_parity_max_abs_logprob_diff']:.1e} (fp32). `tests/test_demo_model.py` recomputes both
perplexities through the engine on a held-out sample (`tests/data/demo_heldout.txt`).

## Expert load
Tokens routed to each expert over the held-out text, per MoE layer (balanced: 1.0 and 0):

{loads}

## Licence
The texts: public domain (World English Bible, Jargon File), PSF License Agreement v2 (Python documentation),
MPL-2.0 (LibreOffice help). The weights and tokenizer are released with param2moe (Apache-2.0).
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)
