"""Dispersion losses (dispersion.training.losses) against naive O(N^2) loops, gradchecks, and the trainer hook."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from dispersion.training import losses as L
from dispersion.training import checkpoints as C
from dispersion.training import train as T
from dispersion.core.errors import ConfigError
from dispersion.measure.metrics import mean_cosine_distance_between
from reference import (  # the naive O(N^2) float64 loops (tests/reference.py)
    cosine_similarity as _cos,
    loss_cross_domain_push_away as naive_cross,
    loss_decorrelation as naive_decorrelation,
    loss_dispersion as naive_dispersion,
    loss_groups as _groups,
    loss_l2_repel as naive_l2,
    loss_mean_cosine_distance as naive_cos_dist,
    loss_orthogonalization as naive_orth,
    ordered_pairs as _pairs,
)

RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(seed=0, B=3, T=7, d=5, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, T, d, generator=g, dtype=torch.float64) + offset
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :] = True
    mask[1, 1:] = False  # one state: skipped by the per-sequence scope
    return H, mask


def _rel(a, b):
    return abs(float(a) - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------- values vs naive


@pytest.mark.parametrize("scope", ["flatten", "sequence"])
@pytest.mark.parametrize("masked", [False, True])
def test_cosine_losses_match_naive(scope, masked):
    H, mask = _data(1, offset=0.7)
    mask = mask if masked else None
    ref = naive_cos_dist(H, mask, scope)
    assert _rel(L.mean_cosine_distance(H, mask, scope), ref) < RTOL
    assert _rel(L.push_away(H, mask, scope), -ref) < RTOL
    assert _rel(L.squeeze(H, mask, scope), ref) < RTOL


@pytest.mark.parametrize("scope", ["flatten", "sequence"])
@pytest.mark.parametrize("masked", [False, True])
def test_pairwise_losses_match_naive(scope, masked):
    H, mask = _data(2, offset=0.3)
    mask = mask if masked else None
    for red in ("sum", "mean"):
        assert _rel(L.dispersion_loss(H, mask, 0.7, scope=scope, reduction=red),
                    naive_dispersion(H, mask, scope, 0.7, red)) < RTOL
        assert _rel(L.l2_repel(H, mask, 3.0, 0.2, scope=scope, reduction=red),
                    naive_l2(H, mask, scope, 3.0, 0.2, red)) < RTOL
        for axis in ("feature", "token"):
            assert _rel(L.decorrelation(H, mask, scope=scope, axis=axis, reduction=red),
                        naive_decorrelation(H, mask, scope, axis, red)) < RTOL
    assert _rel(L.orthogonalization(H, mask, scope=scope), naive_orth(H, mask, scope)) < RTOL


def test_decorrelation_uses_smaller_gram_either_way():
    # n > d (d x d Gram) and n < d (n x n Gram) both match the loops
    for T_, d in ((9, 3), (3, 9)):
        H, _ = _data(3, B=2, T=T_, d=d)
        for axis in ("feature", "token"):
            assert _rel(L.decorrelation(H, None, axis=axis), naive_decorrelation(H, None, "sequence", axis)) < RTOL


def test_dispersion_code_form_is_paper_minus_constant():
    H, mask = _data(4)
    a = L.dispersion_loss(H, None, 1.0, reduction="sum")
    b = L.dispersion_loss(H, None, 1.0, reduction="mean")
    assert float(a - b) == pytest.approx(math.log(7 * 6), rel=1e-12)


# ----------------------------------------------------------------------------- cross-domain


@pytest.mark.parametrize("masked", [False, True])
def test_cross_domain_matches_naive(masked):
    H, mask = _data(5, B=4, offset=0.5)
    mask = mask if masked else None
    for dom in (torch.tensor([0, 1, 1, 0]), torch.tensor([7, 3, 5, 3])):  # two and three domains
        assert _rel(L.cross_domain_push_away(H, mask, dom), naive_cross(H, mask, dom)) < RTOL


def test_cross_domain_counts_only_cross_pairs():
    # within each domain all states are parallel (within distance 0), the domains are orthogonal
    e = torch.eye(4, dtype=torch.float64)
    H = torch.stack([e[0].expand(5, 4) * (1 + torch.arange(5.0, dtype=torch.float64))[:, None],
                     e[1].expand(5, 4) * 2.0, e[0].expand(5, 4) * 3.0])
    dom = torch.tensor([0, 1, 0])
    assert float(L.cross_domain_push_away(H, None, dom)) == pytest.approx(-1.0, abs=1e-12)
    assert float(L.push_away(H, None)) > -0.6  # all pairs: mostly within-domain zeros
    # two domains: exactly 001's 1/(|A||B|) sum over A x B, i.e. metrics.mean_cosine_distance_between
    H2, mask = _data(6, B=4)
    dom = torch.tensor([0, 1, 0, 1])
    A = H2[dom == 0][mask[dom == 0]]
    Bm = H2[dom == 1][mask[dom == 1]]
    assert _rel(-L.cross_domain_push_away(H2, mask, dom), mean_cosine_distance_between(A, Bm)) < 1e-12
    with pytest.raises(ValueError, match="2 domains"):
        L.cross_domain_push_away(H2, None, torch.zeros(4, dtype=torch.long))


def test_push_away_is_linear_in_memory():
    # N = 200k states: an N x N matrix would need 320 GB
    H = torch.randn(4, 50_000, 8)
    H.requires_grad_(True)
    loss = L.push_away(H)
    loss.backward()
    assert torch.isfinite(H.grad).all() and -1.01 < float(loss.detach()) < -0.99


# ----------------------------------------------------------------------------- gradients


def _small(seed=7):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    return H, mask


GRAD_CASES = {
    "push_away": lambda H, m, s: L.push_away(H, m, s),
    "squeeze": lambda H, m, s: L.squeeze(H, m, s),
    "dispersion": lambda H, m, s: L.dispersion_loss(H, m, 0.5, scope=s),
    "orthogonal": lambda H, m, s: L.orthogonalization(H, m, scope=s),
    "l2_repel": lambda H, m, s: L.l2_repel(H, m, 2.0, 0.1, scope=s),
    "decorrelation_feature": lambda H, m, s: L.decorrelation(H, m, scope=s, axis="feature"),
    "decorrelation_token": lambda H, m, s: L.decorrelation(H, m, scope=s, axis="token"),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
@pytest.mark.parametrize("scope", ["flatten", "sequence"])
def test_gradcheck(name, scope):
    H, mask = _small()
    fn = GRAD_CASES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, mask, scope), (H,), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda x: fn(x, None, scope), (H,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_cross_domain():
    H, mask = _small()
    dom = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(lambda x: L.cross_domain_push_away(x, mask, dom), (H,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_angular_losses_finite_at_cos_plus_minus_one(dtype):
    v = torch.tensor([0.3, -1.2, 0.5, 2.0], dtype=dtype)
    w = torch.tensor([1.0, 0.1, -0.4, 0.2], dtype=dtype)
    H = torch.stack([torch.stack([v, v, -v, 2 * v, w]), torch.stack([v, v, v, v, v])]).requires_grad_(True)
    for fn in (lambda x: L.dispersion_loss(x, None, 0.1), lambda x: L.dispersion_loss(x, None, 1.0, scope="flatten"),
               lambda x: L.orthogonalization(x, None)):
        H.grad = None
        loss = fn(H)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(H.grad).all()


def test_losses_under_bf16_autocast_run_in_fp32():
    """Under bf16 autocast (the trainer's mode on a GPU) every loss computes in fp32: the same
    value and gradient as outside autocast on the same bf16 states, and no NaN where bf16 would
    round the arccos clamp 1 - eps to 1 (repeated states, cos = 1)."""
    g = torch.Generator().manual_seed(0)
    H = torch.randn(2, 12, 16, generator=g)
    H[:, 1] = H[:, 0]  # cos = 1 pairs
    Hb = H.to(torch.bfloat16)
    fns = {"push_away": L.push_away, "squeeze": L.squeeze, "dispersion": L.dispersion_loss,
           "orthogonal": L.orthogonalization, "l2_repel": L.l2_repel, "decorrelation": L.decorrelation,
           "cross_domain": lambda x: L.cross_domain_push_away(x, None, torch.tensor([0, 1]))}
    for name, fn in fns.items():
        grads = []
        for autocast in (False, True):
            x = Hb.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn(x)
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(x.grad).all(), name
            grads.append((loss.detach(), x.grad.float()))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), name


# ----------------------------------------------------------------------------- subsampling


def test_subsample_is_deterministic_and_respects_mask():
    H, mask = _data(8, B=4, T=40, d=3)
    mask[2, 5:] = False  # 5 valid < cap
    a = L.subsample_tokens(H, mask, 8, torch.Generator().manual_seed(3))
    b = L.subsample_tokens(H, mask, 8, torch.Generator().manual_seed(3))
    c = L.subsample_tokens(H, mask, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    Hs, ms = a
    assert Hs.shape == (4, 8, 3)
    for r in range(4):
        assert int(ms[r].sum()) == min(8, int(mask[r].sum()))
        kept = Hs[r][ms[r]]
        valid = H[r][mask[r]]
        for x in kept:  # every kept state is an unmasked state of that row, none twice
            assert int((valid == x).all(-1).sum()) == 1
        assert len({tuple(x.tolist()) for x in kept}) == len(kept)


def test_subsample_is_uniform_over_valid_positions():
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, ::2] = True
    H = torch.arange(20, dtype=torch.float64).view(1, 20, 1).expand(1, 20, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    for _ in range(400):
        Hs, ms = L.subsample_tokens(H, mask, 3, g)
        counts[Hs[0, ms[0], 0].long()] += 1
    assert counts[1::2].sum() == 0 and counts[::2].min() > 80  # expected 120 each


def test_aux_loss_cap_is_seeded():
    spec = L.LossSpec(name="dispersion", max_tokens=6, where="all")
    aux = L.make_aux_loss(spec)
    g = torch.Generator().manual_seed(0)
    hs = tuple(torch.randn(3, 30, 4, generator=g) for _ in range(3))
    out = type("O", (), {"hidden_states": hs})()
    batch = T.Batch(torch.zeros(3, 30, dtype=torch.long), None, torch.tensor([0, 0, 1]), ("a", "b"))
    vals = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        vals.append(float(aux(out, batch)))
    assert vals[0] == vals[1] and vals[0] != vals[2]
    full = L.make_aux_loss(spec.model_copy(update={"max_tokens": 30}))(out, batch)
    ref = np.mean([float(L.dispersion_loss(h, None, 1.0)) for h in hs[1:]])
    assert float(full) == pytest.approx(ref, rel=1e-6)


# ----------------------------------------------------------------------------- spec, layers


def test_layer_indices():
    assert L.layer_indices(5, "final") == [4]
    assert L.layer_indices(5, "upper") == [2, 3, 4]
    assert L.layer_indices(5, "lower") == [1, 2]
    assert L.layer_indices(5, "all") == [1, 2, 3, 4]
    assert L.layer_indices(6, "upper") == [3, 4, 5] and L.layer_indices(6, "lower") == [1, 2]
    assert L.layer_indices(2, "lower") == [1]


def test_spec_validation():
    assert L.make_aux_loss(L.LossSpec()) is None
    assert L.LossSpec(name="push_away").resolved_scope == "flatten"
    assert L.LossSpec(name="orthogonal").resolved_scope == "sequence"
    with pytest.raises(ValidationError, match="scope"):
        L.LossSpec(name="cross_domain", scope="sequence")
    with pytest.raises(ValidationError, match="max_tokens"):
        L.LossSpec(name="push_away", max_tokens=10)
    with pytest.raises(ValidationError, match="extra"):
        L.LossSpec(name="dispersion", temperature=1.0)
    with pytest.raises(ValidationError):
        L.LossSpec(name="orthogonal", tau=0)
    aux = L.make_aux_loss(L.LossSpec(name="cross_domain"))
    out = type("O", (), {"hidden_states": (torch.randn(2, 4, 3), torch.randn(2, 4, 3))})()
    with pytest.raises(ConfigError, match="loss.name"):
        aux(out, T.Batch(None, None, torch.tensor([0, 0]), ("a",)))


# ----------------------------------------------------------------------------- the registry

ROOT = Path(__file__).resolve().parents[1]
TAU, NORM_LAMBDA = 0.7, 0.2


def _red(form):
    return "sum" if form == "paper" else "mean"


NAIVE = {  # registered loss -> naive value at its default scope, (H [B, T, d], domain [B], form) -> float
    "push_away": lambda H, dom, form: -naive_cos_dist(H, None, "flatten"),
    "cross_domain": lambda H, dom, form: naive_cross(H, None, dom),
    "squeeze": lambda H, dom, form: naive_cos_dist(H, None, "flatten"),
    "dispersion": lambda H, dom, form: naive_dispersion(H, None, "sequence", TAU, _red(form)),
    "decorrelation": lambda H, dom, form: naive_decorrelation(
        H, None, "sequence", "feature" if form == "paper" else "token", _red(form)),
    "l2_repel": lambda H, dom, form: naive_l2(H, None, "sequence", TAU, NORM_LAMBDA, _red(form)),
    "orthogonal": lambda H, dom, form: naive_orth(H, None, "sequence"),
}


def test_registry_entries():
    assert L.loss_names() == ("none", "push_away", "cross_domain", "squeeze", "dispersion", "decorrelation",
                              "l2_repel", "orthogonal")
    assert set(NAIVE) == set(L.LOSSES), "every registered loss needs a naive reference in NAIVE"
    for name, loss in L.LOSSES.items():
        assert loss.name == name and loss.scope in loss.scopes
        assert L.LossSpec(name=name).resolved_scope == loss.scope
        assert loss.takes_max_tokens == (loss.family == "pairwise")
    assert [n for n, x in L.LOSSES.items() if x.family == "cosine"] == ["push_away", "cross_domain", "squeeze"]
    with pytest.raises(ValidationError, match=r"name\n.*unknown loss 'nope' \(known: none, push_away, "):
        L.LossSpec(name="nope")
    with pytest.raises(ValidationError, match=r"scope: cross_domain takes only 'flatten'"):
        L.LossSpec(name="cross_domain", scope="sequence")
    with pytest.raises(ValidationError, match=r"max_tokens: .*no loss is selected"):
        L.LossSpec(max_tokens=8)
    with pytest.raises(ValueError, match="registered twice"):
        L.register_loss("dispersion", family="pairwise", scope="sequence", paper="-", formula="-")
    with pytest.raises(ValueError, match="default scope"):
        L.register_loss("x", family="cosine", scope="sequence", scopes=("flatten",), paper="-", formula="-")
    with pytest.raises(ValueError, match="not a valid loss name"):
        L.register_loss("none", family="cosine", scope="flatten", paper="-", formula="-")


@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("name", list(L.LOSSES))
def test_every_registered_loss_through_make_aux_loss(name, form):
    g = torch.Generator().manual_seed(3)
    hs = (torch.randn(4, 6, 5, generator=g, dtype=torch.float64),) * 2
    dom = torch.tensor([0, 1, 1, 0])
    out = type("O", (), {"hidden_states": hs})()
    aux = L.make_aux_loss(L.LossSpec(name=name, form=form, tau=TAU, norm_lambda=NORM_LAMBDA))
    assert _rel(aux(out, T.Batch(None, None, dom, ("a", "b"))), NAIVE[name](hs[1], dom, form)) < RTOL


def _doc(marker_begin, marker_end):
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    return doc.split(marker_begin, 1)[1].split(marker_end, 1)[0]


def test_training_doc_lists_the_registered_losses():
    table = _doc("<!-- losses:begin", "<!-- losses:end -->").split("-->\n", 1)[1]
    assert table == L.losses_markdown(), "docs/TRAINING.md: paste the output of `dispersion losses` as the table"
    from typer.testing import CliRunner

    from dispersion.cli import app

    result = CliRunner().invoke(app, ["losses"])
    assert result.exit_code == 0 and result.stdout == table


def test_a_new_loss_is_one_registration(monkeypatch):
    """The docs' example loss, registered as written there: the spec, the sweep grid, the
    trainer hook and the table take it up."""
    monkeypatch.setattr(L, "LOSSES", dict(L.LOSSES))
    example = _doc("### Adding a loss", "## Tables").split("```python\n", 1)[1].split("```", 1)[0]
    ns = dict(vars(L))  # run as written in the module's namespace (its helpers, torch, register_loss)
    exec(example, ns)  # noqa: S102
    assert "cosine_hinge" in L.LOSSES and "cosine_hinge" not in vars(L)
    spec = L.LossSpec(name="cosine_hinge", max_tokens=30)
    assert spec.resolved_scope == "sequence"
    g = torch.Generator().manual_seed(0)
    hs = (torch.randn(3, 7, 4, generator=g, dtype=torch.float64),) * 2
    out = type("O", (), {"hidden_states": hs})()
    vals = []
    for g in _groups(hs[1], None, "sequence"):
        pairs = _pairs(g)
        vals.append(sum(max(0.0, _cos(g[i], g[j])) ** 2 for i, j in pairs) / len(pairs))
    assert _rel(L.make_aux_loss(spec)(out, T.Batch(None, None, None, ("a",))), float(np.mean(vals))) < RTOL
    assert "| `cosine_hinge` | pairwise | sequence |" in L.losses_markdown()
    from dispersion.training.sweep import SweepConfig, arms

    cfg = SweepConfig(grid={"losses": ["none", "cosine_hinge"]}, loss={"max_tokens": 16})
    assert {a.loss for a in arms(cfg)} == {"none", "cosine_hinge"}


# ----------------------------------------------------------------------------- trainer hook

VOCAB = 64
LAM = 0.5


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg)


def _manual_cross(hs, batch):
    """-(mean over cross-domain pairs of 1 - cos), with an explicit N x N matrix."""
    H = hs[-1].flatten(0, 1)
    dom = batch.domain.repeat_interleave(hs[-1].shape[1])
    U = H / H.norm(dim=-1, keepdim=True)
    cross = dom[:, None] != dom[None, :]
    return -(1 - U @ U.T)[cross].mean()


def _manual_dispersion_upper(hs, batch, tau=1.0):
    """Per-sequence log sum_{i != j} exp(-angle/(pi tau)), mean over sequences and layers 1..2."""
    vals = []
    for h in hs[1:]:
        U = h / h.norm(dim=-1, keepdim=True)
        C = (U @ U.transpose(1, 2)).clamp(-1 + L.ARCCOS_EPS, 1 - L.ARCCOS_EPS)
        E = torch.exp(-torch.arccos(C) / (math.pi * tau)) * (1 - torch.eye(h.shape[1]))
        vals.append(torch.log(E.sum(dim=(1, 2))).mean())
    return torch.stack(vals).mean()


@pytest.mark.parametrize("name,where,manual", [("cross_domain", "final", _manual_cross),
                                               ("dispersion", "upper", _manual_dispersion_upper)])
def test_train_gradient_is_ce_plus_lambda_aux(tmp_path, monkeypatch, name, where, manual):
    rng = np.random.default_rng(0)
    tokens = {"a": rng.integers(1, 32, 800).astype(np.int32), "b": rng.integers(32, 64, 800).astype(np.int32)}
    base = T.TrainSpec(steps=2, batch_size=4, seq_len=12, lr=1e-2, eval_batches=1, device="cpu")
    spec, aux = L.aux_training(base, L.LossSpec(name=name, lam=LAM, where=where))
    assert spec.aux_lambda == LAM
    seen = []
    step_fn = T.clip_and_step

    def spy(model, optimizer, grad_clip, lr):  # grads of the step, and the weights they were taken at
        seen.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                     {n: p.grad.detach().clone() for n, p in model.named_parameters()}))
        return step_fn(model, optimizer, grad_clip, lr)

    monkeypatch.setattr(T, "clip_and_step", spy)
    T.train(_model(), tokens, spec, out_dir=tmp_path, aux_loss=aux)
    rows = [r for r in C.read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(seen) == 2 and len(rows) == 2

    arrays = T.domain_arrays(tokens)
    counts = T.rows_per_domain(tuple(arrays), spec.batch_size, None)
    for step, (state, grads) in enumerate(seen, start=1):
        batch = T.sample_batch(arrays, counts, spec.seq_len, spec.seed, step, 0)
        model = _model()
        model.load_state_dict(state)
        model.train()
        params = dict(model.named_parameters())
        out = model(input_ids=batch.input_ids, output_hidden_states=True, use_cache=False)
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten())
        aux_val = manual(out.hidden_states, batch)
        g_ce = torch.autograd.grad(ce, list(params.values()), retain_graph=True)
        g_aux = torch.autograd.grad(aux_val, list(params.values()), allow_unused=True)
        assert rows[step - 1]["aux"] == pytest.approx(float(aux_val.detach()), rel=1e-5)
        assert rows[step - 1]["ce"] == pytest.approx(float(ce.detach()), rel=1e-5)
        aux_norm = 0.0
        for (n, _), gc, ga in zip(params.items(), g_ce, g_aux):
            ga = torch.zeros_like(gc) if ga is None else ga
            torch.testing.assert_close(grads[n], gc + LAM * ga, rtol=1e-4, atol=1e-6)
            aux_norm += float((LAM * ga).norm()) ** 2
        assert aux_norm ** 0.5 > 1e-4  # the auxiliary term really moved the gradient


def test_code_form_through_make_aux_loss():
    g = torch.Generator().manual_seed(1)
    hs = (torch.randn(2, 6, 4, generator=g, dtype=torch.float64),) * 2
    out = type("O", (), {"hidden_states": hs})()
    batch = T.Batch(None, None, torch.tensor([0, 1]), ("a", "b"))
    code = L.make_aux_loss(L.LossSpec(name="decorrelation", form="code"))(out, batch)
    assert _rel(code, naive_decorrelation(hs[1], None, "sequence", "token", "mean")) < RTOL
    paper = L.make_aux_loss(L.LossSpec(name="decorrelation"))(out, batch)
    assert _rel(paper, naive_decorrelation(hs[1], None, "sequence", "feature", "sum")) < RTOL
    disp = L.make_aux_loss(L.LossSpec(name="dispersion", form="code", tau=0.5))(out, batch)
    assert _rel(disp, naive_dispersion(hs[1], None, "sequence", 0.5, "mean")) < RTOL
