"""The `param2moe` command: generate, chat, serve, bench, make-checkpoint, quantize."""

from __future__ import annotations

import argparse
import json
import sys

from .engine.config import EngineConfig
from .quant.plan import OPTIONS as QUANT_OPTIONS


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler for each request")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args, llm):
    import dataclasses

    base = llm.get_default_sampling_params()
    overrides = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if getattr(args, k) is not None}
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    fields.update(overrides, max_tokens=args.max_tokens, seed=args.sampling_seed, stop=args.stop,
                  ignore_eos=args.ignore_eos)
    return type(base)(**fields)


def cmd_generate(args) -> int:
    from .llm import LLM

    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    params = sampling_params(args, llm)
    if args.prompts_file:
        prompts = _read_prompts(args.prompts_file)
        if args.chat:
            tok = llm.get_tokenizer()
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        outs = llm.generate(prompts, params, use_tqdm=True)
        sink = open(args.output, "w") if args.output else sys.stdout
        for prompt, out in zip(prompts, outs):
            c = out.outputs[0]
            sink.write(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                                   "finish_reason": c.finish_reason}, ensure_ascii=False) + "\n")
        if args.output:
            sink.close()
        return 0
    if args.prompt is None:
        print("error: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(out.outputs[0].text)
    return 0


def _read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise SystemExit(f"{path}:{n}: expected a JSON object with a \"prompt\" field ({e})") from None
            else:
                prompts.append(line)
    return prompts


def cmd_chat(args) -> int:
    from .chat_repl import run_chat
    from .llm import LLM

    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    return run_chat(llm, sampling_params(args, llm), args.system)


def cmd_serve(args) -> int:
    from .server.app import run_server

    return run_server(args)


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_make_checkpoint(args) -> int:
    from .writer import parse_overrides, preset_config, write_checkpoint

    cfg = preset_config(args.preset, parse_overrides(args.set or []))
    write_checkpoint(args.out, cfg, seed=args.seed, router_dtype=args.router_dtype)
    print(f"wrote {args.out}")
    return 0


def cmd_quantize(args) -> int:
    from .quant.export import quantize_checkpoint

    quantize_checkpoint(args.input, args.output, args.method)
    print(f"wrote {args.output} ({args.method}, compressed-tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="param2moe", description="Run Param2MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for one prompt or a file of prompts")
    EngineConfig.add_cli_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompts-file", default=None, help="one prompt a line, or JSONL with a \"prompt\" field")
    p.add_argument("--output", default=None, help="JSONL results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat in the terminal")
    EngineConfig.add_cli_args(p)
    add_sampling_args(p, max_tokens=1024)
    p.add_argument("--system", default=None, help="a system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    EngineConfig.add_cli_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-queued-requests", type=int, default=1024)
    p.add_argument("--max-request-bytes", type=int, default=4 << 20)
    p.add_argument("--drain-seconds", type=float, default=10.0, help="on SIGTERM, time to let requests finish")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="latency and throughput benchmarks")
    p.add_argument("mode", choices=["latency", "throughput"])
    EngineConfig.add_cli_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--routing", choices=["uniform_random", "model"], default=None,
                   help="expert choice (default: uniform_random with dummy weights, SPEC 7)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("make-checkpoint", help="write a Hugging Face checkpoint with random weights")
    p.add_argument("out")
    p.add_argument("--preset", default="small", help="tiny, small or param2-17b")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-dtype", default=None, help="store router weights in this dtype (e.g. float32)")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (compressed-tensors; vLLM loads it)")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--method", required=True, choices=list(QUANT_OPTIONS))
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
