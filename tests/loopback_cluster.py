"""A Ray cluster of several nodes on this machine, for the tests, reachable from this machine only.

Ray's servers listen on every interface unless a node's address is exactly 127.0.0.1, and
`ray start` rewrites 127.0.0.1 to the machine's network address (a second `ray start` with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 refuses to run). Ray's own `ray.cluster_utils.Cluster`
(its documented way to test a multi-node cluster on one machine) starts every node on
127.0.0.1, so everything binds to loopback. Token auth is off, as for every test cluster.
Nodes are declared dead after about 3 s without a heartbeat (Ray's default is about 15 s).

    python -m tests.loopback_cluster TEMP_DIR [NODES]

prints one JSON line, {"address": GCS address, "nodes": [{"node_id", "raylet_pid"}, ...]}, and
holds the cluster until SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.update(
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_AUTH_MODE="disabled",
    RAY_health_check_period_ms="1000",
    RAY_health_check_timeout_ms="1000",
    RAY_health_check_failure_threshold="3",
)


def main(temp_dir: str, n_nodes: int = 2) -> None:
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Cluster.add_node writes the head's address to <default temp dir>/ray_current_cluster
    # without creating the folder: on a machine where Ray never ran it does not exist yet.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False, temp_dir=temp_dir))
    nodes = [cluster.head_node] + [cluster.add_node(num_cpus=1) for _ in range(n_nodes - 1)]
    signal.signal(signal.SIGTERM, lambda *_: (cluster.shutdown(), sys.exit(0)))
    print(
        json.dumps(
            {
                "address": cluster.address,
                "nodes": [
                    {
                        "node_id": n.node_id,
                        "raylet_pid": n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid,
                    }
                    for n in nodes
                ],
            }
        ),
        flush=True,
    )
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
