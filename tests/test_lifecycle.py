"""An engine's life: shutdown() and the context-manager form, a dropped parallel engine releasing its workers
and process group, a second parallel engine in the same process, and worker processes that never outlive the
engine's process. Each scenario runs in its own interpreter under a timeout: a hang fails the test."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from cases import preset_checkpoint

from param2moe import LLM, SamplingParams
from param2moe.engine import EngineError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return preset_checkpoint(tmp_path_factory, "life", {"num_hidden_layers": 2}, seed=3)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited and not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _run(script: str, timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shutdown_and_context_manager(checkpoint):
    params = SamplingParams(temperature=0, max_tokens=3)
    with LLM(checkpoint, kv_cache_memory=1 << 22) as llm:
        first = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(EngineError, match="shut down"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    llm.shutdown()  # again: nothing happens
    again = LLM(checkpoint, kv_cache_memory=1 << 22)
    assert again.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids == first


def test_second_tensor_parallel_engine_in_one_process(checkpoint):
    """Dropped without shutdown, then a second TP engine: it starts (no hang) and generates the same tokens;
    the first engine's workers are gone. A third while one is live: a clear error. shutdown(): workers gone."""
    out = _run(f"""
        import json
        from param2moe import LLM, SamplingParams
        params = SamplingParams(temperature=0, max_tokens=4)
        kw = dict(kv_cache_memory=1 << 22, tensor_parallel_size=2)
        llm = LLM({checkpoint!r}, **kw)
        first = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        dropped = [p.pid for p in llm.llm_engine.ranks.workers.procs]
        del llm
        llm = LLM({checkpoint!r}, **kw)
        second = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        try:
            LLM({checkpoint!r}, **kw)
            refused = ""
        except RuntimeError as e:
            refused = str(e)
        live = [p.pid for p in llm.llm_engine.ranks.workers.procs]
        with llm:
            third = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        with LLM({checkpoint!r}, **kw) as llm:
            fourth = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        print(json.dumps(dict(first=first, second=second, third=third, fourth=fourth, refused=refused,
                              dropped=dropped, live=live)))
    """)
    assert out["first"] == out["second"] == out["third"] == out["fourth"] and len(out["first"]) == 4
    assert "another parallel engine" in out["refused"] and "shutdown()" in out["refused"]
    assert not any(_alive(p) for p in out["dropped"] + out["live"])


def test_workers_exit_when_the_driver_is_killed(checkpoint):
    script = textwrap.dedent(f"""
        import time
        from param2moe import LLM
        llm = LLM({checkpoint!r}, kv_cache_memory=1 << 22, tensor_parallel_size=2)
        print(*[p.pid for p in llm.llm_engine.ranks.workers.procs], flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived the engine's process"
