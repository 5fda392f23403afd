"""The caption job on a two-node Ray cluster (ray.cluster_utils.Cluster on this machine): the engine actors
cannot fit on one node, so the job only finishes if it spreads over both; every id comes back exactly once, and
Ray's actor table shows one engine actor on each node."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.caption import run_caption_job
from pipelines.config import ActorPool

from tests.conftest import REPO_ROOT
from tests.pipelines.conftest import png_bytes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False,
                                                            "object_store_memory": 200 * 2**20,
                                                            "resources": {"head": 1}})
    cluster.add_node(num_cpus=3, object_store_memory=200 * 2**20, resources={"worker": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_job_spreads_actors_over_two_nodes(two_nodes, tmp_path, job_config):
    import dataclasses

    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    ids = [f"n{i:03d}" for i in range(24)]
    pq.write_table(pa.table({"id": ids, "image": [png_bytes(i) for i in range(24)]}), tmp_path / "in.parquet")
    # two actors of 2 CPUs each: with 3 CPUs per node they can only run one per node
    config = dataclasses.replace(job_config, actors=ActorPool(min_size=2, max_size=2, num_cpus=2))
    summary = run_caption_job(str(tmp_path / "in.parquet"), tmp_path / "out", config, address=two_nodes.address)
    rows = [r for f in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["id"] for r in rows) == ids and summary.errors == 0
    # where the engine actors ran, from the GCS actor table (it keeps finished actors and their node)
    from ray._private.state import actors

    engines = [a for a in actors().values() if a["ActorClassName"] == "MapWorker(MapBatches(GenerateStage))"]
    nodes = {a["Address"]["NodeID"] for a in engines}
    assert len(engines) == 2 and nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, \
        [(a["ActorClassName"], a.get("Name"), a["Address"]["NodeID"]) for a in actors().values()]
