"""Shared fixtures: a micro zoo built once per session, offline everything, temp homes."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """Keep caches of HF, DuckDB etc. out of the user's home."""
    home = tmp_path_factory.mktemp("home")
    for var in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "MPLCONFIGDIR", "PREFECT_HOME"):
        os.environ[var] = str(home / var.lower())
    ray_tmp = Path("/tmp") / f"rt{os.getpid()}"  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("PREFECT_API_URL", None)
    yield
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """A tiny zoo for end-to-end tests: both architectures, 20 training steps, 3 checkpoints
    (step0, step10, step20: the fewest over which a trajectory Spearman is computed). Scans
    from :func:`scan_config_dict` read step0 and step20 of gpt2-tiny unless they ask for more."""
    from dispersion.core.config import ZooSpec
    from dispersion.training.zoo import build_zoo

    spec = ZooSpec(cache=str(tmp_path_factory.mktemp("zoo")), vocab_size=512, train_steps=20,
                   checkpoints=[0, 10, 20], batch_size=8, seq_len=64)
    build_zoo(spec, names=["gpt2-tiny", "llama-small"], progress=False)
    return spec


def scan_config_dict(zoo, root, **over):
    cfg = {
        "name": "t",
        "root": str(root),
        "models": [{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step0", "step20"]},
                   {"name": "llama-small", "zoo": "llama-small", "revisions": ["step20"]}],
        "datasets": [{"name": "prose", "embedded": "prose", "split": "validation"},
                     {"name": "code", "embedded": "code", "split": "validation"}],
        "sampling": {"num_segments": 90, "segment_length": 32, "shard_size": 30, "seed": 3},
        "extraction": {"layers": [1, "final"], "pools": ["last", "mean"], "context_lengths": [8],
                       "batch_size": 16},
        "analysis": {"bin_size": 10, "select_bins": 5},
        "zoo": zoo.model_dump(),
    }
    cfg.update(over)
    return cfg


def tiny_gpt2(vocab: int, bos: int | None):
    """A seeded 3-block GPT-2 (d 32, 64 positions), in eval mode; ``bos`` is also eos."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                     bos_token_id=bos, eos_token_id=bos)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab: int, bos: int):
    """A seeded 3-layer Llama (d 32, grouped-query attention, 64 positions), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=bos, eos_token_id=bos, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and far faster than two on a busy machine);
    modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def s3():
    """moto's S3 server on loopback behind a TCP proxy (``proxy.outage(s)`` drops it for a
    while); bucket ``dispersion-test``; the AWS environment points at it during the test."""
    import fsspec

    from servers import MotoServer, TcpProxy, restore_env, s3_env, set_env

    server = MotoServer()
    proxy = TcpProxy(server.port)
    old = set_env(s3_env(proxy.port))
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("dispersion-test")
    try:
        yield proxy
    finally:
        restore_env(old)
        proxy.stop()
        server.stop()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module's flow tests (each start costs seconds of both cores); the
    flows join it (``connect`` finds Ray running) and leave it running."""
    import ray
    from tasks.ray_units import connect

    from dispersion.core.config import RaySpec

    started = connect(RaySpec())
    yield
    if started:
        ray.shutdown()


# The longest files first: `--dist loadfile` hands whole files to the two workers in collection
# order, so a long file collected last leaves one worker idle at the end.
LONG_FIRST = ("test_flows.py", "test_deploy.py", "test_flows_s3.py", "test_scan.py", "test_analyses.py",
              "test_leases.py", "test_train_sweep.py", "test_catalog.py", "test_gguf.py", "test_hardness.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def exact_p(x, y) -> float:
    """Spearman's two-sided p by counting every ordering of ``y`` (scipy's rho each time): the
    naive reference of :func:`dispersion.measure.binning.spearman_exact_p`."""
    import itertools

    import numpy as np
    from scipy.stats import spearmanr

    obs = abs(spearmanr(x, y).statistic)
    y = np.asarray(y, float)
    return float(np.mean([abs(spearmanr(x, y[list(p)]).statistic) >= obs - 1e-12
                          for p in itertools.permutations(range(len(y)))]))
