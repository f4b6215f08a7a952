"""The `param2moe` command: generate, chat, serve, bench, make-checkpoint, quantize."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import socket
import sys
from dataclasses import dataclass

from .engine.config import EngineConfig
from .quant.plan import OPTIONS as QUANT_OPTIONS
from .server.options import ServerOptions


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=None if max_tokens else "default: the model's generation_config max_new_tokens, else the "
                                                "rest of the context")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler for each request")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args, llm):
    base = llm.get_default_sampling_params()
    overrides = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if getattr(args, k) is not None}
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    fields.update(overrides, max_tokens=args.max_tokens, seed=args.sampling_seed, stop=args.stop,
                  ignore_eos=args.ignore_eos)
    return type(base)(**fields)


def cmd_generate(args) -> int:
    from .llm import LLM

    # Everything that can be wrong with the command is checked before the model loads.
    if args.prompt is None and args.prompts_file is None:
        raise CliError("give --prompt TEXT or --prompts-file FILE", usage=True)
    lines = read_prompts_file(args.prompts_file) if args.prompts_file else [PromptLine(args.prompt)]
    sink = _open_output(args.output)
    try:
        llm = LLM.from_config(EngineConfig.from_cli_args(args))
        params = sampling_params(args, llm)
        prompts = [line.text for line in lines]
        if args.chat:
            prompts = [_chat_prompt(llm, p) for p in prompts]
        per_line = [line.sampling(params) for line in lines]
        outs = llm.generate(prompts, per_line, use_tqdm=args.prompts_file is not None)
        for prompt, out in zip(prompts, outs):
            c = out.outputs[0]
            if args.prompts_file or args.output:
                text = prompt["prompt"] if isinstance(prompt, dict) else prompt
                sink.write(json.dumps({"prompt": text, "text": c.text, "token_ids": c.token_ids,
                                       "finish_reason": c.finish_reason}, ensure_ascii=False) + "\n")
            else:
                sink.write(c.text + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    return 0


def _chat_prompt(llm, text: str) -> dict:
    """The text as a user message in the chat template (as LLM.chat renders it)."""
    tok = llm.get_tokenizer()
    if tok is None:
        raise CliError("--chat needs the model's tokenizer (tokenizer.json), and this model has none")
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return {"prompt": rendered, "prompt_token_ids": tok.encode(rendered, add_special_tokens=False)}


@dataclass
class PromptLine:
    text: str
    max_tokens: int | None = None  # a JSONL line's own limit

    def sampling(self, params):
        return params if self.max_tokens is None else dataclasses.replace(params, max_tokens=self.max_tokens)


_LINE_FIELDS = ("prompt", "max_tokens")


def read_prompts_file(path: str) -> list[PromptLine]:
    """One prompt a line, or a JSON object a line with "prompt" and, optionally, "max_tokens"; blank lines
    skipped."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise CliError(f"--prompts-file {path}: {e.strerror or e}") from None
    prompts = []
    with f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if not line.lstrip().startswith("{"):
                prompts.append(PromptLine(line))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{n}: not valid JSON ({e})") from None
            unknown = sorted(set(obj) - set(_LINE_FIELDS))
            if unknown:
                raise CliError(f"{path}:{n}: unknown field(s) {', '.join(unknown)} (a line takes "
                               f"{', '.join(_LINE_FIELDS)})")
            if not isinstance(obj.get("prompt"), str):
                raise CliError(f"{path}:{n}: expected a JSON object with a string \"prompt\" field")
            max_tokens = obj.get("max_tokens")
            if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                           or max_tokens < 1):
                raise CliError(f"{path}:{n}: max_tokens must be a positive integer, got {max_tokens!r}")
            prompts.append(PromptLine(obj["prompt"], max_tokens))
    if not prompts:
        raise CliError(f"--prompts-file {path}: no prompts in it")
    return prompts


def _open_output(path: str | None):
    if path is None:
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise CliError(f"--output {path}: {e.strerror or e}") from None


def cmd_chat(args) -> int:
    from .chat_repl import run_chat
    from .llm import LLM

    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    if llm.get_tokenizer() is None:
        raise CliError("chat needs the model's tokenizer (tokenizer.json), and this model has none")
    return run_chat(llm, sampling_params(args, llm), args.system)


def cmd_serve(args) -> int:
    check_port_free(args.host, args.port)  # before the model loads, and before "serving on ..."
    from .server.app import run_server

    return run_server(args)


def check_port_free(host: str, port: int) -> None:
    """Bind the address as the server will (SO_REUSEADDR, as uvicorn sets it), then let it go."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CliError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            why = "the address is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise CliError(f"cannot serve on {host}:{port}: {why}") from None


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
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None)
    source.add_argument("--prompts-file", default=None,
                        help="one prompt a line, or JSONL: {\"prompt\": ..., \"max_tokens\": N (optional)}")
    p.add_argument("--output", default=None, help="JSONL results (default: stdout; one --prompt: its text)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat in the terminal")
    EngineConfig.add_cli_args(p)
    add_sampling_args(p, max_tokens=None)
    p.add_argument("--system", default=None, help="a system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    EngineConfig.add_cli_args(p)
    ServerOptions.add_cli_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="latency and throughput benchmarks")
    p.add_argument("mode", choices=["latency", "throughput"])
    EngineConfig.add_cli_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--routing", choices=["uniform_random", "model"], default=None,
                   help="expert choice (default: uniform_random with dummy weights, docs/model.md §7)")
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


def _follow_rank_zero(args) -> int:
    """A rank other than 0 started by torchrun (several machines): build this rank's part of the engine and
    run the step plans rank 0 sends, until it stops."""
    from .engine.worker import worker_loop

    config = EngineConfig.from_cli_args(args).resolve()
    worker_loop(int(os.environ["RANK"]), config, config.parallel)
    return 0


class CliError(Exception):
    """A problem with the command as given: printed as one line, no traceback."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.exit_code = 2 if usage else 1


def _known_errors() -> tuple:
    """What a user's input can cause (a missing or bad folder, file, setting or request): reported in one line.
    Anything else is a bug and keeps its traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import RankLostError
    from .engine import EngineError
    from .engine.config import EngineConfigError
    from .hub import ModelNotFoundError
    from .lora import LoRAError
    from .quant.formats import QuantFormatError
    from .weights_file import WeightsFileError

    return (CliError, CheckpointError, ConfigError, EngineError, EngineConfigError, LoRAError, ModelNotFoundError,
            QuantFormatError, RankLostError, WeightsFileError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "tensor_parallel_size") and int(os.environ.get("RANK", "0")) > 0:
            return _follow_rank_zero(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except _known_errors() as e:
        if os.environ.get("PARAM2MOE_TRACEBACK"):
            raise
        print(f"param2moe {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
