"""Extraction against direct transformers computations on tiny random models."""

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from reference import dispersion as _naive_within  # mean pairwise cosine distance of the states
from dispersion.core.errors import ModelError
from dispersion.measure.extract import Extractor, layer_names

VOCAB = 97
BOS = 1


def _gpt2():
    return tiny_gpt2(VOCAB, BOS)


def _llama():
    return tiny_llama(VOCAB, BOS)


def _gemma2():
    """Sandwich norms, logit soft-capping, tied embeddings: the unusual one of the paper's zoo."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       bos_token_id=BOS, eos_token_id=BOS, pad_token_id=0, final_logit_softcapping=5.0)
    return Gemma2ForCausalLM(cfg).eval()


MODELS = {"gpt2": _gpt2, "llama": _llama, "gemma2": _gemma2}


def _segments(n=7, seed=0, lengths=(20, 13, 20, 5, 17, 20, 9)):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=lengths[i % len(lengths)]).astype(np.int32) for i in range(n)]


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("bos", [True, False])
def test_perplexity_matches_transformers_loss(arch, bos):
    model = MODELS[arch]()
    segs = _segments()
    ex = Extractor(model, layers=["final"], prepend_bos=bos, bos_token_id=BOS, batch_size=3,
                   nll_chunk_tokens=7, context_lengths=[4, 9])
    out = ex.extract(segs)
    for i, s in enumerate(segs):
        ids = torch.tensor([[BOS, *s.tolist()]] if bos else [s.tolist()])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean NLL over scored tokens
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        n_scored = len(s) if bos else len(s) - 1
        assert out.features["n_scored"][i] == n_scored
        assert out.features["ppl"][i] == pytest.approx(np.exp(loss), rel=1e-4)
        token_nll = -logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1).numpy()  # scores ids[1:]
        seg_nll = token_nll if bos else np.concatenate([[np.nan], token_nll])
        assert out.features["last_token_nll"][i] == pytest.approx(seg_nll[-1], rel=1e-4, abs=1e-5)
        for c in (4, 9):
            want = seg_nll[c - 1] if c <= len(s) else np.nan
            got = out.features[f"last_nll_c{c}"][i]
            if c <= len(s) and not (not bos and c == 1):
                assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
            else:
                assert np.isnan(got)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_hidden_states_match_output_hidden_states(arch):
    model = MODELS[arch]()
    segs = _segments()
    skip = 2
    ex = Extractor(model, layers=["all"], sites=["block", "attn", "mlp"], prepend_bos=True,
                   bos_token_id=BOS, skip_first=skip, batch_size=4)
    out = ex.extract(segs)
    n = model.config.num_hidden_layers
    assert ex.layers == [str(i) for i in range(n + 1)] + ["final"]
    for i, s in enumerate(segs):
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([[BOS, *s]]), output_hidden_states=True).hidden_states
        # HF: hidden_states[l] = block l output for l < n; hidden_states[n] = final-norm output
        for name, ref in [(str(l), hs[l]) for l in range(n)] + [("final", hs[n])]:
            states = ref[0, 1 + skip:].double().numpy()  # drop BOS and the first `skip` tokens
            last = ref[0, -1].double().numpy()
            np.testing.assert_allclose(out.vectors[(name, "block", "last")][i], last, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(out.vectors[(name, "block", "mean")][i], states.mean(0), rtol=2e-3, atol=2e-3)
            if len(states) >= 2:
                assert out.within[(name, "block")][i] == pytest.approx(_naive_within(states), rel=1e-5, abs=1e-6)
            else:
                assert np.isnan(out.within[(name, "block")][i])
        assert out.norms[("final", "block", "last")][i] == pytest.approx(
            np.linalg.norm(out.vectors[("final", "block", "last")][i].astype(np.float32)), rel=1e-2)
    # sub-layer sites exist for blocks 1..n, not for 0 or final
    assert ("1", "attn", "mean") in out.vectors and ("0", "attn", "mean") not in out.vectors
    assert (str(n), "mlp", "last") in out.vectors and ("final", "mlp", "last") not in out.vectors


def test_final_norm_of_last_block_equals_final():
    model = _gpt2()
    n = model.config.n_layer
    segs = _segments()
    out = Extractor(model, layers=[n, "final"], pools=["last"], bos_token_id=BOS).extract(segs)
    pre = torch.tensor(out.vectors[(str(n), "block", "last")].astype(np.float32))
    post = model.transformer.ln_f(pre).detach().numpy()
    np.testing.assert_allclose(post, out.vectors[("final", "block", "last")].astype(np.float32), atol=2e-2)


def test_batching_and_order_do_not_change_numbers():
    model = _llama()
    segs = _segments(n=9)
    a = Extractor(model, layers=[1, "final"], bos_token_id=BOS, batch_size=1).extract(segs)
    b = Extractor(model, layers=[1, "final"], bos_token_id=BOS, batch_size=4).extract(segs)
    np.testing.assert_allclose(a.features["ppl"], b.features["ppl"], rtol=1e-5)
    for k in a.vectors:
        np.testing.assert_allclose(a.vectors[k].astype(np.float32), b.vectors[k].astype(np.float32), atol=2e-3)
    for k in a.within:
        np.testing.assert_allclose(a.within[k], b.within[k], rtol=1e-4)


def test_bad_layers_and_bos():
    with pytest.raises(ModelError, match="extraction.layers"):
        layer_names([7], 3)
    with pytest.raises(ModelError, match="prepend_bos"):
        Extractor(_gpt2(), prepend_bos=True, bos_token_id=None)


def test_non_finite_is_an_error():
    from dispersion.core.errors import NonFiniteError

    model = _gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        Extractor(model, bos_token_id=BOS).extract(_segments())


def test_bfloat16_runs_and_stays_close_to_float32():
    """The GPU path's dtype, exercised on CPU: pooling and NLL accumulate in fp32."""
    model = _llama()
    segs = _segments()
    ref = Extractor(model, bos_token_id=BOS).extract(segs)
    low = Extractor(model.to(torch.bfloat16), bos_token_id=BOS).extract(segs)
    np.testing.assert_allclose(low.features["ppl"], ref.features["ppl"], rtol=0.05)
    a = low.vectors[("final", "block", "last")].astype(np.float32)
    b = ref.vectors[("final", "block", "last")].astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_context_pools_equal_a_forward_on_the_prefix(arch):
    """Pool c{c} is the last-token state of the prefix of length c (a separate forward on the
    truncated segments), last_nll_c{c} its last-token NLL, next_nll_c{c} = last_nll_c{c+1}."""
    model = MODELS[arch]()
    segs = _segments(n=6, lengths=(20,))
    cs = [4, 11, 20]
    full = Extractor(model, layers=[1, "final"], pools=["last", "context"], bos_token_id=BOS,
                     context_lengths=cs, batch_size=4).extract(segs)
    for c in cs:
        short = Extractor(model, layers=[1, "final"], pools=["last"], bos_token_id=BOS,
                          batch_size=3).extract([s[:c] for s in segs])
        for layer in ("1", "final"):
            np.testing.assert_allclose(full.vectors[(layer, "block", f"c{c}")].astype(np.float32),
                                       short.vectors[(layer, "block", "last")].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(full.features[f"last_nll_c{c}"], short.features["last_token_nll"], rtol=1e-4)
    c5 = Extractor(model, pools=["last"], bos_token_id=BOS, context_lengths=[5]).extract(segs)
    np.testing.assert_allclose(full.features["next_nll_c4"], c5.features["last_nll_c5"], rtol=1e-5)
    assert np.isnan(full.features["next_nll_c20"]).all()  # no token after the segment
    with pytest.raises(ModelError, match="extraction.context_lengths: 20 is longer than a segment"):
        Extractor(model, pools=["context"], bos_token_id=BOS, context_lengths=[20]).extract([segs[0][:10]])
