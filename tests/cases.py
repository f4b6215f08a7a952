"""Test cases shared by several test files, defined once here (tests/ is on sys.path, as for
scripted_checkpoint.py and server_harness.py)."""

from __future__ import annotations

from param2moe.writer import preset_config, write_checkpoint

# ------------------------------------------------------------------------------------ routing
# keyword arguments of route(); the CPU reference (test_ops) and the Triton kernels (test_triton_kernels)
# both run every case
ROUTE_CASES = {
    "sigmoid": dict(score_function="sigmoid"),
    "softmax": dict(score_function="softmax"),
    "no-norm": dict(norm_topk_prob=False),
    "param2": dict(routed_scaling_factor=2.5),
    "no-norm-scaled-softmax": dict(score_function="softmax", norm_topk_prob=False, routed_scaling_factor=1.5),
    "grouped": dict(n_group=4, topk_group=2),
    "grouped-softmax-scaled": dict(score_function="softmax", n_group=8, topk_group=3, routed_scaling_factor=2.5),
    "grouped-one-per-group": dict(n_group=16, topk_group=5),
    "one-group": dict(n_group=1, topk_group=1, routed_scaling_factor=2.5),
}

# ------------------------------------------------------------------------------------ chat requests
# for servers on a scripted checkpoint (scripted_checkpoint.py): a user turn, the tool call it answers
# with, and the plain answer written after an assistant message "<answer>" is continued
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOL_CALL_CHAIN = ["<tool_call>", TOOL_JSON, "</tool_call>", "<<|EOS|>>"]
ANSWER_CHAIN = ["The weather", " in Paris is sunny.", "<<|EOS|>>"]
ENTRIES = {"tool": "\n", "answer": "<answer>"}  # "\n" ends "<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------ checkpoints
def preset_checkpoint(tmp_path_factory, name: str, overrides: dict | None = None, preset: str = "tiny",
                      **writer_kw) -> str:
    """Write a random checkpoint of `preset` (with config `overrides`) to a fresh temporary folder
    named after `name`; writer_kw go to write_checkpoint (seed, head_std, ...). Returns the folder."""
    path = tmp_path_factory.mktemp(name)
    write_checkpoint(str(path), preset_config(preset, overrides), **writer_kw)
    return str(path)
