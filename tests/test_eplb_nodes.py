"""Several machines, as the README documents them: two torchrun "nodes" (--nnodes 2 --node-rank 0/1 on
127.0.0.1, gloo) serve expert parallelism over 2 ranks with expert load balancing; the completions are one
process's, the server's /metrics shows the rearrangements; then node 1 dies (all its processes) and node 0
stops with a message naming the lost rank instead of hanging."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from param2moe import LLM, SamplingParams
from param2moe.writer import preset_config, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nodes"))
    write_checkpoint(path, preset_config("tiny", {"num_hidden_layers": 2}), seed=5)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(node_rank: int, master_port: int, http_port: int, checkpoint: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
           "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
           "-m", "param2moe.cli", "serve", "--model", checkpoint, "--port", str(http_port), "--device", "cpu",
           "--kv-cache-memory", str(1 << 23), "-tp", "2", "--enable-expert-parallel", "--enable-eplb",
           "--num-redundant-experts", "2", "--eplb-step-interval", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARAM2MOE_PEER_TIMEOUT": "3"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)  # a node: its agent and rank die together


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun puts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_ready(url: str, procs, logs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not come up")


def test_two_nodes_serve_one_process_tokens_and_a_dead_node_stops_the_other(checkpoint, tmp_path):
    params = dict(max_tokens=20, temperature=0, logprobs=1, ignore_eos=True)
    ref = LLM(checkpoint, kv_cache_memory=1 << 23).generate("The river", SamplingParams(**params), use_tqdm=False)
    master_port, http_port = _port(), _port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with open(logs[0], "w") as log0, open(logs[1], "w") as log1:
        node1 = _node(1, master_port, http_port, checkpoint, log1)
        node0 = _node(0, master_port, http_port, checkpoint, log0)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(url, [node0, node1], logs)
        r = httpx.post(url + "/v1/completions", json={"model": os.path.basename(checkpoint), "prompt": "The river",
                                                        **params}, timeout=60).json()
        choice, want = r["choices"][0], ref[0].outputs[0]
        assert choice["text"] == want.text and want.text
        for got, lps, tok in zip(choice["logprobs"]["token_logprobs"], want.logprobs, want.token_ids):
            assert abs(got - lps[tok]) <= 1e-4
        metrics = httpx.get(url + "/metrics", timeout=10).text
        rearranged = [line for line in metrics.splitlines() if line.startswith("param2moe:eplb_rearrangements")]
        assert rearranged and float(rearranged[0].split()[-1]) >= 3, metrics[-2000:]
        _kill_tree(node1.pid)  # node 1 dies: its torchrun agent and its rank (in a session of its own)
        start = time.monotonic()
        node0.wait(timeout=60)
        assert time.monotonic() - start < 30
        err = logs[0].read_text()
        assert node0.returncode != 0 and "rank 1 has not answered" in err, err[-3000:]
    finally:
        for p in (node0, node1):
            _kill_tree(p.pid)
            p.wait()
