"""Extraction throughput through Ray actors on 1 and 2 Ray nodes of this machine
(``ray.cluster_utils.Cluster``: each node is a real raylet with its own worker processes).

Scenarios (same work: two zoo models at their last checkpoint, both domains):
  1 node x 2 CPUs, one actor of 2 CPUs | 1 node x 2 CPUs, two actors of 1 CPU |
  2 nodes x 1 CPU, one actor of 1 CPU on each.
Prints tokens/s and the per-token cost per model (from the units' forward time), the inputs
of docs/SCALING.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from dispersion.config import load_config
    from dispersion.measure.scan import plan
    from dispersion.run import prepare_models
    from dispersion.core.storage import Store
    from tasks.ray_units import run_on_ray

    base = load_config("configs/default.yaml")
    models = [m.model_copy(update={"revisions": ["step300"]}) for m in base.models]
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    prepare_models(base, progress=False)
    rows = []
    for label, nodes, cpus_per_node, actor_cpus in [("1 node x 2 CPU, 1 actor x 2 CPU", 1, 2, 2),
                                                    ("1 node x 2 CPU, 2 actors x 1 CPU", 1, 2, 1),
                                                    ("2 nodes x 1 CPU, 2 actors x 1 CPU", 2, 1, 1)]:
        cfg = base.model_copy(update={"models": models,
                                      "ray": base.ray.model_copy(update={"num_cpus": actor_cpus})})
        root = os.path.join(tmp, label.replace(" ", "_"))
        store = Store(root)
        units = plan(cfg, store, log=lambda *_: None)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        ray.init(address=cluster.address, log_to_driver=False)
        t = time.perf_counter()
        run_on_ray(units, root, cfg.ray)
        markers = [store.read_json(u.marker_rel) for u in units]
        wall = time.perf_counter() - t
        ray.shutdown()
        cluster.shutdown()
        tokens = sum(u.n_rows for u in units) * (cfg.sampling.segment_length + 1)
        per_model = {}
        for u, m in zip(units, markers):
            per_model.setdefault(u.mr.model, [0.0, 0])
            per_model[u.mr.model][0] += m["forward_s"]
            per_model[u.mr.model][1] += u.n_rows * (cfg.sampling.segment_length + 1)
        rows.append((label, len({m["host"] for m in markers}), tokens, wall, per_model))
    print("\n| cluster | tokens | wall s (incl. actor start, model loads) | tokens/s |")
    print("|---|---:|---:|---:|")
    for label, _, tokens, wall, _ in rows:
        print(f"| {label} | {tokens} | {wall:.1f} | {tokens / wall:,.0f} |")
    print("\nper-token forward cost (one actor of 2 CPUs):")
    for model, (sec, tok) in rows[0][4].items():
        print(f"  {model}: {sec / tok * 1e6:.1f} us/token ({tok / sec:,.0f} tokens/s)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
