from pathlib import Path

import pytest

from dispersion.config import load_config, parse_config
from dispersion.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = {"models": [{"name": "m", "zoo": "gpt2-tiny"}], "datasets": [{"name": "d", "embedded": "prose"}]}


def test_default_config_is_valid():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.models[0].packaged == "smollm2-135m"  # the real model leads
    assert {m.zoo for m in cfg.models[1:]} == {"gpt2-tiny", "llama-small"}
    assert {d.embedded for d in cfg.datasets} == {"prose", "code"}


def test_smollm2_config_runs_the_single_model_steps():
    cfg = load_config(CONFIGS / "smollm2.yaml")
    assert [m.packaged for m in cfg.models] == ["smollm2-135m"]
    assert set(cfg.analysis.steps) == {"domains", "context", "layers", "vendi", "hardness", "gap", "condensation"}
    assert cfg.extraction.layers == ["all"] and max(cfg.extraction.context_lengths) <= cfg.sampling.segment_length


def test_paper_zoo_names_the_papers_models_and_datasets():
    cfg = load_config(CONFIGS / "paper-zoo.yaml")
    ids = {m.id for m in cfg.models}
    assert ids == {"meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B",
                   "google/gemma-2-2b", "google/gemma-2-9b", "mistralai/Mistral-7B-v0.1", "microsoft/phi-2",
                   "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-7B"}
    fields = {d.hf.path: d.hf.text_field for d in cfg.datasets}
    assert fields == {"Salesforce/wikitext": "text", "abisee/cnn_dailymail": "article",
                      "ccdv/pubmed-summarization": "article"}
    assert cfg.sampling.num_segments == 100_000 and cfg.sampling.segment_length == 512
    assert cfg.analysis.bin_size == 100


@pytest.mark.parametrize("patch, where", [
    ({"models": [{"name": "m", "zoo": "gpt2-tiny", "revisons": ["main"]}]}, "models.0.revisons"),
    ({"sampling": {"num_segments": "many"}}, "sampling.num_segments"),
    ({"sampling": {"num_segments": 0}}, "sampling.num_segments"),
    ({"extraction": {"sites": ["ffn"]}}, "extraction.sites.0"),
    ({"extraction": {"layers": []}}, "extraction.layers"),
    ({"datasets": [{"name": "d"}]}, "datasets.0"),
    ({"datasets": [{"name": "d", "hf": {"path": "x", "txt_field": "t"}}]}, "datasets.0.hf.txt_field"),
    ({"models": [{"name": "m", "id": "x", "revisions": "all"}]}, "models.0"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_fields_are_named(patch, where):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch}, "cfg.yaml")
    msg = str(err.value)
    assert msg.startswith(f"cfg.yaml: {where}:"), msg
    assert "\n" not in msg


def test_duplicate_names():
    with pytest.raises(ConfigError, match="duplicate"):
        parse_config({**MINIMAL, "datasets": [{"name": "d", "embedded": "prose"}, {"name": "d", "embedded": "code"}]})


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n  - name: x\n  datasets: {")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)


def test_extraction_key_ignores_batch_size_only():
    a = parse_config(MINIMAL).extraction
    b = parse_config({**MINIMAL, "extraction": {"batch_size": 3}}).extraction
    c = parse_config({**MINIMAL, "extraction": {"skip_first": 2}}).extraction
    assert a.key("float32") == b.key("float32") != c.key("float32")
    assert a.key("float32") != a.key("bfloat16")


def test_olmo_trajectory_resolves_the_papers_checkpoints_from_the_recorded_branches():
    from dispersion.measure.revisions import RevisionRange, expand_revisions
    from dispersion.core.ids import step_of

    cfg = load_config(CONFIGS / "olmo-trajectory.yaml")
    (m,) = cfg.models
    assert isinstance(m.revisions, RevisionRange) and m.revisions.branches_file
    revs = expand_revisions(m.id, m.revisions)  # the recorded list: no hub access
    steps = [step_of(r) for r in revs]
    assert len(revs) == 30 and steps[0] == 120_000 and steps[-1] == 700_000
    assert all(r.startswith("stage1-step") and "-tokens" in r for r in revs)
    assert cfg.analysis.steps == ["gap", "trajectory"]


def test_make_analyses_enables_every_step():
    from dispersion.config import ANALYSIS_STEPS

    cfg = load_config(CONFIGS / "analyses.yaml")
    knnlm = load_config(CONFIGS / "knnlm.yaml")  # its own scan in `make analyses`
    assert all(cfg.analysis.enabled(s) or knnlm.analysis.enabled(s) for s in ANALYSIS_STEPS)
    assert not cfg.analysis.enabled("knnlm")
    assert "knnlm" in (CONFIGS.parent / "Makefile").read_text().split("\nanalyses:", 1)[1].split("\n\n", 1)[0]
    assert "context" in cfg.extraction.pools and max(cfg.extraction.context_lengths) == cfg.sampling.segment_length


def test_train_sweep_config_has_the_issue_arms():
    from dispersion.training.sweep import arms, load_sweep_config

    cfg = load_sweep_config(str(CONFIGS / "train-sweep.yaml"))
    assert {a.loss for a in arms(cfg)} == {"none", "squeeze", "push_away", "dispersion"}
    assert len(cfg.grid.seeds) >= 2


def test_unknown_analysis_step_names_the_field():
    with pytest.raises(ConfigError, match=r"analysis.steps"):
        parse_config({**MINIMAL, "analysis": {"steps": ["nope"]}})


@pytest.mark.parametrize("patch, where, kind", [
    ({"models": [{"name": "m", "zoo": "gpt2-tiny", "num_segments": True}]}, "models.0.num_segments", "an integer"),
    ({"sampling": {"num_segments": True}}, "sampling.num_segments", "an integer"),
    ({"sampling": {"seed": False}}, "sampling.seed", "an integer"),
    ({"zoo": {"checkpoints": [0, True]}}, "zoo.checkpoints.1", "an integer"),
    ({"extraction": {"layers": [True]}}, "extraction.layers.0", "an integer"),
    ({"extraction": {"context_lengths": [8, True]}}, "extraction.context_lengths.1", "an integer"),
    ({"ray": {"num_cpus": True}}, "ray.num_cpus", "a number"),
    ({"analysis": {"layer": True}}, "analysis.layer", "an integer"),
])
def test_a_yaml_boolean_is_not_a_number(patch, where, kind):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch}, "cfg.yaml")
    msg = str(err.value)
    assert msg.startswith(f"cfg.yaml: {where}: must be {kind}, not a boolean"), msg
    assert "\n" not in msg


def test_a_yaml_boolean_in_a_loaded_file_is_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("models: [{name: m, zoo: gpt2-tiny, num_segments: yes}]\ndatasets: [{name: d, embedded: prose}]\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: models.0.num_segments: must be an integer, not a boolean"):
        load_config(path)


def test_booleans_still_fill_boolean_fields():
    cfg = parse_config({**MINIMAL, "extraction": {"prepend_bos": False}, "sampling": {"seed": 3}})
    assert cfg.extraction.prepend_bos is False and cfg.sampling.seed == 3


@pytest.mark.parametrize("root", ["", "   "])
def test_an_empty_root_is_refused(root):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "root": root}, "cfg.yaml")
    msg = str(err.value)
    assert msg.startswith("cfg.yaml: root: must not be empty"), msg
    assert "\n" not in msg


def test_an_empty_sweep_root_and_an_empty_store_root_are_refused():
    from dispersion.core.config import validate
    from dispersion.core.errors import DataError
    from dispersion.core.storage import Store
    from dispersion.training.sweep import SweepConfig

    with pytest.raises(ConfigError, match=r"^sweep.yaml: root: must not be empty"):
        validate(SweepConfig, {"root": ""}, "sweep.yaml")
    with pytest.raises(DataError, match=r"^root: must not be empty"):
        Store("")
