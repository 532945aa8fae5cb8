"""Two "nodes" on 127.0.0.1 (`--nnodes 2 --node-rank 0|1 --dist-init-addr`): node 1 runs its rank
only (no engine, no HTTP) and takes its orders from rank 0 over a gloo group; node 0 serves the
OpenAI API with the same output as one process, and shutting it down stops node 1 too (exit 0)."""
from __future__ import annotations

import subprocess
import sys

import httpx
from server_util import running_server

from dsserve.core.distributed import free_local_address

COMMON = ["--dtype", "float32", "--max-total-tokens", "4096", "--tp", "2", "--nnodes", "2"]
BODY = {"model": "dsserve-tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
        "logprobs": 1}


def test_two_nodes_serve_the_output_of_one_process():
    with running_server(max_total_tokens=4096) as (_, server):
        want = httpx.post(server.url + "/v1/completions", json=BODY, timeout=120).json()["choices"][0]
    address = free_local_address().removeprefix("tcp://")
    node1 = subprocess.Popen([sys.executable, "-m", "dsserve.cli", *COMMON, "--node-rank", "1",
                              "--dist-init-addr", address], stderr=subprocess.PIPE, text=True)
    try:
        with running_server(max_total_tokens=4096, tp_size=2, nnodes=2, node_rank=0,
                            dist_init_addr=address) as (engine, server):
            got = httpx.post(server.url + "/v1/completions", json=BODY, timeout=120).json()["choices"][0]
        assert got["text"] == want["text"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"]["token_logprobs"],
                                              want["logprobs"]["token_logprobs"])) < 1e-5
        assert node1.wait(timeout=60) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
    err = node1.stderr.read()
    assert "dsserve node 1: ranks 1..1 of 2 joined the group at " + address in err, err


def test_a_missing_node_is_named_after_the_timeout():
    import pytest

    from dsserve import Engine

    address = free_local_address().removeprefix("tcp://")
    with pytest.raises(RuntimeError, match=rf"rank 0 of 2: the rendezvous at tcp://{address} did not complete "
                                           r"within 5 s"):
        Engine(dtype="float32", max_total_tokens=1024, tp_size=2, nnodes=2, dist_init_addr=address, dist_timeout=5)
