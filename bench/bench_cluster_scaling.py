"""Cluster scaling: completed trials per hour on 1, 2 and 4 Ray nodes of the same size.

Each point is a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster:
a head that runs only the driver, plus N worker nodes of ``--cpus-per-node`` logical
CPUs) running the same search: the demo space's trials at a fixed length (FIFO, no
early stopping), ``--trial-cpu`` logical CPUs per trial. Two figures per N:

- against linear: trials/hour at N nodes over N x trials/hour at 1 node (1.0 = linear;
  goal >= 0.8 at 4). It measures the machine as much as cxrtune: N nodes of a machine
  with fewer cores than their logical CPUs share those cores.
- against one node: the same search (same trials, same logical CPUs, same concurrency)
  on ONE node with N x cpus-per-node CPUs, the baseline run in the same invocation. The
  ratio is what spreading the trials over N nodes costs (the data shipped to every node,
  a worker pool per node, cross-node scheduling and checkpoint persistence), with the
  core count held the same.

``--batches`` keeps each epoch to a few tiny batches so that trial start-up, Ray's
scheduling, result handling and cxrtune's driver weigh, not the convolutions.

    python bench/bench_cluster_scaling.py [--nodes 1 2 4] [--trials-per-node 4] [--epochs 3] [--trial-cpu 0.5]
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


def search_on(nodes: int, args: argparse.Namespace, tmp: Path, *, one_node: bool = False) -> float:
    """Seconds a search of ``nodes * trials_per_node`` trials takes on ``nodes`` workers
    (``one_node``: on a single worker with the CPUs of all ``nodes``)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for cpus in [nodes * args.cpus_per_node] if one_node else [args.cpus_per_node] * nodes:
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        spec = load_spec("demo", [
            "data.image_size=32", "data.synthetic_n=120", "fixed.loop.batch_size=16",
            f"fixed.loop.max_train_batches={args.batches}", "fixed.loop.max_eval_batches=1",
            f"fixed.loop.epochs={args.epochs}", "search.scheduler.name=fifo", "search.algorithm=random",
            f"search.num_samples={nodes * args.trials_per_node}",
            f"search.max_concurrent={int(nodes * args.cpus_per_node / args.trial_cpu)}",
            f"resources.cpu={args.trial_cpu}", f"storage.path={tmp / f'ray-{nodes}-{one_node}'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.register_model=null",
            f"name=scale{nodes}{'one' if one_node else ''}"])
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
    p.add_argument("--trial-cpu", type=float, default=1.0, help="logical CPUs per trial (0.5: two per CPU)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    rates, one_node = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nodes:
            trials = n * args.trials_per_node
            rates[n] = trials / search_on(n, args, Path(tmp)) * 3600
            if n > 1:
                one_node[n] = trials / search_on(n, args, Path(tmp), one_node=True) * 3600
            log.info("%d node(s): %d trials, %.0f trials/hour%s", n, trials, rates[n],
                     f" (one node with the same CPUs: {one_node[n]:.0f})" if n in one_node else "")
    base = rates[args.nodes[0]] / args.nodes[0]
    efficiency = {n: rates[n] / (n * base) for n in args.nodes}
    against_one = {n: rates[n] / one_node[n] for n in one_node}
    for n in args.nodes:
        log.info("%d node(s): %.2f of linear%s", n, efficiency[n],
                 f", {against_one[n]:.2f} of one node with the same CPUs" if n in against_one else "")
    print(json.dumps({"bench": "cluster_scaling", "trials_per_hour": {str(n): round(r) for n, r in rates.items()},
                      "efficiency": {str(n): round(e, 3) for n, e in efficiency.items()},
                      "one_node_same_cpus_trials_per_hour": {str(n): round(r) for n, r in one_node.items()},
                      "ratio_to_one_node": {str(n): round(r, 3) for n, r in against_one.items()},
                      "cpus_per_node": args.cpus_per_node, "trial_cpu": args.trial_cpu, "epochs": args.epochs,
                      "batches": args.batches}))


if __name__ == "__main__":
    main()
