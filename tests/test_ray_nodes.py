"""A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, Ray's own test harness): when a node is
lost mid-run, its actor's batches are sent to the live node's actor and the run finishes with nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probe.run.driver import RunOptions, run_suite

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

SUITE = """
name: nodes
models: [tiny]
seeds: 4
probes:
  - name: p
    prompts: [a red apple on a table, a lighthouse at dusk, a bowl of soup]
    steps: [1, 2]
"""


class LoseNodeAfterFirstBatch:
    """Progress that removes the second node (its raylet is killed) once the first batch is durable."""

    def __init__(self, cluster, node) -> None:
        self.cluster, self.node, self.removed = cluster, node, False

    def start(self, total: int) -> None: ...
    def group(self, label: str, total: int) -> None: ...
    def finish(self) -> None: ...

    def advance(self, n: int) -> None:
        if not self.removed:
            self.cluster.remove_node(self.node)
            self.removed = True


def test_a_lost_node_s_batches_are_made_on_the_live_node(write_suite, tmp_path):
    from ray.cluster_utils import Cluster

    from probe.generate.ray_executor import RayExecutor

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    executor = None
    try:
        # The driver joins before the second node exists, so it attaches to the head's raylet: a driver attached
        # to the raylet that is then removed is ended by Ray itself (both raylets share 127.0.0.1).
        ray.init(address=cluster.address)
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
        executor = RayExecutor(workers=2, start_timeout=30).connect()  # one actor per node (1 CPU each)
        progress = LoseNodeAfterFirstBatch(cluster, second)
        summary = run_suite(write_suite(SUITE), RunOptions(reports_root=tmp_path / "out", cache_dir=tmp_path / "c",
                                                           batch_size=2), progress=progress, executor=executor)
        assert progress.removed and executor.deaths >= 1
        assert summary.counts.generated == summary.counts.planned == 24 and not summary.failures
        ledger = [json.loads(line)["key"] for line in (summary.run_dir / "progress.jsonl").read_text().splitlines()]
        assert len(ledger) == len(set(ledger)) == 24
        assert len(list(Path(summary.run_dir / "images").rglob("*.png"))) == 24
    finally:
        if executor is not None:
            executor.close()
        ray.shutdown()
        cluster.shutdown()


def test_an_address_nobody_listens_on_fails_at_once_with_the_fix():
    import socket
    import time

    from probe.errors import ProbeError, UsageError
    from probe.generate.ray_executor import RayExecutor

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(ProbeError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}.*ray start --head"):
        RayExecutor(address=f"127.0.0.1:{port}").connect()
    assert time.monotonic() - started < 30 and not ray.is_initialized()
    with pytest.raises(UsageError, match="use HOST:PORT"):
        RayExecutor(address="headnode").connect()
