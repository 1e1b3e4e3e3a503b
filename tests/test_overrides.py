"""Command-line models, datasets and ``-o`` assignments (dispersion.core.overrides) and
``id: org/name@rev`` in configs."""

from __future__ import annotations

import pytest
import yaml

from dispersion.config import load_config, parse_config
from dispersion.core.errors import ConfigError
from dispersion.core.overrides import apply_overrides, dataset_entry, model_entry

BASE = {"name": "t", "root": "runs/t", "models": [{"name": "a", "zoo": "gpt2-tiny"}],
        "datasets": [{"name": "prose", "embedded": "prose"}]}


@pytest.mark.parametrize("spec, entry", [
    ("EleutherAI/pythia-70m@step1000", {"name": "pythia-70m", "id": "EleutherAI/pythia-70m", "revisions": ["step1000"]}),
    ("EleutherAI/pythia-70m", {"name": "pythia-70m", "id": "EleutherAI/pythia-70m"}),
    ("p=EleutherAI/pythia-70m@step1,step2", {"name": "p", "id": "EleutherAI/pythia-70m", "revisions": ["step1", "step2"]}),
    ("zoo:gpt2-tiny@all", {"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": "all"}),
    ("zoo:gpt2-tiny@step0,final", {"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step0", "final"]}),
    ("packaged:smollm2-135m", {"name": "smollm2-135m", "packaged": "smollm2-135m"}),
    ("gguf:/models/x y.gguf", {"name": "x-y.gguf", "gguf": "/models/x y.gguf"}),
])
def test_model_entries(spec, entry):
    assert model_entry(spec) == entry


def test_a_local_folder_is_named_after_it_and_a_missing_one_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my model").mkdir(parents=True)
    assert model_entry("./runs/my model/") == {"name": "my-model", "id": "./runs/my model/"}
    with pytest.raises(ConfigError, match=r"^--model ./runs/other: no such model folder './runs/other'$"):
        model_entry("./runs/other")


@pytest.mark.parametrize("spec, entry", [
    ("embedded:prose", {"name": "prose", "embedded": "prose"}),
    ("embedded:code:test", {"name": "code", "embedded": "code", "split": "test"}),
    ("hf:wikitext:wikitext-103-raw-v1:validation:text",
     {"name": "wikitext-103-raw-v1", "hf": {"path": "wikitext", "name": "wikitext-103-raw-v1",
                                            "split": "validation", "text_field": "text"}}),
    ("wt=hf:Salesforce/wikitext", {"name": "wt", "hf": {"path": "Salesforce/wikitext"}}),
])
def test_dataset_entries(spec, entry):
    assert dataset_entry(spec) == entry


@pytest.mark.parametrize("bad, says", [
    ("embedded", "expected embedded:DOMAIN"), ("hf:", "expected embedded:DOMAIN"), ("x=", "nothing after 'x='"),
])
def test_bad_dataset_entries_name_the_flag(bad, says):
    with pytest.raises(ConfigError, match=says):
        dataset_entry(bad)


def test_overrides_set_nested_fields_lists_and_yaml_values():
    out = apply_overrides(BASE, models=["zoo:llama-small@step0"],
                          overrides=["sampling.num_segments=300", "models.0.dtype=bfloat16",
                                     "extraction.layers=[1, final]", "analysis.pool=mean"])
    cfg = parse_config(out)
    assert cfg.sampling.num_segments == 300 and cfg.models[0].dtype == "bfloat16"
    assert cfg.models[0].zoo == "llama-small" and cfg.models[0].revisions == ["step0"]
    assert cfg.extraction.layers == [1, "final"] and cfg.analysis.pool == "mean"
    assert BASE["models"][0] == {"name": "a", "zoo": "gpt2-tiny"}  # the input is not changed


@pytest.mark.parametrize("assignment, says", [
    ("sampling", "expected key.path=value"),
    ("=3", "expected key.path=value"),
    ("models.3.dtype=x", r"models.3: no list item 3 \(the list has 1\)"),
    ("name.x=1", "name is a value"),
    ("sampling.num_segments=[1", "not valid YAML"),
])
def test_bad_overrides_are_one_line_errors(assignment, says):
    with pytest.raises(ConfigError, match=says):
        apply_overrides(BASE, overrides=[assignment])


def test_an_override_of_an_unknown_field_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="sampling.num_segmentz: Extra inputs are not permitted"):
        parse_config(apply_overrides(BASE, overrides=["sampling.num_segmentz=3"]))


def test_id_at_revision_in_a_config():
    cfg = parse_config({**BASE, "models": [{"name": "p", "id": "EleutherAI/pythia-70m@step1000"}]})
    assert cfg.models[0].id == "EleutherAI/pythia-70m" and cfg.models[0].revisions == ["step1000"]
    with pytest.raises(ConfigError, match="give them once"):
        parse_config({**BASE, "models": [{"name": "p", "id": "org/m@step1", "revisions": ["step2"]}]})


def test_a_local_folder_with_an_at_sign_is_kept(tmp_path):
    folder = tmp_path / "model@v2"
    folder.mkdir()
    cfg = parse_config({**BASE, "models": [{"name": "p", "id": str(folder)}]})
    assert cfg.models[0].id == str(folder) and cfg.models[0].revisions == ["main"]


def test_command_line_without_a_config(tmp_path):
    cfg = load_config(None, models=["zoo:gpt2-tiny@step0"], overrides=["sampling.num_segments=50"])
    assert (cfg.name, cfg.root) == ("gpt2-tiny", "runs/gpt2-tiny")
    assert [d.name for d in cfg.datasets] == ["prose", "code"] and cfg.sampling.num_segments == 50
    with pytest.raises(ConfigError, match="give --config FILE or at least one --model"):
        load_config(None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, datasets=["embedded:code:test"], overrides=["root=runs/elsewhere"])
    assert cfg.datasets[0].split == "test" and cfg.root == "runs/elsewhere" and cfg.models[0].zoo == "gpt2-tiny"


def test_a_checkpoint_sweep_narrows_the_config_to_one_model(tmp_path):
    """The checkpoint-sweep flow's config: one model at the given revisions, or a local folder
    per globbed checkpoint (ordered by step, whatever the source was); bad requests name the field."""
    from dispersion.core.overrides import CheckpointSweep

    path = tmp_path / "c.yaml"
    two = {**BASE, "models": [*BASE["models"], {"name": "b", "id": "org/b", "revisions": ["main"]}]}
    path.write_text(yaml.safe_dump(two))
    cfg = load_config(path, sweep=CheckpointSweep("b", revisions=["step1", "step2"]))
    assert cfg.name == "t-sweep-b" and [(m.name, m.id, m.revisions) for m in cfg.models] == [
        ("b", "org/b", ["step1", "step2"])]
    for step in (20, 3, 100):
        (tmp_path / "ckpt" / f"step{step}").mkdir(parents=True)
    cfg = load_config(path, sweep=CheckpointSweep("a", checkpoint_glob=str(tmp_path / "ckpt" / "step*")))
    m = cfg.models[0]
    assert (m.source_kind, m.id, m.revisions) == ("id", str(tmp_path / "ckpt"), ["step3", "step20", "step100"])
    no_name = tmp_path / "n.yaml"
    no_name.write_text(yaml.safe_dump({k: v for k, v in two.items() if k != "name"}))
    assert load_config(no_name, sweep=CheckpointSweep("a", revisions=["step0"])).name == "default-sweep-a"
    for sweep, says in [(CheckpointSweep("c", ["step1"]), r"^model: 'c' is not in the config \(models: \['a', 'b'\]\)$"),
                        (CheckpointSweep("a"), "^give exactly one of revisions or checkpoint_glob$"),
                        (CheckpointSweep("a", ["s"], "x*"), "^give exactly one of revisions or checkpoint_glob$"),
                        (CheckpointSweep("a", []), "^revisions: must not be empty$"),
                        (CheckpointSweep("a", None, str(tmp_path / "none*")), "checkpoint_glob: .* matches no folder$")]:
        with pytest.raises(ConfigError, match=says):
            load_config(path, sweep=sweep)
