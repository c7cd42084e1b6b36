"""Attention sites in Hugging Face models: tiny BERT and GPT-2 built from configs (no downloads)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradscope

from conftest import assert_no_hooks

if os.environ.get("CI"):
    import transformers  # noqa: F401 - CI installs the hf extra: these tests must run, not skip
else:
    transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402


def tiny_bert(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation=impl)
    m = BertForSequenceClassification(cfg)
    with torch.no_grad():  # larger query/key weights than BERT's init, so attention is not uniform
        for layer in m.bert.encoder.layer:
            layer.attention.self.query.weight.normal_(0, 0.5)
            layer.attention.self.key.weight.normal_(0, 0.5)
    return m


def tiny_gpt2(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=impl)
    return GPT2LMHeadModel(cfg)


def batch(T=10, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, T), generator=g)
    am = torch.ones(3, T, dtype=torch.long)
    am[1, T - 3:] = 0
    am[2, T - 5:] = 0
    am[:, T - 1] = 0  # the last position is padding in every sample
    return {"input_ids": ids.to(device), "attention_mask": am.to(device)}


def bert_loss(out):
    return out.logits.pow(2).sum()


def test_bert_sites_measures_and_padding(device):
    m = tiny_bert().to(device)
    rec = gradscope.probe(m, batch(device=device), loss_fn=bert_loss)
    assert rec.attention_stacks == {"bert.encoder.layer": ("bert.encoder.layer.0", "bert.encoder.layer.1")}
    info = rec.site_info("bert.encoder.layer.0")
    assert info["attention"] == ["bert.encoder.layer.0.attention.self"] and info["heads"] == 4
    assert info["norm_position"] == "post" and info["origin"] == "hf"
    ent = rec.attention_entropy("bert.encoder.layer.1")
    assert ent.shape == (1, 4) and np.all((ent > 0) & (ent < 1))
    d = rec.depth_grad_norms()
    assert d.shape == (1, 2, 10)
    assert np.all(np.isnan(d[0, :, 9])) and np.all(np.isfinite(d[0, :, :9]))
    assert rec.depth_jacobian_norms().shape == (2, 3)
    assert rec.meta["attention"]["hf_attn_implementation"] == "sdpa"
    assert m.config._attn_implementation == "sdpa"     # the model is left as it was
    assert not [n for n in rec.notes if "failed" in n], rec.notes
    assert_no_hooks(m)


def _entropy_from_attentions(attn, am):
    """Normalised entropy per head from the probabilities an eager model returns, padding excluded."""
    B, H, T, S = attn.shape
    keys = am.bool()[:, None, None, :].expand(B, H, T, S)
    ent = torch.special.entr(attn).sum(-1) / keys.sum(-1).double().log()        # [B, H, T]
    rows = am.bool()[:, None, :].expand(B, H, T)
    return (ent * rows).sum((0, 2)) / rows.sum((0, 2))


def test_bert_sdpa_probabilities_equal_the_eager_attentions(device):
    sdpa, eager = tiny_bert("sdpa").to(device), tiny_bert("eager").to(device)
    eager.load_state_dict(sdpa.state_dict())
    b = batch(device=device)
    rec = gradscope.probe(sdpa, b, loss_fn=bert_loss, jacobians=False)
    rec_e = gradscope.probe(eager, b, loss_fn=bert_loss, jacobians=False)
    with torch.no_grad():
        att = eager(**b, output_attentions=True).attentions
    for i, a in enumerate(att):
        want = _entropy_from_attentions(a.double(), b["attention_mask"]).cpu().numpy()
        np.testing.assert_allclose(rec.attention_entropy(f"bert.encoder.layer.{i}")[0], want, rtol=1e-4)
        np.testing.assert_allclose(rec_e.attention_entropy(f"bert.encoder.layer.{i}")[0], want, rtol=1e-4)
    np.testing.assert_allclose(rec.depth_grad_norms(), rec_e.depth_grad_norms(), rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_outputs_and_gradients_equal_unwatched(make, device):
    m, twin = make().to(device), make().to(device)
    twin.load_state_dict(m.state_dict())
    b = batch(device=device)
    with gradscope.watch(m, every=1) as scope:
        out = m(**b)
        out.logits.logsumexp(-1).sum().backward()
    out2 = twin(**b)
    out2.logits.logsumexp(-1).sum().backward()
    assert torch.equal(out.logits, out2.logits)
    for (n, p), p2 in zip(m.named_parameters(), twin.parameters()):
        assert (p.grad is None and p2.grad is None) or torch.equal(p.grad, p2.grad), n
    assert_no_hooks(m)
    assert len(scope.recording.sites) == 2


def test_gpt2_causal_entropy_cache_untouched_and_diagnosis(device):
    m = tiny_gpt2().to(device)
    b = batch(device=device)
    with gradscope.watch(m, every=1, probe_every=1) as scope:   # the probe re-runs blocks for depth Jacobians
        out = m(**b, use_cache=True)
        out.logits.logsumexp(-1).mean().backward()
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert cache is not None and cache.get_seq_length() == 10   # not extended by gradscope
    rec = scope.recording
    assert rec.attention_stacks == {"transformer.h": ("transformer.h.0", "transformer.h.1")}
    assert rec.site_info("transformer.h.0")["norm_position"] == "pre"
    ent = rec.attention_entropy("transformer.h.0")
    assert np.all((ent > 0.5) & (ent <= 1))                    # GPT-2's small init: nearly uniform
    g = rec.qkv_grad_norms("transformer.h.1")                  # slices of the fused c_attn Conv1D
    assert all(a.shape == (1,) and a[0] > 0 for a in g.values())
    assert rec.qk_spectral_norm("transformer.h.1").shape == (1, 4)
    jn = rec.depth_jacobian_norms()
    assert jn.shape == (2, 3) and np.all((jn[:, 1:] > 0.5) & (jn[:, 1:] < 5))  # residual stream: gain ≈ 1
    diag = gradscope.diagnose(rec)
    assert set(diag.sites) == {"transformer.h.0", "transformer.h.1"}
    assert not [n for n in rec.notes if "failed" in n], rec.notes
    assert_no_hooks(m)


def test_gpt2_sdpa_and_eager_measure_the_same_entropy(device):
    sdpa, eager = tiny_gpt2("sdpa").to(device), tiny_gpt2("eager").to(device)
    eager.load_state_dict(sdpa.state_dict())
    b = batch(device=device)
    loss = lambda o: o.logits.logsumexp(-1).mean()  # noqa: E731
    r1 = gradscope.probe(sdpa, b, loss_fn=loss, jacobians=False)
    r2 = gradscope.probe(eager, b, loss_fn=loss, jacobians=False)
    for s in r1.sites:
        np.testing.assert_allclose(r1.attention_entropy(s), r2.attention_entropy(s), rtol=1e-5)


def test_gradscope_does_not_import_transformers_for_other_models():
    code = ("import sys, torch, gradscope\n"
            "enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)\n"
            "rec = gradscope.probe(enc, torch.randn(4, 2, 8))\n"
            "gradscope.diagnose(rec)\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
