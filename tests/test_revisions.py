"""OLMo-style branch names, step-range resolution, the recorded OLMo 2 7B list, errors."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from dispersion.core.errors import ConfigError, DataError, ModelError
from dispersion.measure.revisions import (
    Branch,
    RevisionRange,
    expand_revisions,
    list_hub_branches,
    parse_branch,
    parse_branches,
    read_branches_file,
    resolve_revisions,
    target_steps,
)

DATA = Path(__file__).resolve().parent / "data"
RECORDED = DATA / "olmo-7b-branches.txt"
PAPER_TARGETS = list(range(120000, 700001, 20000))


@pytest.mark.parametrize("name, stage, step, tokens", [
    ("step1000-tokens4B", None, 1000, 4 * 10**9),
    ("step0-tokens0B", None, 0, 0),
    ("step557000-tokens2464B", None, 557000, 2464 * 10**9),
    ("step20000-tokens84B", None, 20000, 84 * 10**9),
    ("step1000-tokens4096M", None, 1000, 4096 * 10**6),
    ("step477000-tokens2T", None, 477000, 2 * 10**12),
    ("step1000-tokens4.2B", None, 1000, 4_200_000_000),
    ("stage1-step140000-tokens588B", "stage1", 140000, 588 * 10**9),
    ("stage1-step928646-tokens3896B", "stage1", 928646, 3896 * 10**9),
    ("stage2-ingredient1-step11931-tokens50B", "stage2-ingredient1", 11931, 50 * 10**9),
    ("stage2-ingredient3-step1000-tokens5B", "stage2-ingredient3", 1000, 5 * 10**9),
    ("stage2-ingredient1-step23852-tokens51B", "stage2-ingredient1", 23852, 51 * 10**9),
    ("step143000", None, 143000, None),
    ("stage1-step150", "stage1", 150, None),
])
def test_parse_checkpoint_names(name, stage, step, tokens):
    assert parse_branch(name) == Branch(name, stage, step, tokens)


@pytest.mark.parametrize("name", ["main", "", "refs/pr/1", "step_360", "stepX-tokens4B", "v1.0",
                                  "step1000-tokens4", "step1000-tokens4Q", "main-step", "-step10",
                                  "step1000-tokens4B-final", "gh-pages"])
def test_non_checkpoint_names_are_ignored(name):
    assert parse_branch(name) is None


def test_parse_branches_drops_others_and_duplicates():
    names = ["main", "step2000-tokens9B", "step1000-tokens4B", "step2000-tokens9B", "notes"]
    assert [b.name for b in parse_branches(names)] == ["step2000-tokens9B", "step1000-tokens4B"]


def test_recorded_list_reads_and_parses():
    names = read_branches_file(RECORDED)
    assert names[0] == "main" and not any(n.startswith("#") for n in names)
    branches = parse_branches(names)
    assert len(branches) == len(names) - 1  # every line but main is a checkpoint
    stage1 = [b for b in branches if b.stage == "stage1"]
    assert max(b.step for b in stage1) == 928646
    # names quoted in public code agree with the reconstruction
    for real in ("stage1-step119000-tokens500B", "stage1-step239000-tokens1003B",
                 "stage1-step599000-tokens2513B", "stage1-step928646-tokens3896B",
                 "stage2-ingredient2-step11931-tokens50B"):
        assert real in names
    # tokens = ceil(step x 4096 x 1024 / 1e9) billions for every stage-1 branch
    for b in stage1:
        assert b.tokens == -(-b.step * 4194304 // 10**9) * 10**9, b.name


def test_paper_range_on_the_recorded_list():
    names = read_branches_file(RECORDED)
    chosen, missing = resolve_revisions(names, 120000, 700000, 20000, stage="stage1")
    assert missing == [260000, 540000]
    assert len(chosen) == 28
    assert chosen[0] == "stage1-step120000-tokens504B"
    assert chosen[-1] == "stage1-step700000-tokens2937B"
    assert [parse_branch(c).step for c in chosen] == [t for t in PAPER_TARGETS if t not in missing]
    # the same without a stage filter: stage-2 steps are far below 120000, nothing changes
    assert resolve_revisions(names, 120000, 700000, 20000) == (chosen, missing)


def test_tolerance_fills_missing_targets_with_the_earlier_neighbour():
    names = read_branches_file(RECORDED)
    chosen, missing = resolve_revisions(names, 120000, 700000, 20000, stage="stage1", tolerance=1000)
    assert missing == [] and len(chosen) == 30
    steps = [parse_branch(c).step for c in chosen]
    # 259000 and 261000 are both 1000 away: the earlier step wins
    assert steps[PAPER_TARGETS.index(260000)] == 259000
    assert steps[PAPER_TARGETS.index(540000)] == 539000
    assert len(set(chosen)) == 30


def test_tolerance_prefers_the_nearest_and_never_reuses_a_branch():
    names = ["step990-tokens4B", "step1020-tokens4B", "step2000-tokens8B", "step3400-tokens14B"]
    chosen, missing = resolve_revisions(names, 1000, 4000, 1000, tolerance=500)
    assert chosen == ["step990-tokens4B", "step2000-tokens8B", "step3400-tokens14B"]
    assert missing == [4000]  # 3400 is 600 away
    # two targets whose only candidate is the same branch: the second goes without
    chosen, missing = resolve_revisions(["step1500"], 1000, 2000, 1000, tolerance=500)
    assert chosen == ["step1500"] and missing == [2000]


def test_duplicated_steps_tie_rule_is_deterministic():
    names = ["stage2-ingredient2-step1000-tokens5B", "stage2-ingredient10-step1000-tokens5B",
             "stage2-ingredient1-step1000-tokens5B", "stage1-step1000-tokens5B",
             "step1000-tokens5B", "step2000-tokens9B", "step2000-tokens8B"]
    # unprefixed first, then the smaller token count
    assert resolve_revisions(names, 1000, 2000, 1000)[0] == ["step1000-tokens5B", "step2000-tokens8B"]
    assert resolve_revisions(list(reversed(names)), 1000, 2000, 1000)[0] == \
        ["step1000-tokens5B", "step2000-tokens8B"]
    # natural order of stage names: ingredient2 before ingredient10
    rest = [n for n in names if n.startswith("stage2")]
    assert resolve_revisions(rest, 1000, 1000, 1)[0] == ["stage2-ingredient1-step1000-tokens5B"]
    assert resolve_revisions(rest, 1000, 1000, 1, stage="stage2-ingredient10")[0] == \
        ["stage2-ingredient10-step1000-tokens5B"]


def test_stop_off_grid_and_branch_objects():
    branches = parse_branches(["step0", "step10", "step20", "step30"])
    assert target_steps(0, 25, 10) == [0, 10, 20]
    assert resolve_revisions(branches, 0, 25, 10) == (["step0", "step10", "step20"], [])


@pytest.mark.parametrize("args, kwargs, field", [
    ((-1, 10, 5), {}, "revisions.start"),
    ((10, 5, 5), {}, "revisions.stop"),
    ((0, 10, 0), {}, "revisions.every"),
    ((0, 10, -5), {}, "revisions.every"),
    ((0, 10, 2.5), {}, "revisions.every"),
    ((0, 10, 5), {"tolerance": -1}, "revisions.tolerance"),
    ((0, 10, 5), {"stage": "stage9"}, "revisions.stage"),
])
def test_errors_name_the_field(args, kwargs, field):
    with pytest.raises(ConfigError) as exc:
        resolve_revisions(["stage1-step0-tokens0B", "main"], *args, **kwargs)
    msg = str(exc.value)
    assert msg.startswith(field) and "\n" not in msg


def test_unknown_stage_lists_the_stages():
    with pytest.raises(ConfigError, match=r"stages: stage1, stage2-ingredient1"):
        resolve_revisions(["stage2-ingredient1-step5", "stage1-step5"], 0, 10, 5, stage="stage3")


def test_branches_file_errors_and_comments(tmp_path):
    with pytest.raises(DataError, match=r"^revisions.branches_file: no such file .*nope.txt"):
        read_branches_file(tmp_path / "nope.txt")
    f = tmp_path / "b.txt"
    f.write_text("# header\n\nmain\n  step10-tokens1B   # trailing note\nstep20-tokens2B\n")
    assert read_branches_file(f) == ["main", "step10-tokens1B", "step20-tokens2B"]


def test_list_hub_branches_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as exc:
        list_hub_branches("allenai/OLMo-2-1124-7B")
    assert "HF_HUB_OFFLINE" in str(exc.value) and "\n" not in str(exc.value)


def test_revision_range_model():
    spec = RevisionRange(start=120000, stop=700000, every=20000, stage="stage1",
                         branches_file=str(RECORDED))
    assert spec.tolerance == 0
    for bad in ({"start": 5, "stop": 1, "every": 1}, {"start": 0, "stop": 1, "every": 0},
                {"start": 0, "stop": 1, "every": 1, "tolerence": 3}):
        with pytest.raises(ValidationError):
            RevisionRange(**bad)


def test_expand_revisions_from_a_file(tmp_path, caplog):
    spec = RevisionRange(start=120000, stop=700000, every=20000, stage="stage1",
                         branches_file="olmo-7b-branches.txt")
    with caplog.at_level("WARNING", logger="dispersion.measure.revisions"):
        chosen = expand_revisions("allenai/OLMo-2-1124-7B", spec, base_dir=DATA)
    assert len(chosen) == 28 and "260000, 540000" in caplog.text
    empty = RevisionRange(start=2_000_000, stop=2_100_000, every=50_000, branches_file=str(RECORDED))
    with pytest.raises(ConfigError, match=r"^revisions: no branch of 'allenai/OLMo-2-1124-7B'"):
        expand_revisions("allenai/OLMo-2-1124-7B", empty)


def test_expand_revisions_hub_offline_and_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = RevisionRange(start=0, stop=20, every=10)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        expand_revisions("allenai/OLMo-2-1124-7B", spec)
    for name in ("step0", "step10", "step20", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert expand_revisions(str(tmp_path), spec) == ["step0", "step10", "step20"]
