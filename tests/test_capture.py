"""The capture engine: sites, targets, BOS resolution, early stop, and a site added as one entry."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from dispersion.core.errors import ModelError
from dispersion.measure import capture as cap
from dispersion.measure.capture import (
    SITES,
    Capture,
    bos_or_eos,
    find_blocks,
    resolve_bos,
    targets,
)
from dispersion.measure.sites import HookSite

VOCAB = 97
BOS = 1
MODELS = {"gpt2": lambda: tiny_gpt2(VOCAB, BOS), "llama": lambda: tiny_llama(VOCAB, BOS)}


def _ids(n=3, T=9, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(2, VOCAB, size=(n, T)))


def test_config_sites_are_the_registry(monkeypatch):
    from dispersion.config import parse_config
    from dispersion.core.errors import ConfigError

    base = {"models": [{"name": "m", "zoo": "gpt2-tiny"}], "datasets": [{"name": "p", "embedded": "prose"}]}
    for site in SITES:
        assert parse_config({**base, "extraction": {"sites": [site]}}).extraction.sites == [site]
    with pytest.raises(ConfigError, match=r"extraction.sites.1: unknown site 'nope'"):
        parse_config({**base, "extraction": {"sites": ["block", "nope"]}})
    monkeypatch.setitem(cap.SITES, "resid_mid", HookSite("resid_mid", "h_{l-1} + a_l",
                                                         ("ln_2", "post_attention_layernorm"), read="input"))
    assert parse_config({**base, "analysis": {"site": "resid_mid"}}).analysis.site == "resid_mid"


def test_targets_skip_missing_sites_and_reject_unknown_ones():
    assert targets(["0", "1", "final"], ["block", "attn"]) == [("0", "block"), ("1", "block"), ("1", "attn"),
                                                              ("final", "block")]
    with pytest.raises(ModelError, match=r"^extraction\.sites: unknown site 'nope'"):
        targets(["1"], ["nope"])


def test_bos_is_bos_else_eos_else_an_error_naming_the_field():
    assert bos_or_eos(SimpleNamespace(bos_token_id=3, eos_token_id=4)) == 3
    assert bos_or_eos(SimpleNamespace(bos_token_id=None, eos_token_id=4)) == 4
    assert bos_or_eos(SimpleNamespace(bos_token_id=None, eos_token_id=[7, 8])) == 7
    assert bos_or_eos(SimpleNamespace(bos_token_id=None, eos_token_id=None)) is None
    assert resolve_bos(5, "x") == 5 and resolve_bos(np.int64(0), "x") == 0
    model = MODELS["gpt2"]()
    assert resolve_bos(model, "x") == BOS and resolve_bos(model.config, "x") == BOS
    with pytest.raises(ModelError, match=r"^analysis\.foo\.prepend_bos: .*no BOS \(or EOS\).*prepend_bos: false$"):
        resolve_bos(SimpleNamespace(bos_token_id=None, eos_token_id=None), "analysis.foo.prepend_bos")
    with pytest.raises(ModelError, match=r"^extraction\.prepend_bos: no BOS token id was given"):
        resolve_bos(None, "extraction.prepend_bos")


@pytest.mark.parametrize("arch", list(MODELS))
def test_states_equal_hf_hidden_states_and_early_stop(arch):
    model = MODELS[arch]()
    ids = _ids()
    got: dict = {}
    tg = [("0", "block"), ("2", "block"), ("final", "block")]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        with Capture(model, tg, lambda t, h: got.__setitem__(t, h.clone())) as c:
            final = c.forward(input_ids=ids)
    torch.testing.assert_close(got[("0", "block")], hs[0])
    torch.testing.assert_close(got[("2", "block")], hs[2])
    torch.testing.assert_close(got[("final", "block")], hs[-1])
    torch.testing.assert_close(final, hs[-1])
    # stop after block 1: block 2 never runs, the pass returns None
    ran = []
    blocks = find_blocks(model.base_model, 3)
    n_hooks = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]  # transformers' own
    h = blocks[1].register_forward_pre_hook(lambda *_: ran.append(1))
    early: dict = {}
    try:
        with torch.no_grad(), Capture(model, [("1", "block")], lambda t, x: early.__setitem__(t, x.clone()),
                                      stop_early=True) as c:
            assert c.forward(input_ids=ids) is None
    finally:
        h.remove()
    assert not ran
    torch.testing.assert_close(early[("1", "block")], hs[1])
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == n_hooks  # hooks removed


@pytest.mark.parametrize("arch", list(MODELS))
def test_a_new_site_is_one_entry(arch, monkeypatch):
    """An input-read site (the residual stream between attention and MLP) added as one entry
    equals the block input plus the attention output."""
    entry = HookSite("resid_mid", "h_{l-1} + a_l", ("ln_2", "post_attention_layernorm"), read="input")
    monkeypatch.setitem(cap.SITES, "resid_mid", entry)
    model = MODELS[arch]()
    ids = _ids()
    got: dict = {}
    tg = targets(["1", "2"], ["block", "attn", "resid_mid"])
    with torch.no_grad(), Capture(model, tg, lambda t, h: got.__setitem__(t, h.clone())) as c:
        c.forward(input_ids=ids)
    torch.testing.assert_close(got[("2", "resid_mid")], got[("1", "block")] + got[("2", "attn")])


def _block_by_hand(model, block, h_prev):
    """One decoder block computed by hand from its input ``h_prev`` [B, T, d]: attention (the
    module itself, causal without a mask), residual add, the MLP's pre-norm, the MLP, residual
    add. Returns ``{resid_mid, mlp_in, block}``."""
    T = h_prev.shape[1]
    if hasattr(block, "ln_1"):  # GPT-2
        a = block.attn(block.ln_1(h_prev))[0]
        r = h_prev + a
        x = block.ln_2(r)
    else:  # Llama
        pos = torch.arange(T).unsqueeze(0)
        cos_sin = model.model.rotary_emb(h_prev, pos)
        a = block.self_attn(hidden_states=block.input_layernorm(h_prev), position_embeddings=cos_sin,
                            attention_mask=None)[0]
        r = h_prev + a
        x = block.post_attention_layernorm(r)
    return {"resid_mid": r, "mlp_in": x, "block": r + block.mlp(x)}


@pytest.mark.parametrize("arch", list(MODELS))
def test_resid_mid_and_mlp_in_equal_a_block_computed_by_hand(arch):
    """``resid_mid`` = h_{l-1} + a_l (paper 001 Sec. 3.3's h_att) and ``mlp_in`` = LN_{l,2} of
    it, against block 2 computed by hand from block 1's captured output."""
    model = MODELS[arch]()
    ids = _ids()
    got: dict = {}
    tg = targets(["1", "2"], ["block", "resid_mid", "mlp_in", "attn"])
    with torch.no_grad(), Capture(model, tg, lambda t, h: got.__setitem__(t, h.clone())) as c:
        c.forward(input_ids=ids)
        want = _block_by_hand(model, find_blocks(model.base_model, 3)[1], got[("1", "block")])
    for site in ("resid_mid", "mlp_in", "block"):
        torch.testing.assert_close(got[("2", site)], want[site], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[("2", "resid_mid")], got[("1", "block")] + got[("2", "attn")])


def _tiny(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"use_parallel_residual": False} if kind == "gpt_neox" else {}
    cfg = AutoConfig.for_model(kind, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                               max_position_embeddings=64, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=0,
                               **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gemma2", "olmo2", "gpt_neox"])
def test_resid_mid_in_other_families(kind):
    """Gemma-2 (pre- and post-sub-layer norms), OLMo-2 (post-norms only) and serial GPT-NeoX:
    block l's output is ``resid_mid`` plus what the MLP branch adds (its post-norm where the
    family has one), and ``mlp_in`` is the MLP's input."""
    model = _tiny(kind)
    block = find_blocks(model.base_model, 2)[1]
    got: dict = {}
    tg = targets(["2"], ["block", "resid_mid", "mlp_in", "mlp"])
    with torch.no_grad(), Capture(model, tg, lambda t, h: got.__setitem__(t, h.clone())) as c:
        c.forward(input_ids=_ids())
        r, x = got[("2", "resid_mid")], got[("2", "mlp_in")]
        pre = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
        post = getattr(block, "post_feedforward_layernorm", None) or (lambda m: m)
        if kind == "olmo2":  # no MLP pre-norm: the MLP reads the residual stream itself
            torch.testing.assert_close(x, r)
        else:
            torch.testing.assert_close(x, pre(r))
        torch.testing.assert_close(got[("2", "block")], r + post(block.mlp(x)), rtol=1e-5, atol=1e-5)


def test_resid_mid_is_an_error_for_a_parallel_residual():
    """GPT-NeoX with ``use_parallel_residual`` never forms h_{l-1} + a_l: an error naming the site."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from dispersion.measure.sites import parallel_residual

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, use_parallel_residual=True)
    model = GPTNeoXForCausalLM(cfg).eval()
    assert parallel_residual(cfg) and not parallel_residual(MODELS["gpt2"]().config)
    with pytest.raises(ModelError, match=r"site 'resid_mid' does not exist in 'gpt_neox' blocks"):
        Capture(model, [("1", "resid_mid")], lambda t, h: None)
    Capture(model, [("1", "mlp_in")], lambda t, h: None)  # the MLP's input exists in parallel blocks too
