#!/usr/bin/env python3
"""Fine-tune a small LoRA adapter with PEFT on the CPU, save it, and serve it with the engine.

    python scripts/finetune_lora_demo.py [--model DIR] [--out ADAPTER_DIR] [--steps 30] [--routed-experts]

The model (default: the bundled demo model, param2-demo) is loaded with the transformers class
`param2moe.hf_model.Param2MoEForCausalLM` in float32; PEFT adds rank-8 adapters to modules the engine
serves adapters for, by their checkpoint names: attention's query_key_value and dense, and gate_proj /
up_proj / down_proj of the dense layer and the shared experts (with --routed-experts, of every routed
expert too: serve those with lora_routed_experts on). It trains them on a few sentences until the model
completes them, saves a PEFT folder (adapter_config.json, adapter_model.safetensors), and the engine
then generates from the sentences' openings with and without the adapter. Needs the `lora` extra
(pip install -e ".[lora]"); about a minute on two idle CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

TEXTS = [
    "The river flows to the sea, and the sea keeps every river's name.",
    "Param-2 speaks many languages of India and answers in the one it is asked in.",
    "A small adapter teaches a large model one new habit without touching its weights.",
]
PROMPT_WORDS = 4  # each text's first words are the prompt of the demo


# PEFT full-matches a string of target_modules against module names: all but the routed experts
WITHOUT_ROUTED = r".*\.(attention\.(query_key_value|dense)|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))"
EVERY_KIND = ["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"]


def train(model_dir: str, out: str, steps: int, rank: int, lr: float, routed: bool, checkpointing: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from param2moe.hf_model import Param2MoEForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = Param2MoEForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:  # recompute each layer in the backward pass: less memory, more time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=EVERY_KIND if routed else WITHOUT_ROUTED)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    batch = tok([t + tok.eos_token for t in TEXTS], padding=True, return_tensors="pt")  # to stop after the text
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    print(f"adapter saved to {out}: {', '.join(sorted(os.listdir(out)))}")


def serve(model_dir: str, out: str, routed: bool) -> None:
    from param2moe import LLM, LoRARequest, SamplingParams

    llm = LLM(model_dir, enable_lora=True, max_lora_rank=64, lora_routed_experts=routed)
    prompts = [" ".join(t.split()[:PROMPT_WORDS]) for t in TEXTS]
    params = SamplingParams(temperature=0, max_tokens=32)
    base = llm.generate(prompts, params, use_tqdm=False)
    tuned = llm.generate(prompts, params, use_tqdm=False, lora_request=LoRARequest("demo", 1, out))
    for p, b, t in zip(prompts, base, tuned):
        print(f"\nprompt:       {p!r}\nbase model:   {b.outputs[0].text!r}\nwith adapter: {t.outputs[0].text!r}")


def main() -> None:
    from param2moe.engine.config import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path(), help="checkpoint folder (default: the bundled demo model)")
    ap.add_argument("--out", default="lora-demo-adapter", help="where the adapter is saved")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--routed-experts", action="store_true", help="adapt every routed expert too")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    train(a.model, a.out, a.steps, a.rank, a.lr, a.routed_experts, a.gradient_checkpointing)
    serve(a.model, a.out, a.routed_experts)


if __name__ == "__main__":
    main()
