"""Embedding-condensation maps against a naive double loop over token pairs on tiny models."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from conftest import exact_p
import torch
from torch import nn

from dispersion.measure.condensation import (
    CONDENSATION_DEPTH_SCHEMA,
    CONDENSATION_SCHEMA,
    MEDIAN_BINS,
    CondensationSpec,
    _median_from_fine,
    condensation_histograms,
    condensation_table,
    depth_correlation,
    depth_table,
    maps_from_table,
    parse_condensation_spec,
)
from dispersion.report.condensation import plot_condensation
from conftest import tiny_gpt2, tiny_llama
from dispersion.core.errors import ConfigError, DataError, ModelError
from dispersion.measure.capture import find_blocks, layer_names
from dispersion.measure.extract import Extractor

VOCAB = 97
BOS = 1
MEDIAN_TOL = 2.0 / MEDIAN_BINS + 1e-6


def _gpt2(bos=BOS):
    return tiny_gpt2(VOCAB, bos)


def _llama():
    return tiny_llama(VOCAB, BOS)


MODELS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module")
def models():
    return {k: f() for k, f in MODELS.items()}


def _segments(n=6, seed=0, lengths=(20, 13, 20, 5, 17, 9)):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=lengths[i % len(lengths)]).astype(np.int32) for i in range(n)]


def _states(model, seq, bos):
    """{layer name: [T, d] float64} from HF hidden_states (and a hook for block n's raw output)."""
    ids = torch.tensor([[BOS, *seq.tolist()]] if bos else [seq.tolist()])
    n = model.config.num_hidden_layers
    got = {}
    h = find_blocks(model.base_model, n)[-1].register_forward_hook(
        lambda _m, _a, o: got.setdefault("o", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hs = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    # hidden_states[l] = layer l for l < n; hidden_states[n] = final (after the final norm)
    out = {str(i): hs[i][0].double().numpy() for i in range(n)}
    out[str(n)] = got["o"][0].double().numpy()
    out["final"] = hs[n][0].double().numpy()
    return out


def _naive(model, seqs, *, bos, skip_first=0, positions=None):
    """{layer: all pooled cos(z_i, z_j), i < j} by a double loop."""
    vals: dict[str, list[float]] = {}
    off = int(bos)
    for k, s in enumerate(seqs):
        keep = (np.arange(skip_first, len(s)) if positions is None else positions[k]) + off
        for layer, z in _states(model, s, bos).items():
            for a in range(len(keep)):
                for b in range(a + 1, len(keep)):
                    x, y = z[keep[a]], z[keep[b]]
                    vals.setdefault(layer, []).append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return {k: np.asarray(v) for k, v in vals.items()}


def _assert_matches(cmap, ref, bins, exact_counts):
    edges = np.linspace(-1, 1, bins + 1)
    for r, layer in enumerate(cmap.layers):
        v = ref[layer]
        counts, _ = np.histogram(np.clip(v, -1, 1), edges)
        assert cmap.n_pairs[r] == len(v)
        assert cmap.counts[r].sum() == len(v)
        if exact_counts:
            np.testing.assert_array_equal(cmap.counts[r], counts, err_msg=layer)
        else:  # padded batches: states differ by ~1e-7, a value on a bin edge may move
            assert np.abs(cmap.counts[r] - counts).sum() <= 2, layer
        dens, _ = np.histogram(np.clip(v, -1, 1), edges, density=True)
        np.testing.assert_allclose(cmap.density[r], dens, atol=0 if exact_counts else 2 / len(v) / (2 / bins) + 1e-9)
        assert cmap.mean[r] == pytest.approx(v.mean(), abs=1e-6)
        assert cmap.std[r] == pytest.approx(v.std(), abs=1e-6)
        assert abs(cmap.median[r] - np.median(v)) <= MEDIAN_TOL


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_histograms_match_naive_pairs(models, arch):
    model = models[arch]
    segs = _segments()
    # one sequence per batch (no padding): exactly the naive counts
    spec = CondensationSpec(num_sequences=len(segs), bins=16, batch_size=1)
    cmap = condensation_histograms(model, segs, spec)
    _assert_matches(cmap, _naive(model, segs, bos=True), 16, exact_counts=True)
    # padded batches, no BOS, skip_first: the same pairs
    spec = CondensationSpec(num_sequences=len(segs), bins=16, batch_size=4, prepend_bos=False, skip_first=2)
    cmap = condensation_histograms(model, segs, spec)
    _assert_matches(cmap, _naive(model, segs, bos=False, skip_first=2), 16, exact_counts=False)
    assert cmap.n_pairs[0] == sum((len(s) - 2) * (len(s) - 3) // 2 for s in segs)


def test_layers_named_as_extract(models):
    model = models["llama"]
    segs = _segments(3)
    cmap = condensation_histograms(model, segs, CondensationSpec(num_sequences=3, bins=8))
    assert cmap.layers == layer_names(["all"], 3) == ["0", "1", "2", "3", "final"]
    assert cmap.depths.tolist() == [0, 1, 2, 3, 4]
    assert cmap.counts.shape == (5, 8) and cmap.n_sequences == 3
    sub = condensation_histograms(model, segs, CondensationSpec(num_sequences=3, bins=8, layers=["final", 1]))
    assert sub.layers == ["1", "final"]
    np.testing.assert_array_equal(sub.counts, cmap.counts[[1, 4]])
    np.testing.assert_allclose(sub.mean, cmap.mean[[1, 4]])


def test_mean_is_one_minus_extract_within(models):
    model = models["gpt2"]
    segs = _segments(4, lengths=(12,))  # equal lengths: pooled mean = mean over sequences
    spec = CondensationSpec(num_sequences=4, bins=8, skip_first=1)
    cmap = condensation_histograms(model, segs, spec)
    ex = Extractor(model, layers=["all"], pools=["mean"], bos_token_id=BOS, skip_first=1).extract(segs)
    for r, layer in enumerate(cmap.layers):
        assert cmap.mean[r] == pytest.approx(1 - ex.within[(layer, "block")].astype(np.float64).mean(), abs=1e-5)


def test_bos_never_counted(models):
    """With BOS the segment tokens' pairs only: a BOS-less and a BOS model see the same count."""
    model = models["gpt2"]
    segs = _segments(3)
    a = condensation_histograms(model, segs, CondensationSpec(num_sequences=3, prepend_bos=True))
    b = condensation_histograms(model, segs, CondensationSpec(num_sequences=3, prepend_bos=False))
    n = sum(len(s) * (len(s) - 1) // 2 for s in segs)
    assert a.n_pairs.tolist() == b.n_pairs.tolist() == [n] * 5
    # layer 0 of GPT-2 is token + position embedding: BOS shifts every position by one
    assert not np.allclose(a.mean, b.mean)
    with pytest.raises(ModelError, match=r"^analysis\.condensation\.prepend_bos: "):
        model_nobos = _gpt2(bos=None)
        model_nobos.config.eos_token_id = None
        condensation_histograms(model_nobos, segs, CondensationSpec(num_sequences=3))


def test_max_tokens_subsample(models):
    from dispersion.measure.condensation import _kept_positions

    model = models["llama"]
    segs = _segments(4, lengths=(20, 6))
    spec = CondensationSpec(num_sequences=4, bins=16, max_tokens=7, seed=3, batch_size=1)
    cmap = condensation_histograms(model, segs, spec)
    assert cmap.n_pairs[0] == 2 * 21 + 2 * 15  # 20-token sequences capped at 7, 6-token ones whole
    pos = [_kept_positions(len(s), i, spec) for i, s in enumerate(segs)]
    _assert_matches(cmap, _naive(model, segs, bos=True, positions=pos), 16, exact_counts=True)
    again = condensation_histograms(model, segs, spec)
    np.testing.assert_array_equal(again.counts, cmap.counts)
    other = condensation_histograms(model, segs, spec.model_copy(update={"seed": 4}))
    assert not np.array_equal(other.counts, cmap.counts)


def test_sequence_subset_is_seeded(models):
    model = models["gpt2"]
    segs = _segments(6)
    spec = CondensationSpec(num_sequences=3, bins=8)
    a = condensation_histograms(model, segs, spec)
    assert a.n_sequences == 3
    idx = np.sort(np.random.default_rng(0).choice(6, 3, replace=False))
    b = condensation_histograms(model, [segs[i] for i in idx], spec)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_median_from_fine_histogram():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 1000, 1001):
        v = np.tanh(rng.normal(0.6, 0.4, size=n))
        fine, _ = np.histogram(v, np.linspace(-1, 1, MEDIAN_BINS + 1))
        assert abs(_median_from_fine(fine) - np.median(v)) <= MEDIAN_TOL


# -- depth correlation -----------------------------------------------------------------


class _Mix(nn.Module):
    """Adds the sequence mean to every token: tokens condense, block after block."""

    def forward(self, hidden_states, **_):
        return (hidden_states + hidden_states.mean(1, keepdim=True),)


class _Base(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(_Mix() for _ in range(n))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        for blk in self.layers:
            h = blk(h)[0]
        return SimpleNamespace(last_hidden_state=h / h.norm(dim=-1, keepdim=True))


class _Toy(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(num_hidden_layers=n, bos_token_id=BOS, max_position_embeddings=64)
        self.model = _Base(n)

    @property
    def base_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed


def test_condensing_model_gives_rho_one():
    segs = _segments(4, lengths=(16,))
    cmap = condensation_histograms(_Toy(5), segs, CondensationSpec(num_sequences=4, bins=32, layers=[0, 1, 2, 3, 4, 5]))
    assert np.all(np.diff(cmap.mean) > 0)
    c = depth_correlation(cmap)
    assert c["spearman_r"] == pytest.approx(1.0) and c["kendall_tau"] == pytest.approx(1.0)
    assert c["n_layers"] == 6 and c["spearman_p"] < 0.01


def test_depth_correlation_equals_scipy(models):
    from scipy import stats

    cmap = condensation_histograms(models["gpt2"], _segments(3), CondensationSpec(num_sequences=3, bins=8))
    c = depth_correlation(cmap)
    rho, p = stats.spearmanr(cmap.depths, cmap.mean)
    p = exact_p(cmap.depths, cmap.mean) if len(cmap.depths) <= 9 else p  # the exact p over a few layers
    tau, tp = stats.kendalltau(cmap.depths, cmap.mean)
    assert (c["spearman_r"], c["spearman_p"], c["kendall_tau"], c["kendall_p"]) == \
        pytest.approx((rho, p, tau, tp), nan_ok=True)
    flat = maps_from_table(cmap.to_table())[0]
    flat.mean = np.full(len(flat.layers), 0.5)
    assert np.isnan(depth_correlation(flat)["spearman_r"])
    with pytest.raises(DataError, match=r"^analysis\.condensation\.layers: .*at least 3 layers"):
        depth_correlation(condensation_histograms(models["gpt2"], _segments(3),
                                                  CondensationSpec(num_sequences=3, layers=[0, "final"])))


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("data, match", [
    ({"bins": 1}, r"^analysis\.condensation: bins: "),
    ({"num_sequences": 0}, r"^analysis\.condensation: num_sequences: "),
    ({"max_tokens": 1}, r"^analysis\.condensation: max_tokens: "),
    ({"skip_first": -1}, r"^analysis\.condensation: skip_first: "),
    ({"layers": ["middle"]}, r"^analysis\.condensation: layers"),
    ({"bogus": 1}, r"^analysis\.condensation: bogus: Extra inputs"),
    ([1], r"^analysis\.condensation: must be a mapping"),
])
def test_bad_spec_is_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_condensation_spec(data)
    assert "\n" not in str(err.value)


def test_bad_inputs_are_one_line(models):
    model = models["gpt2"]
    segs = _segments(3)
    cases = [
        (ConfigError, r"^analysis\.condensation\.layers: layer 7 out of range 0\.\.3",
         segs, CondensationSpec(num_sequences=3, layers=[7])),
        (DataError, r"^analysis\.condensation\.num_sequences: asked for 5 sequences but 3",
         segs, CondensationSpec(num_sequences=5)),
        (DataError, r"^analysis\.condensation\.skip_first: sequence 1 has 4 tokens, 1 left",
         [segs[0], segs[0][:4]], CondensationSpec(num_sequences=2, skip_first=3)),
        (DataError, r"^analysis\.condensation: sequence 0 has a token id out of range",
         [np.array([5, VOCAB])], CondensationSpec(num_sequences=1)),
        (DataError, r"^analysis\.condensation: sequence 0 of 64 tokens \+ BOS exceeds",
         [np.full(64, 5)], CondensationSpec(num_sequences=1)),
    ]
    for exc, match, seqs, spec in cases:
        with pytest.raises(exc, match=match) as err:
            condensation_histograms(model, seqs, spec)
        assert "\n" not in str(err.value)


# -- tables, loading, figure -------------------------------------------------------------


def test_table_loading_and_plot(models, tmp_path):
    root = tmp_path / "tiny"
    models["gpt2"].save_pretrained(root / "step5")
    models["llama"].save_pretrained(tmp_path / "llama")
    segs = _segments(4)
    spec = CondensationSpec(num_sequences=4, bins=16)
    logs = []
    table = condensation_table([("tiny", str(root), "step5", "baseline"),
                                ("llama", str(tmp_path / "llama"), None, "dispersion λ=0.1")],
                               segs, spec, device="cpu", log=logs.append)
    assert table.schema == CONDENSATION_SCHEMA and table.num_rows == 5 + 5 and len(logs) == 2
    assert set(table["revision"].to_pylist()) == {"step5", "main"}
    direct = condensation_histograms(models["gpt2"], segs, spec)
    back = maps_from_table(table)
    assert [m.title() for m in back] == ["tiny@step5 baseline", "llama@main dispersion λ=0.1"]
    np.testing.assert_array_equal(back[0].counts, direct.counts)
    np.testing.assert_allclose(back[0].mean, direct.mean)
    hist = np.asarray(table["hist"].to_pylist()[0])
    assert hist.dtype == np.float64 and hist.sum() * (2 / 16) == pytest.approx(1.0, abs=1e-5)
    dt = depth_table(table)
    assert dt.schema == CONDENSATION_DEPTH_SCHEMA and dt.num_rows == 2
    assert dt.to_pylist()[0]["spearman_r"] == pytest.approx(depth_correlation(direct)["spearman_r"])
    png = plot_condensation(table, tmp_path / "c.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "c.png").read_bytes() == png
    assert plot_condensation([direct], None, log_scale=True)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="nothing to plot"):
        plot_condensation(pa.Table.from_pylist([], schema=CONDENSATION_SCHEMA))
