"""Cluster scaling: completed trials per hour on 1, 2 and 4 Ray nodes of the same size.

Each point is a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster:
a head that runs only the driver, plus N worker nodes of ``--cpus-per-node`` logical
CPUs) running the same search: the demo space's trials at a fixed length (FIFO, no
early stopping), one trial per logical CPU of a node at a time. The figure is
trials/hour at N nodes over N x trials/hour at 1 node (1.0 = linear). Goal: >= 0.8 at 4.

On a machine with fewer cores than N x cpus-per-node, trials that compute would only
measure the core count; ``--batches`` keeps each epoch to a few tiny batches so the
figure measures Ray's scheduling, checkpoint persistence, result handling and
cxrtune's driver, which is what grows with the cluster.

    python bench/bench_cluster_scaling.py [--nodes 1 2 4] [--trials-per-node 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from cxrtune.search import run_search
from cxrtune.space import load_spec

log = logging.getLogger("bench_cluster_scaling")


def search_on(nodes: int, args: argparse.Namespace, tmp: Path) -> float:
    """Seconds a search of ``nodes * trials_per_node`` trials takes on ``nodes`` workers."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        spec = load_spec("demo", [
            "data.image_size=32", "data.synthetic_n=120", "fixed.loop.batch_size=16",
            f"fixed.loop.max_train_batches={args.batches}", "fixed.loop.max_eval_batches=1",
            f"fixed.loop.epochs={args.epochs}", "search.scheduler.name=fifo", "search.algorithm=random",
            f"search.num_samples={nodes * args.trials_per_node}",
            f"search.max_concurrent={nodes * args.cpus_per_node}", "resources.cpu=1",
            f"storage.path={tmp / f'ray-{nodes}'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.register_model=null", f"name=scale{nodes}"])
        start = time.perf_counter()
        summary = run_search(spec)
        took = time.perf_counter() - start
        assert summary["counts"]["completed"] == spec.search.num_samples, summary["counts"]
        return took
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--trials-per-node", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batches", type=int, default=2, help="training batches per epoch (tiny: see the docstring)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nodes:
            took = search_on(n, args, Path(tmp))
            rates[n] = n * args.trials_per_node / took * 3600
            log.info("%d node(s): %d trials in %.1f s = %.0f trials/hour", n, n * args.trials_per_node, took,
                     rates[n])
    base = rates[args.nodes[0]] / args.nodes[0]
    efficiency = {n: rates[n] / (n * base) for n in args.nodes}
    for n in args.nodes:
        log.info("%d node(s): efficiency %.2f of linear", n, efficiency[n])
    print(json.dumps({"bench": "cluster_scaling", "trials_per_hour": {str(n): round(r) for n, r in rates.items()},
                      "efficiency": {str(n): round(e, 3) for n, e in efficiency.items()},
                      "cpus_per_node": args.cpus_per_node, "epochs": args.epochs, "batches": args.batches}))


if __name__ == "__main__":
    main()
