"""Bad input ends in exactly one ``error:`` line, a non-zero exit status and a root that holds
nothing new: the preflight (root, consent for remote code, config file), the checks of
models, tokenizers and datasets before anything is sampled or published, encoders refused,
and the flows' Prefect server startup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_gpt2

from dispersion.config import parse_config
from dispersion.core.errors import ConfigError, DataError
from dispersion.core.preflight import check_root, preflight
from dispersion.core.storage import Store
from dispersion.measure.scan import plan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny local model folders: a good GPT-2 with a byte-level BPE tokenizer, the same
    weights as ``pytorch_model.bin`` only, and a BERT encoder (all built here, no download)."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    base = tmp_path_factory.mktemp("models")
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    good = base / "gpt2"
    model = tiny_gpt2(len(fast), 0)
    model.save_pretrained(good)
    fast.save_pretrained(good)
    bin_only = base / "bin-only"
    bin_only.mkdir()
    for f in good.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bin_only / f.name)
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    bert = base / "bert"
    BertModel(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    fast.save_pretrained(bert)
    return {"good": good, "bin": bin_only, "bert": bert}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A local dataset (one Parquet file) with text enough for a few segments."""
    folder = tmp_path_factory.mktemp("data") / "ds"
    (folder / "data").mkdir(parents=True)
    rows = [f"document {i}: the quick brown fox jumps over the lazy dog, again and again." * 3 for i in range(40)]
    pq.write_table(pa.table({"text": rows}), folder / "data" / "train-00000.parquet")
    return folder


def _cfg(folders, data, root, **over) -> dict:
    cfg = {"name": "t", "root": str(root), "models": [{"name": "m", "id": str(folders["good"])}],
           "datasets": [{"name": "d", "hf": {"path": str(data), "split": "train"}}],
           "sampling": {"num_segments": 10, "segment_length": 16, "shard_size": 5, "seed": 1},
           "extraction": {"layers": ["final"], "device": "cpu"}, "analysis": {"bin_size": 3}}
    cfg.update(over)
    return cfg


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _tree(path: Path) -> set[str] | None:
    """Every file and folder under ``path`` (hidden ones too); None if it does not exist."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _dispersion(capsys, monkeypatch, *args: str) -> tuple[int, list[str]]:
    """Run the ``dispersion`` command in process; (exit status, lines of stderr)."""
    from dispersion import cli

    monkeypatch.setattr(sys, "argv", ["dispersion", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return int(exit_.value.code or 0), capsys.readouterr().err.splitlines()


def _one_error(code: int, lines: list[str], message: str) -> None:
    errors = [line for line in lines if line.startswith("error:")]
    assert code != 0, lines
    assert len(errors) == 1, lines
    assert message in errors[0], errors[0]


@pytest.fixture()
def root(tmp_path) -> Path:
    """An existing root with one file of the user's in it."""
    r = tmp_path / "root"
    r.mkdir()
    (r / "keep.txt").write_text("mine\n")
    return r


# -- the good case: the fixtures pass every check -------------------------------------------

def test_a_good_config_passes_and_plans(models, data, tmp_path):
    root = tmp_path / "out"
    cfg = parse_config(_cfg(models, data, root))
    store = preflight(str(root), cfg)
    assert _tree(root) is None  # the preflight creates nothing
    units = plan(cfg, store, log=lambda *_: None)
    assert len(units) == 2 and (root / "_done/segments").exists()


# -- B. bad datasets ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, message", [
    ("empty-jsonl", "datasets.0.hf: cannot read"),
    ("latin1-jsonl", "not UTF-8 text"),
    ("latin1-txt", "not UTF-8 text"),
])
def test_unreadable_dataset_files(models, tmp_path, root, capsys, monkeypatch, kind, message):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    if kind == "empty-jsonl":
        (folder / "data" / "train.jsonl").write_bytes(b"")
    elif kind == "latin1-jsonl":
        (folder / "data" / "train.jsonl").write_bytes(b'{"text": "caf\xe9 ' + b"x " * 200 + b'"}\n')
    else:
        (folder / "data" / "train.txt").write_bytes(b"caf\xe9 " + b"x " * 200 + b"\n")
    cfg = _write(tmp_path / "c.yaml", _cfg(models, folder, root))
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, "scan", "--no-progress", "-c", cfg)
    _one_error(code, err, message)
    assert _tree(root) == before


# -- B. bad config files --------------------------------------------------------------------

def test_config_with_unknown_protocol(capsys, monkeypatch, tmp_path):
    before = _tree(tmp_path)
    code, err = _dispersion(capsys, monkeypatch, "scan", "-c", "nosuchproto://bucket/c.yaml")
    _one_error(code, err, "nosuchproto://bucket/c.yaml: cannot open the config: Protocol not known")
    assert _tree(tmp_path) == before


def test_config_path_that_is_a_folder(capsys, monkeypatch, tmp_path):
    (tmp_path / "c.yaml").mkdir()
    before = _tree(tmp_path)
    code, err = _dispersion(capsys, monkeypatch, "scan", "-c", str(tmp_path / "c.yaml"))
    _one_error(code, err, "c.yaml: is a folder, not a config file")
    assert _tree(tmp_path) == before


def test_config_that_is_not_utf8(models, data, root, capsys, monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(yaml.safe_dump(_cfg(models, data, root)).encode() + b"# caf\xe9\n")
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, "scan", "-c", str(path))
    _one_error(code, err, "c.yaml: line ")
    assert "not UTF-8" in err[-1]
    assert _tree(root) == before


# -- B. bad roots ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["scan", "query"])
def test_root_with_unknown_protocol(models, data, capsys, monkeypatch, tmp_path, command):
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, "nosuchproto://bucket/x"))
    before = _tree(tmp_path)
    args = ["scan", "--no-progress", "-c", cfg] if command == "scan" else ["query", "-c", cfg, "SELECT 1"]
    code, err = _dispersion(capsys, monkeypatch, *args)
    _one_error(code, err, "root: cannot open 'nosuchproto://bucket/x': Protocol not known: nosuchproto")
    assert _tree(tmp_path) == before


def test_flow_root_with_unknown_protocol(models, data, capsys, tmp_path):
    from flows.__main__ import main

    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, tmp_path / "out"))
    before = _tree(tmp_path)
    code = main(["scan-models", "--config", cfg, "--root", "nosuchproto://bucket/x"])
    _one_error(code, capsys.readouterr().err.splitlines(), "root: cannot open 'nosuchproto://bucket/x'")
    assert _tree(tmp_path) == before


def test_flow_checkpoint_sweep_of_an_unknown_model_is_one_line(models, data, capsys, tmp_path):
    """``python -m flows checkpoint-sweep`` checks the swept config before Prefect starts."""
    from flows.__main__ import main

    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, tmp_path / "out"))
    before = _tree(tmp_path)
    code = main(["checkpoint-sweep", "--config", cfg, "--model", "nope", "--revisions", "step1"])
    _one_error(code, capsys.readouterr().err.splitlines(), "model: 'nope' is not in the config")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["scan", "query"])
def test_root_under_a_regular_file(models, data, capsys, monkeypatch, tmp_path, command):
    (tmp_path / "file").write_text("not a folder\n")
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, tmp_path / "file" / "sub"))
    before = _tree(tmp_path)
    args = ["scan", "--no-progress", "-c", cfg] if command == "scan" else ["query", "-c", cfg, "SELECT 1"]
    code, err = _dispersion(capsys, monkeypatch, *args)
    _one_error(code, err, f"root: {tmp_path / 'file' / 'sub'} cannot be created: {tmp_path / 'file'} is a file")
    assert _tree(tmp_path) == before


def test_root_on_a_read_only_file_system(models, data, tmp_path):
    """A read-only mount (root, in a mount namespace of its own) or a folder without write
    permission (any other user)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine\n")
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, ro / "root"))
    cli = [sys.executable, "-m", "dispersion.cli", "scan", "--no-progress", "-c", cfg]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if os.geteuid() == 0:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
            pytest.skip("no mount namespaces here to make a read-only file system")
        script = f'mount -t tmpfs -o ro tmpfs "{ro}" && exec "$@"'
        cli = ["unshare", "-m", "sh", "-c", script, "sh", *cli]
        reason = "Read-only file system"
    else:
        ro.chmod(0o555)
        reason = "Permission denied"
    try:
        before = _tree(tmp_path)
        out = subprocess.run(cli, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    finally:
        ro.chmod(0o755)
    _one_error(out.returncode, out.stderr.splitlines(), f"root: {ro / 'root'} is not writable")
    assert reason in out.stderr
    assert _tree(tmp_path) == before


def _no_credentials() -> dict[str, str | None]:
    from servers import set_env

    old = set_env({"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(k)
    return old


def _bucket(name: str) -> list[str]:
    import fsspec

    return sorted(fsspec.filesystem("s3", skip_instance_cache=True).find(name))


@pytest.mark.parametrize("command", ["scan", "query"])
def test_s3_root_without_credentials(models, data, capsys, monkeypatch, tmp_path, s3, command):
    from servers import restore_env

    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, "s3://dispersion-test/x"))
    before = _bucket("dispersion-test")
    old = _no_credentials()
    try:
        args = ["scan", "--no-progress", "-c", cfg] if command == "scan" else ["query", "-c", cfg, "SELECT 1"]
        code, err = _dispersion(capsys, monkeypatch, *args)
    finally:
        restore_env(old)
    _one_error(code, err, "root: no credentials for s3://dispersion-test/x")
    assert _bucket("dispersion-test") == before


def test_s3_root_with_a_missing_bucket(models, data, capsys, monkeypatch, tmp_path, s3):
    import fsspec

    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, "s3://no-such-bucket/x"))
    code, err = _dispersion(capsys, monkeypatch, "scan", "--no-progress", "-c", cfg)
    _one_error(code, err, "root: bucket 'no-such-bucket' does not exist")
    assert "no-such-bucket" not in [b.rstrip("/") for b in fsspec.filesystem("s3", skip_instance_cache=True).ls("")]


def test_a_good_s3_root_passes_and_keeps_nothing(s3):
    before = _bucket("dispersion-test")
    store = check_root("s3://dispersion-test/fresh")
    assert store.url().startswith("s3://dispersion-test/fresh")
    assert _bucket("dispersion-test") == before


# -- C. nothing published before the cheap checks -------------------------------------------

def test_model_with_only_pytorch_bin_publishes_nothing(models, data, root, capsys, monkeypatch, tmp_path):
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, root, models=[{"name": "m", "id": str(models["bin"])}]))
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, "scan", "--no-progress", "-c", cfg)
    _one_error(code, err, "models.0: ")
    assert "has no .safetensors weights (found pytorch_model.bin)" in err[-1]
    assert _tree(root) == before


def test_a_failing_sample_of_a_later_model_publishes_no_earlier_sample(models, data, root):
    """Samples are drawn for every (tokenizer, segment count) before any is written."""
    cfg = parse_config(_cfg(models, data, root, models=[
        {"name": "a", "id": str(models["good"])},
        {"name": "b", "id": str(models["good"]), "num_segments": 100000}]))
    before = _tree(root)
    with pytest.raises(DataError, match="sampling.num_segments"):
        plan(cfg, Store(str(root)), log=lambda *_: None)
    assert _tree(root) == before


@pytest.mark.parametrize("command", ["report", "analyze"])
def test_report_on_a_root_never_scanned(models, data, root, capsys, monkeypatch, tmp_path, command):
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, root))
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, command, "-c", cfg)
    _one_error(code, err, f"root: {root} holds no scan of this config")
    assert _tree(root) == before
    # sampled but never extracted: still one line, nothing written
    plan(parse_config(_cfg(models, data, root)), Store(str(root)), log=lambda *_: None)
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, command, "-c", cfg)
    _one_error(code, err, "is not done")
    assert _tree(root) == before


# -- D. encoders are refused ----------------------------------------------------------------

def test_an_encoder_is_refused(models, data, root, capsys, monkeypatch, tmp_path):
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, root, models=[{"name": "m", "id": str(models["bert"])}]))
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, "scan", "--no-progress", "-c", cfg)
    _one_error(code, err, "models.0: ")
    assert "is a bidirectional encoder (model_type 'bert'" in err[-1]
    assert _tree(root) == before


def test_the_causal_rule():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    from dispersion.measure.modeling import causal_lm_problem

    assert causal_lm_problem(GPT2Config(architectures=["GPT2LMHeadModel"])) is None
    assert causal_lm_problem(LlamaConfig(architectures=["LlamaForCausalLM"])) is None
    assert causal_lm_problem(LlamaConfig()) is None  # no architectures recorded: the model type decides
    assert causal_lm_problem(BertConfig(is_decoder=True, architectures=["BertLMHeadModel"])) is None
    assert "bidirectional encoder" in causal_lm_problem(BertConfig(architectures=["BertModel"]))
    assert "encoder-decoder" in causal_lm_problem(T5Config())
    assert "no causal LM head" in causal_lm_problem(LlamaConfig(architectures=["LlamaForSequenceClassification"]))


# -- E. remote code needs the flag ----------------------------------------------------------

@pytest.mark.parametrize("where, patch", [
    ("models.0.trust_remote_code", {"models": [{"name": "m", "id": "x", "trust_remote_code": True}]}),
    ("datasets.0.hf.trust_remote_code",
     {"datasets": [{"name": "d", "hf": {"path": "x", "trust_remote_code": True}}]}),
])
def test_remote_code_needs_the_flag(models, data, root, capsys, monkeypatch, tmp_path, where, patch):
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, root, **patch))
    before = _tree(root)
    code, err = _dispersion(capsys, monkeypatch, "scan", "--no-progress", "-c", cfg)
    _one_error(code, err, f"error: {where}: true would run code")
    assert "--trust-remote-code" in err[-1]
    assert _tree(root) == before


def test_remote_code_with_the_flag_passes_the_preflight(models, data, root, capsys):
    cfg = parse_config(_cfg(models, data, root, models=[{"name": "m", "id": "x", "trust_remote_code": True}]))
    with pytest.raises(ConfigError, match="models.0.trust_remote_code"):
        preflight(str(root), cfg)
    assert preflight(str(root), cfg, trust_remote_code=True).local


def test_flow_remote_code_needs_the_flag(models, data, root, capsys, tmp_path):
    from flows.__main__ import main

    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, root,
                                            models=[{"name": "m", "id": "x", "trust_remote_code": True}]))
    before = _tree(root)
    code = main(["scan-models", "--config", cfg])
    _one_error(code, capsys.readouterr().err.splitlines(), "models.0.trust_remote_code: true would run code")
    assert _tree(root) == before


# -- F. the flows' Prefect server -----------------------------------------------------------

def test_flows_wait_longer_for_prefect_and_name_the_setting(models, data, root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    env.pop("PREFECT_API_URL", None)
    probe = subprocess.run([sys.executable, "-c", "import flows\nfrom prefect.settings import "
                            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s\nprint(s.value())"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert probe.stdout.strip() == "120", probe.stderr
    # a server that cannot start in time: one line naming the setting, nothing written
    cfg = _write(tmp_path / "c.yaml", _cfg(models, data, root))
    before = _tree(root)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "0"
    out = subprocess.run([sys.executable, "-m", "flows", "scan-models", "--config", cfg],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    _one_error(out.returncode, out.stderr.splitlines(), "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    assert _tree(root) == before


def test_unreachable_ray_address_is_one_line():
    import time

    from servers import free_port

    from dispersion.core.config import RaySpec
    from tasks.ray_units import RayError, connect

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RayError, match=rf"ray.address: cannot reach '127.0.0.1:{port}'"):
        connect(RaySpec(address=f"127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 10
