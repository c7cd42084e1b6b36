"""Overhead of watch() on attention models: plain vs watched training steps, interleaved in one run.

Same method and targets as benchmarks/overhead.py (the recurrent rows): two identical copies train
on the same batches, one watched for the whole run; steps alternate so drifts of a shared machine
hit both alike. Ratio = median of watched / plain step time for every=1, mean for every=50 (the
scheduled step amortised over the other 49). A scheduled step records depth flow, per-head
entropy (probabilities recomputed from the captured query/key), rank residual, token cosine,
‖∇W_Q,K,V‖ and the QK spectral norms. Writes the "overhead-attention" section of
benchmarks/RESULTS.md.

Run: python benchmarks/overhead_attention.py [--quick] [--device cuda]
(CUDA rows go to the "overhead-attention-cuda" section)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import (OVERHEAD_HEAD, bench_args, interleaved_times, machine_for, overhead_row,  # noqa: E402
                      watched_copy, write_section)


class Encoder(nn.Module):
    """Token embedding, nn.TransformerEncoder (Post-LN, batch-first), mean-pooled classifier."""

    def __init__(self, vocab=1000, d=128, heads=4, layers=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids, pad):
        h = self.enc(self.emb(ids), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                     vocab_size=1000, num_labels=10)
    return BertForSequenceClassification(cfg)


def timed_steps(make, size, every, steps, warmup=3, device="cpu"):
    B, T = size
    torch.manual_seed(0)
    plain = make().to(device)
    watched = watched_copy(plain)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (plain, watched)]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 1000, (B, T), generator=g) for _ in range(4)]
    pads = []
    for _ in range(4):
        lens = torch.randint(T // 2, T + 1, (B,), generator=g)
        pads.append(torch.arange(T)[None, :] >= lens[:, None])
    ys = [torch.randint(0, 10, (B,), generator=g) for _ in range(4)]
    ids, pads, ys = ([t.to(device) for t in ts] for ts in (ids, pads, ys))
    hf = not isinstance(plain, Encoder)

    opt_of = {id(plain): opts[0], id(watched): opts[1]}

    def step(model, i):
        opt = opt_of[id(model)]
        opt.zero_grad()
        if hf:
            out = model(input_ids=ids[i % 4], attention_mask=(~pads[i % 4]).long()).logits
        else:
            out = model(ids[i % 4], pads[i % 4])
        nn.functional.cross_entropy(out, ys[i % 4]).backward()
        opt.step()

    return interleaved_times(plain, watched, step, every=every, steps=steps, warmup=warmup, device=device)


def main(argv=None):
    args, dev, gpu = bench_args(__doc__, argv)
    # One intra-op thread: on a shared 2-core machine two threads fight other processes and the
    # step times swing by 10× (the thread count is printed with the machine line).
    if not gpu:
        torch.set_num_threads(1)
    size = (32, 64)
    cases = [
        ("nn.TransformerEncoder 4×128, 4 heads, B 32, T 64, padded", Encoder, 1, "≤ 1.5×"),
        ("nn.TransformerEncoder 4×128, 4 heads, B 32, T 64, padded", Encoder, None, "≤ 1.03×"),
    ]
    try:
        import transformers  # noqa: F401  (only: is the extra installed?)
        cases += [("HF BERT 4×128, 4 heads (sdpa), B 32, T 64, padded", hf_bert, 1, "≤ 1.5×"),
                  ("HF BERT 4×128, 4 heads (sdpa), B 32, T 64, padded", hf_bert, None, "≤ 1.03×")]
    except ImportError:
        pass
    rows = []
    for name, make, every, target in cases:
        n = (100 if gpu else 30) if every == 1 else 300
        if args.quick:
            n = 3 if every == 1 else 51
        a, b, sched = timed_steps(make, size, every, n, device=dev)
        rows.append(overhead_row(name, every, a, b, target, sched))
        print(rows[-1], flush=True)
    body = "\n".join([
        ("## watch() overhead on attention models on CUDA (`python benchmarks/overhead_attention.py "
         "--device cuda`)") if gpu else
        "## watch() overhead on attention models (`python benchmarks/overhead_attention.py`)",
        "",
        f"Machine: {machine_for(dev)}. Plain and watched copies of the same model train in alternation "
        f"(SGD step included); ratio = median (every=1) or mean (default watch(): the overhead budget, "
        f"amortised) of watched / plain step time. A scheduled step records depth flow, per-head "
        f"entropy, rank residual, token cosine, ‖∇W_Q,K,V‖ and QK spectral norms of every block.",
        "",
        *OVERHEAD_HEAD,
        *rows,
    ])
    if not args.quick:
        write_section("overhead-attention-cuda" if gpu else "overhead-attention", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
