"""What the flow tests share: a small scan config, its features by key, and the in-process
reference every orchestrated run must reproduce."""

from pathlib import Path

import numpy as np
from conftest import scan_config_dict

from dispersion.core.storage import Store
from dispersion.run import run_scan

QUIET = {"progress": False, "log": lambda *_: None}


def flow_config(zoo, root, path: Path) -> str:
    import yaml

    cfg = scan_config_dict(zoo, root,
                           models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step0", "step20"]}],
                           datasets=[{"name": "code", "embedded": "code"}],
                           sampling={"num_segments": 60, "segment_length": 32, "shard_size": 15, "seed": 5},
                           ray={"num_cpus": 1})
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def features_of(store: Store) -> dict:
    """(model, revision, segment_id) -> ppl over every features shard under a store."""
    out = {}
    for rel in store.glob("features/*/*/*/*/*/shard-*.parquet"):
        parts = dict(p.split("=", 1) for p in rel.split("/")[1:-1])
        t = store.read_table(rel)
        for sid, ppl in zip(t.column("segment_id").to_pylist(), t.column("ppl").to_pylist()):
            key = (parts["model"], parts["revision"], sid)
            assert key not in out, f"duplicate segment {key}"
            out[key] = ppl
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 2 * 60
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=1e-5)


def reference_scan(micro_zoo, tmp: Path) -> tuple[dict, object]:
    """The in-process scan: the numbers every orchestrated run must reproduce."""
    from dispersion.config import load_config

    result = run_scan(load_config(flow_config(micro_zoo, tmp / "out", tmp / "cfg.yaml")), **QUIET)
    return features_of(Store(str(tmp / "out"))), result.tables["correlations"]
