"""Attention sites (PyTorch): exact answers, recomputed probabilities, depth flow, safety, bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import GradscopeError, MissingMeasureError
from gradscope.capture.attention import find_attention, recompute_probabilities

from conftest import assert_no_hooks


# ----------------------------------------------------------------------------- models as data
class PureStack(nn.Module):
    """L attention layers; with ``skip`` each adds its output to its input (Dong et al. 2021)."""

    def __init__(self, L=6, E=16, H=2, skip=False, batch_first=True, out_scale=None):
        super().__init__()
        self.skip = skip
        self.layers = nn.ModuleList([nn.MultiheadAttention(E, H, batch_first=batch_first) for _ in range(L)])
        if out_scale is not None:
            with torch.no_grad():
                for a in self.layers:
                    a.out_proj.weight.mul_(out_scale)

    def forward(self, x, key_padding_mask=None):
        for a in self.layers:
            y = a(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
            x = x + y if self.skip else y
        return x


class CausalSelfAttention(nn.Module):
    """nanoGPT-style attention: one c_attn projection, F.scaled_dot_product_attention."""

    def __init__(self, E=16, H=4):
        super().__init__()
        self.c_attn = nn.Linear(E, 3 * E)
        self.c_proj = nn.Linear(E, E)
        self.n_head = H

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.c_attn(x).split(E, dim=2)
        q, k, v = (t.view(B, T, self.n_head, E // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, E))


class Block(nn.Module):
    def __init__(self, E=16, H=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(E)
        self.attn = CausalSelfAttention(E, H)
        self.ln_2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, L=2, E=16, H=4, V=20):
        super().__init__()
        self.wte = nn.Embedding(V, E)
        self.h = nn.ModuleList([Block(E, H) for _ in range(L)])
        self.head = nn.Linear(E, V)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.h:
            x = b(x)
        return self.head(x)


def encoder(L=2, E=16, H=4, batch_first=True, norm_first=False, dropout=0.0):
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, L, enable_nested_tensor=False)


def zero_query(mha):
    """All attention logits equal: every row attends uniformly."""
    with torch.no_grad():
        E = mha.embed_dim
        mha.in_proj_weight[:E].zero_()
        mha.in_proj_bias[:E].zero_()
    return mha


# ----------------------------------------------------------------------------- exact answers
def test_uniform_attention_has_normalised_entropy_one_with_causal_and_padding_masks(device):
    mha = zero_query(nn.MultiheadAttention(16, 4, batch_first=True)).to(device)
    x = torch.randn(3, 7, 16).to(device)
    causal = torch.triu(torch.full((7, 7), float("-inf")), 1).to(device)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[2, 4:] = True
    kpm = kpm.to(device)
    for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": kpm}):
        rec = gradscope.probe(mha, (x, x, x), loss_fn=lambda o: o[0].pow(2).sum(), **{}, jacobians=False) \
            if not kwargs else gradscope.probe(mha, {"query": x, "key": x, "value": x, **kwargs},
                                               loss_fn=lambda o: o[0].pow(2).sum())
        np.testing.assert_allclose(rec.attention_entropy(rec.sites[0]), 1.0, rtol=1e-6)


def test_one_hot_attention_has_entropy_zero_and_is_a_collapse_finding(device):
    E, T = 16, 8
    mha = nn.MultiheadAttention(E, 1, batch_first=True, bias=False)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([100 * torch.eye(E), 100 * torch.eye(E), torch.eye(E)]))
    mha = mha.to(device)
    x = torch.eye(E)[:T].unsqueeze(0).repeat(2, 1, 1).to(device)  # orthonormal tokens: each query sees only itself
    rec = gradscope.probe(mha, (x, x, x), loss_fn=lambda o: o[0].pow(2).sum())
    site = rec.sites[0]
    assert rec.attention_entropy(site)[0, 0] < 1e-6
    diag = gradscope.diagnose(rec)
    f = [f for f in diag.findings if f.kind == "attention_entropy_collapse"]
    assert f and f[0].severity == "critical" and f[0].evidence["collapsed_heads"] == 1.0
    assert [r.name for r in f[0].remedies][:2] == ["sigma_reparam", "qk_layernorm"]
    compile(f[0].remedies[0].code, "<remedy>", "exec")


def test_uniform_attention_collapses_the_block_output(device):
    # the pure measures on identical tokens: tests/estimators/test_estimators_exact.py
    # uniform attention makes every output token the mean value vector: the block output collapses
    mha = zero_query(nn.MultiheadAttention(16, 2, batch_first=True)).to(device)
    rec = gradscope.probe(mha, (torch.randn(2, 5, 16).to(device),) * 3, loss_fn=lambda o: o[0].sum())
    assert rec.rank_residual(rec.sites[0])[0] < 1e-5
    assert abs(rec.token_cosine(rec.sites[0])[0] - 1) < 1e-5
    assert rec.sites == ("attention",) and not [n for n in rec.notes if "failed" in n], rec.notes


def test_pure_attention_collapses_with_depth_and_skips_prevent_it(device):
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16).to(device)
    pure = gradscope.probe(PureStack(skip=False).to(device), x, jacobians=False)
    r = np.array([pure.rank_residual(s)[0] for s in pure.sites])
    # Dong et al.: doubly exponential decay, until float32 rounding (~1e-7) is reached
    assert r[1] < 1e-2 * r[0] and r[2] < 1e-2 * r[1] and np.all(r[2:] < 1e-6)
    torch.manual_seed(0)
    skip = gradscope.probe(PureStack(skip=True).to(device), x, jacobians=False)
    r2 = np.array([skip.rank_residual(s)[0] for s in skip.sites])
    assert r2.min() > 0.1 * r2[0]
    kinds = {f.kind for f in gradscope.diagnose(pure).findings}
    assert "rank_collapse" in kinds
    assert "rank_collapse" not in {f.kind for f in gradscope.diagnose(skip).findings}


# ----------------------------------------------------------------------------- recomputed probabilities
def _masks(B, T, S, H, device="cpu"):
    g = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(T, S, generator=g) < 0.3
    bool_mask[:, 0] = False
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, S - 2:] = True
    forms = {
        "none": {},
        "bool attn_mask": {"attn_mask": bool_mask},
        "float attn_mask": {"attn_mask": torch.randn(T, S, generator=g)},
        "3-D float attn_mask": {"attn_mask": torch.randn(B * H, T, S, generator=g)},
        "bool key padding": {"key_padding_mask": kpm},
        "float key padding": {"key_padding_mask": torch.zeros(B, S).masked_fill(kpm, float("-inf"))},
        "causal + padding": {"attn_mask": torch.ones(T, S, dtype=torch.bool).triu(1),
                             "key_padding_mask": kpm, "is_causal": True},
    }
    return {name: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            for name, kw in forms.items()}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", ["plain", "bias_kv_zero_attn", "kdim_vdim"])
def test_recomputed_probabilities_equal_the_module_weights(batch_first, variant, device):
    B, T, E, H = 2, 6, 16, 4
    kw = {"bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True}, "kdim_vdim": {"kdim": 8, "vdim": 12},
          "plain": {}}[variant]
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dropout=0.3, **kw).eval().to(device)
    q = torch.randn(B, T, E).to(device)
    kv = torch.randn(B, T, kw.get("kdim", E)).to(device)
    v = torch.randn(B, T, kw.get("vdim", E)).to(device)
    if not batch_first:
        q, kv, v = q.transpose(0, 1), kv.transpose(0, 1), v.transpose(0, 1)
    for name, masks in _masks(B, T, T, H, device).items():
        want = mha(q, kv, v, need_weights=True, average_attn_weights=False, **masks)[1]
        got = recompute_probabilities(mha, q, kv, v, need_weights=False, **masks)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_sdpa_user_module_probabilities_equal_explicit_softmax(device):
    torch.manual_seed(0)
    att = CausalSelfAttention().to(device)
    x = torch.randn(2, 5, 16).to(device)
    p = recompute_probabilities(att, x)
    q, k, _ = att.c_attn(x).split(16, dim=2)
    q, k = (t.view(2, 5, 4, 4).transpose(1, 2) for t in (q, k))
    s = (q @ k.transpose(-1, -2) / 2).masked_fill(torch.ones(5, 5, dtype=torch.bool, device=device).triu(1),
                                                  float("-inf"))
    torch.testing.assert_close(p, torch.softmax(s, -1).detach())


def test_module_without_visible_attention_says_so(device):
    class OddAttention(nn.Module):  # its name says attention, it computes none
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    m = OddAttention().to(device)
    with pytest.raises(GradscopeError, match="cannot see its attention probabilities"):
        recompute_probabilities(m, torch.randn(2, 3, 4).to(device))
    rec = gradscope.probe(m, torch.randn(2, 3, 4).to(device), jacobians=False)
    assert any("made no call to" in n for n in rec.notes)


# ----------------------------------------------------------------------------- depth flow
def _reference_block_input_grads(model, layers, x, loss_fn, kpm=None, batch_first=True):
    """‖∂L/∂x_{ℓ,p}‖ by retain_grad on every block input (padding excluded)."""
    inputs = []

    def pre(m, args, kwargs):
        a = args[0] if args else kwargs["src"]
        if not a.requires_grad:
            a = a.detach().requires_grad_(True)
            args = (a,) + tuple(args[1:])
        a.retain_grad()
        inputs.append(a)
        return args, kwargs

    hs = [l.register_forward_pre_hook(pre, with_kwargs=True) for l in layers]
    try:
        out = model(x, src_key_padding_mask=kpm) if kpm is not None else model(x)
        loss_fn(out).backward()
    finally:
        for h in hs:
            h.remove()
    rows = []
    for a in inputs:
        g = a.grad if batch_first else a.grad.transpose(0, 1)
        sq = g.pow(2).sum(-1)
        if kpm is not None:
            sq = sq.masked_fill(kpm, 0)
        rows.append(sq.sum(0).sqrt())
    return torch.stack(rows).cpu().numpy()


@pytest.mark.parametrize("batch_first", [True, False])
def test_depth_flow_equals_autograd_with_padding_masked(batch_first, device):
    torch.manual_seed(0)
    enc = encoder(L=3, batch_first=batch_first).double().to(device)
    x = torch.randn(3, 7, 16, dtype=torch.float64).to(device)
    if not batch_first:
        x = x.transpose(0, 1)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1:, 5:] = True  # positions 5, 6: padding in samples 1 and 2
    kpm[:, 6] = True    # position 6: padding in every sample
    kpm = kpm.to(device)
    loss_fn = lambda y: (y * torch.linspace(-1, 1, 16, dtype=torch.float64, device=device)).sum()  # noqa: E731
    ref = _reference_block_input_grads(enc, enc.layers, x, loss_fn, kpm, batch_first)
    with gradscope.watch(enc, every=1) as scope:
        loss_fn(enc(x, src_key_padding_mask=kpm)).backward()
    assert_no_hooks(enc)
    d = scope.recording.depth_grad_norms()
    assert d.shape == (1, 3, 7)
    np.testing.assert_allclose(d[0, :, :6], ref[:, :6], rtol=1e-9)
    assert np.all(np.isnan(d[0, :, 6]))  # padding in every sample: no position there
    assert not scope.recording.events   # masked positions are not "non-finite gradients"


def test_depth_flow_reaches_the_first_block_when_the_input_needs_no_grad(device):
    torch.manual_seed(0)
    enc = encoder(L=2).to(device)
    x = torch.randn(2, 5, 16).to(device)
    loss_fn = lambda y: (y[:, 0] * torch.linspace(-1, 1, 16, device=device)).sum()  # noqa: E731
    rec = gradscope.probe(enc, x, loss_fn=loss_fn)   # probe asks autograd only for parameter gradients
    d = rec.depth_grad_norms()[0]
    assert np.all(np.isfinite(d)) and np.all(d[0] > 0)
    ref = _reference_block_input_grads(enc, enc.layers, x, loss_fn)
    np.testing.assert_allclose(d, ref, rtol=1e-5)


class SkipBlock(nn.Module):
    def __init__(self, E, H):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0]


def test_depth_jacobians_match_the_oracle(device):
    torch.manual_seed(0)
    model = nn.Sequential(*[SkipBlock(8, 2) for _ in range(3)]).double().to(device)
    x = torch.randn(2, 4, 8, dtype=torch.float64).to(device)
    rec = gradscope.probe(model, x)
    assert rec.attention_stacks == {"": ("0", "1", "2")}
    jn = rec.depth_jacobian_norms()
    assert jn.shape == (2, 4) and rec.measure_meta[""]["depth_jacobian"]["chained"]
    N = 32
    for b in range(2):
        for k in range(4):
            h0 = x[b:b + 1]
            with torch.no_grad():
                for blk in model[:3 - k]:
                    h0 = blk(h0)
            J = torch.autograd.functional.jacobian(lambda z: model[3 - k:](z.view(1, 4, 8)).reshape(-1),
                                                   h0.reshape(-1))
            assert jn[b, k] == pytest.approx(float(torch.linalg.matrix_norm(J)) / math.sqrt(N), rel=1e-8)
    # a residual outside the blocks: the Jacobians compose the blocks alone, and the notes say so
    rec = gradscope.probe(PureStack(L=2, skip=True).to(device), torch.randn(1, 4, 16).to(device))
    assert any("something runs between its blocks" in n for n in rec.notes)


def test_depth_vanishing_and_post_ln_findings(device):
    torch.manual_seed(0)
    rec = gradscope.probe(PureStack(L=5, skip=False, out_scale=0.02).to(device), torch.randn(2, 6, 16).to(device),
                          jacobians=False)
    f = [f for f in gradscope.diagnose(rec).findings if f.kind == "vanishing"]
    assert f and f[0].site == "layers" and f[0].evidence["grad_ratio"] < 1e-3
    assert [r.name for r in f[0].remedies] == ["residual_scaling", "pre_ln"]
    # Post-LN: parameter gradients grow towards the output at initialisation (Xiong et al. 2020)
    for norm_first, expect in ((False, True), (True, False)):
        torch.manual_seed(0)
        enc = encoder(L=8, E=32, norm_first=norm_first)
        for p in enc.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        head = nn.Linear(32, 5).to(device)
        enc = enc.to(device)
        x, y = torch.randn(8, 12, 32).to(device), torch.randint(0, 5, (8,)).to(device)
        with gradscope.watch(enc, every=1) as scope:
            F.cross_entropy(head(enc(x).mean(1)), y).backward()
        kinds = [f.kind for f in scope.diagnose().findings]
        assert ("postln_instability" in kinds) == expect, kinds


# ----------------------------------------------------------------------------- sites
def test_sites_of_encoder_decoder_transformer_and_cross_attention(device):
    torch.manual_seed(0)
    tr = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                        batch_first=True).to(device)
    src, tgt = torch.randn(2, 6, 16).to(device), torch.randn(2, 4, 16).to(device)
    with gradscope.watch(tr, every=1) as scope:
        tr(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(4, device=device)).sum().backward()
    rec = scope.recording
    assert rec.attention_stacks == {"encoder.layers": ("encoder.layers.0", "encoder.layers.1"),
                                    "decoder.layers": ("decoder.layers.0", "decoder.layers.1")}
    assert rec.depth_grad_norms("decoder.layers").shape == (1, 2, 4)
    with pytest.raises(GradscopeError, match="2 attention stacks"):
        rec.depth_grad_norms()
    assert rec.attention_entropy("decoder.layers.1", module="multihead_attn").shape == (1, 2)
    ent = rec.attention_entropy("decoder.layers.1")
    assert np.all((ent > 0) & (ent <= 1))
    with pytest.raises(MissingMeasureError, match="multihead_attn"):
        rec.attention_entropy("decoder.layers.1", module="nope")
    with pytest.raises(GradscopeError, match="Did you mean 'encoder.layers'"):
        rec.depth_grad_norms("encoder.layer")


def test_a_lone_decoder_layer_and_an_unbatched_mha_are_one_block_each(device):
    dec = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True, dropout=0.0).to(device)
    with gradscope.watch(dec, every=1, probe_every=1) as scope:
        dec(torch.randn(2, 4, 16).to(device), torch.randn(2, 6, 16).to(device), tgt_is_causal=True,
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(4, device=device)).pow(3).sum().backward()
    rec = scope.recording
    assert rec.sites == ("attention",) and rec.site_info("attention")["attention"] == ["self_attn", "multihead_attn"]
    assert rec.attention_entropy("attention", module="multihead_attn").shape == (1, 4)
    assert rec.depth_grad_norms().shape == (1, 1, 4) and rec.depth_jacobian_norms().shape == (2, 2)
    assert not rec.notes, rec.notes
    rec = gradscope.probe(nn.MultiheadAttention(8, 2).to(device), (torch.randn(5, 8).to(device),) * 3,
                          loss_fn=lambda o: o[0].sum())
    assert rec.depth_grad_norms().shape == (1, 1, 5) and rec.attention_entropy("attention").shape == (1, 2)
    assert not rec.notes, rec.notes


def test_user_attention_blocks_are_found_and_measured(device):
    torch.manual_seed(0)
    model = TinyGPT().to(device)
    layout = find_attention(model)
    assert list(layout.attn) == ["h.0.attn", "h.1.attn"] and layout.stacks == {"h": ["h.0", "h.1"]}
    idx = torch.randint(0, 20, (2, 6)).to(device)
    with gradscope.watch(model, every=1) as scope:
        F.cross_entropy(model(idx).reshape(-1, 20), idx.reshape(-1)).backward()
    rec = scope.recording
    assert rec.sites == ("h.0", "h.1") and rec.site_info("h.0")["norm_position"] == "pre"
    assert rec.attention_entropy("h.0").shape == (1, 4)
    assert rec.qk_spectral_norm("h.1").shape == (1, 4)
    g = rec.qkv_grad_norms("h.0")
    assert all(np.isfinite(a[0]) and a[0] > 0 for a in g.values())
    assert not [n for n in rec.notes if "failed" in n]


def test_sites_selection_by_block_module_stack_and_attention_prefix():
    model = TinyGPT(L=3)
    for sel, want in ((["h.1"], ("h.1",)), (["h.2.attn"], ("h.2",)), (["h"], ("h.0", "h.1", "h.2"))):
        with gradscope.watch(model, every=1, sites=sel) as scope:
            model(torch.randint(0, 20, (1, 4))).sum().backward()
        assert scope.recording.sites == want
    class Mixer(nn.Module):  # attention without a telling name: selected explicitly
        def __init__(self):
            super().__init__()
            self.inner = CausalSelfAttention()

        def forward(self, x):
            return self.inner(x)

    m = nn.Sequential(Mixer(), Mixer())
    # the inner module is found by its class name; "attention:" forces a module in
    rec = gradscope.probe(m, torch.randn(1, 4, 16), sites=["attention:0.inner"], jacobians=False)
    assert rec.sites == ("0",) and rec.attention_entropy("0").shape == (1, 4)
    with pytest.raises(GradscopeError, match="unknown site 'h.9'"):
        gradscope.watch(model, every=1, sites=["h.9"])


# ----------------------------------------------------------------------------- safety
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(_masks(2, 6, 6, 4)))
def test_outputs_and_gradients_equal_unwatched_for_every_mask_form(batch_first, mask, device):
    # The watched block runs the module's own forward with the same arguments: bitwise equal, on
    # a GPU too (the same kernels on the same inputs).
    torch.manual_seed(0)
    B, T, E, H = 2, 6, 16, 4
    masks = dict(_masks(B, T, T, H, device)[mask])
    enc = encoder(L=2, E=E, H=H, batch_first=batch_first).to(device)
    twin = encoder(L=2, E=E, H=H, batch_first=batch_first).to(device)
    twin.load_state_dict(enc.state_dict())
    x = (torch.randn(B, T, E) if batch_first else torch.randn(T, B, E)).to(device)
    kw = {"mask": masks.get("attn_mask"), "src_key_padding_mask": masks.get("key_padding_mask"),
          "is_causal": masks.get("is_causal", False)}
    with gradscope.watch(enc, every=1, probe_every=None) as scope:
        y = enc(x, **kw)
        y.pow(2).sum().backward()
    y2 = twin(x, **kw)
    y2.pow(2).sum().backward()
    assert torch.equal(y, y2)
    for (n, p), p2 in zip(enc.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, p2.grad), n
    assert_no_hooks(enc)
    rec = scope.recording
    ent = rec.attention_entropy("layers.0")
    assert np.all(np.isfinite(ent)) and np.all((ent >= 0) & (ent <= 1 + 1e-6))
    assert not [n for n in rec.notes if "failed" in n], rec.notes


def test_hooks_gone_after_exceptions_and_errors_pass_through_unchanged(device):
    class BadHeads(nn.Module):  # heads that do not divide the width: the module's own error
        def __init__(self):
            super().__init__()
            self.attention = CausalSelfAttention(E=10, H=3)

        def forward(self, x):
            return self.attention(x)

    m = BadHeads().to(device)
    x = torch.randn(1, 4, 10).to(device)
    with pytest.raises(RuntimeError) as plain:
        m(x)
    with pytest.raises(RuntimeError) as watched:
        with gradscope.watch(m, every=1):
            m(x)
    assert str(watched.value) == str(plain.value)
    assert_no_hooks(m)
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        nn.MultiheadAttention(10, 3)
    enc = encoder().to(device)
    with pytest.raises(ZeroDivisionError):
        with gradscope.watch(enc, every=1):
            enc(torch.randn(1, 3, 16).to(device)).sum().backward()
            1 / 0
    assert_no_hooks(enc)
    with gradscope.watch(enc, every=1):  # a block of a watched model cannot be watched twice
        with pytest.raises(GradscopeError, match="already watched"):
            gradscope.watch(enc.layers[1], every=1)
    assert_no_hooks(enc)


def test_model_without_attention_says_so(device):
    lin = nn.Linear(4, 2).to(device)
    with gradscope.watch(lin, every=1) as scope:
        lin(torch.randn(3, 4).to(device)).sum().backward()
    rec = scope.recording
    assert any("no recurrent or attention site" in n for n in rec.notes)
    with pytest.raises(MissingMeasureError, match="no attention sites"):
        rec.depth_grad_norms()
    assert "No recurrent or attention site" in str(gradscope.diagnose(rec))


def test_schedule_and_save_load_round_trip(tmp_path, device):
    torch.manual_seed(0)
    enc = encoder(L=2).to(device)
    opt = torch.optim.SGD(enc.parameters(), lr=0.01)
    with gradscope.watch(enc, every=3) as scope:
        for _ in range(7):
            opt.zero_grad()
            enc(torch.randn(2, 5, 16).to(device)).pow(2).mean().backward()
            opt.step()
    rec = scope.recording
    assert list(rec.steps) == [0, 3, 6]
    assert rec.attention_entropy("layers.1").shape == (3, 4)
    assert rec.rank_residual("layers.0").shape == rec.token_cosine("layers.0").shape == (3,)
    rec2 = gradscope.load(rec.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(rec2.depth_grad_norms(), rec.depth_grad_norms())
    np.testing.assert_array_equal(rec2.attention_entropy("layers.1"), rec.attention_entropy("layers.1"))
    assert rec2.attention_stacks == rec.attention_stacks == {"layers": ("layers.0", "layers.1")}
    assert rec2.meta["attention"]["stacks"] == {"layers": ["layers.0", "layers.1"]}


def test_two_forwards_one_backward_average_and_cover_the_longest_sequence(device):
    torch.manual_seed(0)
    enc = encoder(L=2).to(device)
    x1, x2 = torch.randn(2, 5, 16).to(device), torch.randn(2, 7, 16).to(device)
    with gradscope.watch(enc, every=1) as scope:
        (enc(x1).pow(3).sum() + enc(x2).pow(3).sum()).backward()
    rec = scope.recording
    assert list(rec.steps) == [0] and rec.depth_grad_norms().shape == (1, 2, 7)
    one = [gradscope.probe(enc, x, loss_fn=lambda y: y.pow(3).sum(), jacobians=False) for x in (x1, x2)]
    # entropy sums and row counts add up over the two passes: a row-weighted mean
    e = [r.attention_entropy("layers.0")[0] for r in one]
    np.testing.assert_allclose(rec.attention_entropy("layers.0")[0], (5 * e[0] + 7 * e[1]) / 12, rtol=1e-5)


def test_accessors_refuse_recurrent_sites_and_unmeasured_recordings(device):
    rnn = nn.RNN(3, 4).to(device)
    rec = gradscope.probe(rnn, torch.randn(5, 2, 3).to(device), lyapunov=False)
    with pytest.raises(GradscopeError, match="not an attention block"):
        rec.attention_entropy("l0")


def test_copies_of_a_watched_attention_model_run_unwatched_with_their_own_weights():
    # e.g. an EMA copy or `best = copy.deepcopy(model)` during a watched run: the patched block
    # forwards must not call back into the original blocks and their weights.
    import copy
    import inspect
    import pickle

    from gradscope.capture._forwards import noop_hook

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0), 2,
                                enable_nested_tensor=False)
    x = torch.randn(5, 2, 8)
    sig = inspect.signature(enc.layers[0].forward)
    with gradscope.watch(enc, every=1) as scope:
        enc(x).sum().backward()
        assert inspect.signature(enc.layers[0].forward) == sig  # the patched block keeps it
        for twin in (copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))):
            with torch.no_grad():
                for p in twin.parameters():
                    p.mul_(0.5)
            ref = copy.deepcopy(twin)
            for m in ref.modules():
                m.__dict__.pop("forward", None)
            torch.testing.assert_close(twin(x), ref(x))
            assert not torch.allclose(twin(x), enc(x))
            assert all(h is noop_hook for h in (*twin._forward_hooks.values(), *twin._forward_pre_hooks.values()))
            twin(x).sum().backward()
        assert scope.step == 1                  # the copies' backward calls are not the model's
    assert len(scope.recording) == 1
    assert_no_hooks(enc)
