"""Fast replay of one fused layer and direction: hand-written BPTT as one autograd Function.

Replaying a fused module with ordinary autograd ops (:mod:`.replay`) costs about ten graph nodes
per time step, and each step's backward computes its own small weight-gradient product. Here one
``torch.autograd.Function`` per layer and direction runs the forward with the fused kernel itself
(so outputs are the kernel's, bitwise), recomputes every gate of every step from two large matrix
products (all h_{t-1} are known once the kernel has run), and its backward loop does only what must
be sequential (one ``[B, G·H] @ [G·H, H]`` product and a few elementwise ops per step). Weight gradients become one large matrix product over all steps,
and the *total* gradients ∂L/∂h_t and ∂L/∂c_t — which the backward loop computes anyway — are
reduced to per-step norms on the device and handed to ``sink``; no tensor hooks are needed.

Used for dense (not packed) input outside autocast; everything else goes through the autograd
replay. Both are tested against the fused kernel. Double backward (``create_graph=True``) through a
watched fused module on a scheduled step is not supported (``once_differentiable`` raises).

Index letters: T time, B batch, I input, H hidden, P projection; buffers are in position order
(index t is input position t, for the reverse direction too).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._norms import wide

Sink = Callable[[Dict[str, Tensor]], None]

__all__ = ["lstm_layer", "gru_layer", "elman_layer"]


def _prev(buf: Tensor, first: Tensor, reverse: bool) -> Tensor:
    """The state before each position, in position order: ``[T, B, ·]``."""
    if reverse:
        return torch.cat((buf[1:], first.unsqueeze(0)))
    return torch.cat((first.unsqueeze(0), buf[:-1]))


def _order(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _step_norms(buf: Tensor) -> Tensor:
    """Norm of every step's gradient, accumulated in float64 (so a finite gradient keeps a finite
    norm; float32 on MPS, which has no float64)."""
    return torch.linalg.vector_norm(buf.flatten(1), dim=1, dtype=wide(buf.device))


def _fused_single(kind: str, x: Tensor, hx, weights, reverse: bool):
    """The fused kernel on one layer and direction (time-major ``x``): ``(out, *final)``.

    The reverse direction runs forward over the time-flipped sequence, as the kernel itself does.
    """
    if reverse:
        x = x.flip(0)
    has_bias = len(weights) >= 4 and weights[2] is not None
    if not has_bias and x.is_cuda:
        # A bias-free layer's weights are views into the module's flat cuDNN buffer. For the first
        # layer they sit at its start, and cuDNN takes the buffer as this one layer's weights and
        # reads the next layer's weights where its biases would be (wrong outputs, seen for
        # bias=False with 2 layers or 2 directions). Explicit zero biases (the same function) make
        # cuDNN copy the weights into a buffer of its own instead.
        zero = torch.zeros(weights[1].shape[0], dtype=weights[1].dtype, device=weights[1].device)
        weights = [weights[0], weights[1], zero, zero] + list(weights[4:])
        has_bias = True
    params = [w for w in weights if w is not None]
    with warnings.catch_warnings():
        # cuDNN asks for one contiguous weight chunk; these are the module's own per-layer weights.
        warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk.*")
        fn = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh,
              "rnn_relu": torch._VF.rnn_relu}[kind]
        res = fn(x, hx, params, has_bias, 1, 0.0, False, False, False)
    out = res[0].flip(0) if reverse else res[0]
    return (out,) + tuple(r[0] for r in res[1:])


# On the CPU, from this hidden size on, the LSTM forward runs as a loop of its own that keeps every
# gate (one [B, P|H] @ [P|H, 4H] product and six elementwise ops per step) instead of the fused
# kernel followed by a recomputation of all gates: measured for H 256, T 200, B 32 (2 threads)
# 46.6 ms against 74 ms (1 thread: 68 against 133 ms). For H 64 the fused kernel plus
# recomputation is faster (1.9 against 2.4 ms). On accelerators the fused kernel is always used
# (a loop there is bound by kernel launches). Outputs then agree with the kernel to rounding.
LSTM_OWN_LOOP_MIN_HIDDEN = 128  # H 128, T 100: equal with 2 threads, 13 against 16 ms with 1


def _recurrent_weight_grad(dA: Tensor, OUT: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """``Σ_t dA_tᵀ h_{t−1}`` (``dA [T, B, G·H]``, states in position order) as two products over
    slices, without building the shifted state sequence."""
    T, B, _ = dA.shape
    if T == 1:
        return dA[0].t() @ h0
    if reverse:  # position t's previous state is h_{t+1}; the last position's is h0
        body, first = (dA[:-1], OUT[1:]), dA[-1]
    else:
        body, first = (dA[1:], OUT[:-1]), dA[0]
    out = body[0].reshape((T - 1) * B, -1).t() @ body[1].reshape((T - 1) * B, -1)
    return out.addmm_(first.t(), h0)


def _input_gates(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    """Every step's input part of the gate pre-activations, both biases included (``b_hh`` may be
    None): ``[T, B, G·H]`` (a fresh buffer the callers overwrite in place)."""
    T, B, _ = x.shape
    flat = x.reshape(T * B, -1)
    if b_ih is None:
        return (flat @ w_ih.t()).view(T, B, -1)
    out = torch.addmm(b_ih + b_hh if b_hh is not None else b_ih, flat, w_ih.t())
    return out.view(T, B, -1)


def _tanh_from_sigmoid(s: Tensor) -> Tensor:
    """``2s − 1`` for ``s = σ(2x)``: tanh(x), within ~2 ulp of 1 absolute (a new tensor).

    ``2s`` is exact, so ``(2s) − 1`` rounds once, as a fused ``−1 + 2s`` would. The constant stays
    a Python number: a 0-d tensor made on a GPU here costs a host→device copy that synchronises
    (one per layer and direction on every recorded step, seen on an H200)."""
    return torch.mul(s, 2.0).sub_(1.0)


def _lstm_forward_loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse: bool):
    """The LSTM recurrence step by step, keeping every gate: ``(OUT, hT, cT, SIG, G, C, TC, HH)``."""
    T, B, _ = x.shape
    H = w_hh.shape[0] // 4
    OUT_SIZE = w_hr.shape[0] if w_hr is not None else H
    kw = dict(dtype=x.dtype, device=x.device)
    XW = _input_gates(x, w_ih, b_ih, b_hh)
    SIG = XW  # each step's pre-activations become its gates in place (fewer fresh pages per step)
    G = torch.empty(T, B, H, **kw)
    C = torch.empty(T, B, H, **kw)
    TC = torch.empty(T, B, H, **kw)
    OUT = torch.empty(T, B, OUT_SIZE, **kw)
    HH = torch.empty(T, B, H, **kw) if w_hr is not None else None
    ig = torch.empty(B, H, **kw)
    whT, wrT = w_hh.t(), (w_hr.t() if w_hr is not None else None)
    XW_t, SIG_t, G_t, C_t, TC_t, OUT_t = (a.unbind(0) for a in (XW, SIG, G, C, TC, OUT))
    HH_t = HH.unbind(0) if HH is not None else None
    h, c = h0, c0
    for t in _order(T, reverse):
        pre = XW_t[t].addmm_(h, whT)  # in place: the input part is not needed again
        g = torch.tanh(pre[:, 2 * H:3 * H], out=G_t[t])
        sg = pre.sigmoid_()
        torch.mul(sg[:, :H], g, out=ig)
        c = torch.addcmul(ig, sg[:, H:2 * H], c, out=C_t[t])
        tc = torch.tanh(c, out=TC_t[t])
        if w_hr is None:
            h = torch.mul(sg[:, 3 * H:], tc, out=OUT_t[t])
        else:
            hh = torch.mul(sg[:, 3 * H:], tc, out=HH_t[t])
            h = torch.mm(hh, wrT, out=OUT_t[t])
    return OUT, h.clone(), c.clone(), SIG.view(T, B, 4, H), G, C, TC, HH


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, sink):
        T, B, _ = x.shape
        H = w_hh.shape[0] // 4
        if x.device.type == "cpu" and H >= LSTM_OWN_LOOP_MIN_HIDDEN:
            OUT, hT, cT, SIG, G, C, TC, HH = _lstm_forward_loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, SIG, G, C, TC, HH, OUT)
            ctx.reverse, ctx.sink, ctx.has_bias = reverse, sink, b_ih is not None
            return OUT, hT, cT
        OUT, hT, cT = _fused_single("lstm", x, (h0.unsqueeze(0), c0.unsqueeze(0)),
                                    [w_ih, w_hh, b_ih, b_hh, w_hr] if w_hr is not None else [w_ih, w_hh, b_ih, b_hh],
                                    reverse)
        # Gates for all steps in one product (every h_{t-1} is known now); c_t by its linear
        # recurrence, one fused op per step.
        gates = _input_gates(x, w_ih, b_ih, b_hh).view(T * B, 4 * H)
        gates.addmm_(_prev(OUT, h0, reverse).reshape(T * B, -1), w_hh.t())
        gates = gates.view(T, B, 4, H)
        # tanh(x) = 2σ(2x) − 1 over whole buffers: one sigmoid pass does all four gates (torch's
        # CPU tanh measured 3.5× slower than these three passes on [T, B, H]); the g block of SIG
        # then holds σ(2·g), which nothing reads.
        gates[:, :, 2].mul_(2)
        SIG = gates.sigmoid_()  # in place: the pre-activations are not needed again
        G = _tanh_from_sigmoid(SIG[:, :, 2])
        i, f, o = SIG[:, :, 0], SIG[:, :, 1], SIG[:, :, 3]
        C = torch.mul(i, G)  # i·g, then c_t = f·c_{t−1} + i·g in place, step by step
        c = c0
        f_t, C_t = f.unbind(0), C.unbind(0)
        for t in _order(T, reverse):
            c = C_t[t].addcmul_(f_t[t], c)
        TC = torch.mul(C, 2).sigmoid_().mul_(2).sub_(1)  # tanh(c) = 2σ(2c) − 1, one buffer
        HH = o * TC if w_hr is not None else None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, SIG, G, C, TC, HH, OUT)
        ctx.reverse, ctx.sink, ctx.has_bias = reverse, sink, b_ih is not None
        return OUT, hT, cT

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hT, g_cT):
        x, h0, c0, w_ih, w_hh, w_hr, SIG, G, C, TC, HH, OUT = ctx.saved_tensors
        T, B, _ = x.shape
        H = w_hh.shape[0] // 4
        g_out = _zeros_if_none(g_out, OUT)
        i, f, o = SIG[:, :, 0], SIG[:, :, 1], SIG[:, :, 3]
        # Local derivatives for all steps at once (written in place into K); the loop below only
        # chains them. dσ = σ(1−σ) for all four gate blocks in two passes.
        # (addcmul forms and in-place products: no temporaries of the size of K)
        K = torch.addcmul(SIG, SIG, SIG, value=-1)                                 # σ − σ²
        K[:, :, 0].mul_(G)                                                         # g · i(1−i)
        if ctx.reverse:                                                            # c_{t−1} · f(1−f)
            K[:-1, :, 1].mul_(C[1:])
            K[-1, :, 1].mul_(c0)
        else:
            K[1:, :, 1].mul_(C[:-1])
            K[0, :, 1].mul_(c0)
        sq = G * G
        torch.addcmul(i, i, sq, value=-1, out=K[:, :, 2])                          # i · (1−g²)
        K[:, :, 3].mul_(TC)                                                        # tanh(c) · o(1−o)
        torch.mul(TC, TC, out=sq)
        Kc = torch.addcmul(o, o, sq, value=-1)                                     # o · (1−tanh²c)
        del sq
        # Step t's local derivatives are read once, by step t: the gate gradients dG overwrite K
        # and the cell gradients DC overwrite Kc as the loop goes (two buffers fewer to allocate).
        dG, DC = K, Kc
        DH = g_out.clone(memory_format=torch.contiguous_format)  # + recurrent part, in place below
        # Per-step views made once (unbind) rather than indexed in the loop: fewer Python ops.
        dG_t, DH_t, DC_t = dG.unbind(0), DH.unbind(0), DC.unbind(0)
        K_t, Kc_t, f_t = dG_t, DC_t, f.unbind(0)
        dGv_t = dG.view(T, B, 4 * H).unbind(0)
        order = list(reversed(_order(T, ctx.reverse)))
        dh = DH_t[order[0]]
        if g_hT is not None:
            dh.add_(g_hT)
        dc_rec = _zeros_if_none(g_cT, c0)
        for n, t in enumerate(order):
            dhh = dh @ w_hr if w_hr is not None else dh
            dc = torch.addcmul(dc_rec, dhh, Kc_t[t], out=DC_t[t])
            torch.mul(torch.stack((dc, dc, dc, dhh), dim=1), K_t[t], out=dG_t[t])
            dc_rec = dc * f_t[t]
            if n + 1 < T:
                nxt = order[n + 1]
                dh = DH_t[nxt].addmm_(dGv_t[t], w_hh)
            else:
                dh = dGv_t[t] @ w_hh  # gradient of h0
        return _lstm_param_grads(ctx, x, h0, w_ih, w_hh, w_hr, dG, DH, DC, HH, OUT, dh, dc_rec)


def _lstm_param_grads(ctx, x, h0, w_ih, w_hh, w_hr, dG, DH, DC, HH, OUT, dh, dc_rec):
    """After the BPTT loop: hand the per-step norms to the sink, then every input's gradient from
    the pre-activation gradients ``dG [T, B, 4, H]`` in large products."""
    T, B, _ = x.shape
    H = w_hh.shape[0] // 4
    ctx.sink({"h": _step_norms(DH), "c": _step_norms(DC)})
    dGf = dG.view(T * B, 4 * H)
    need = ctx.needs_input_grad
    dx = (dGf @ w_ih).view(T, B, -1) if need[0] else None
    dw_ih = dGf.t() @ x.reshape(T * B, -1) if need[3] else None
    dw_hh = _recurrent_weight_grad(dG.view(T, B, 4 * H), OUT, h0, ctx.reverse) if need[4] else None
    db = dGf.sum(0) if ctx.has_bias else None
    dw_hr = DH.view(T * B, -1).t() @ HH.view(T * B, H) if w_hr is not None and need[7] else None
    return dx, dh, dc_rec, dw_ih, dw_hh, db, db, dw_hr, None, None


class _GRULayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, sink):
        T, B, _ = x.shape
        H = w_hh.shape[0] // 3
        OUT, hT = _fused_single("gru", x, h0.unsqueeze(0), [w_ih, w_hh, b_ih, b_hh], reverse)
        # Every gate of every step from two products: all h_{t-1} are known now.
        hprev = _prev(OUT, h0, reverse)
        XW = F.linear(x, w_ih, b_ih)
        HW = F.linear(hprev, w_hh, b_hh)
        RZ = torch.sigmoid(XW[..., :2 * H] + HW[..., :2 * H])
        N = torch.tanh(torch.addcmul(XW[..., 2 * H:], RZ[..., :H], HW[..., 2 * H:]))
        ctx.save_for_backward(x, h0, w_ih, w_hh, RZ, HW, N, OUT)
        ctx.reverse, ctx.sink, ctx.has_bias = reverse, sink, b_ih is not None
        return OUT, hT

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hT):
        x, h0, w_ih, w_hh, RZ, HW, N, OUT = ctx.saved_tensors
        T, B, _ = x.shape
        H = w_hh.shape[0] // 3
        g_out = _zeros_if_none(g_out, OUT)
        r, z = RZ[..., :H], RZ[..., H:]
        hprev = _prev(OUT, h0, ctx.reverse)
        Kn = (1 - z) * (1 - N * N)
        Kz = (hprev - N) * z * (1 - z)
        Kr = HW[..., 2 * H:] * r * (1 - r)
        dXW = torch.empty(T, B, 3 * H, dtype=x.dtype, device=x.device)
        dHW = torch.empty_like(dXW)
        DH = torch.empty_like(OUT)
        order = list(reversed(_order(T, ctx.reverse)))
        dh = torch.add(g_out[order[0]], _zeros_if_none(g_hT, h0), out=DH[order[0]])
        for n, t in enumerate(order):
            dan = torch.mul(dh, Kn[t], out=dXW[t, :, 2 * H:])
            torch.mul(dh, Kz[t], out=dXW[t, :, H:2 * H])
            torch.mul(dan, Kr[t], out=dXW[t, :, :H])
            dHW[t, :, :2 * H] = dXW[t, :, :2 * H]
            torch.mul(dan, r[t], out=dHW[t, :, 2 * H:])
            direct = dh * z[t]
            if n + 1 < T:
                nxt = order[n + 1]
                dh = torch.add(g_out[nxt], torch.addmm(direct, dHW[t], w_hh), out=DH[nxt])
            else:
                dh = torch.addmm(direct, dHW[t], w_hh)
        ctx.sink({"h": _step_norms(DH)})
        dXf, dHf = dXW.view(T * B, -1), dHW.view(T * B, -1)
        need = ctx.needs_input_grad
        dx = (dXf @ w_ih).view(T, B, -1) if need[0] else None
        dw_ih = dXf.t() @ x.reshape(T * B, -1) if need[2] else None
        dw_hh = dHf.t() @ hprev.reshape(T * B, -1) if need[3] else None
        db_ih = dXf.sum(0) if ctx.has_bias else None
        db_hh = dHf.sum(0) if ctx.has_bias else None
        return dx, dh, dw_ih, dw_hh, db_ih, db_hh, None, None


class _ElmanLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, relu, reverse, sink):
        OUT, hT = _fused_single("rnn_relu" if relu else "rnn_tanh", x, h0.unsqueeze(0),
                                [w_ih, w_hh, b_ih, b_hh], reverse)
        ctx.save_for_backward(x, h0, w_ih, w_hh, OUT)
        ctx.reverse, ctx.sink, ctx.has_bias, ctx.relu = reverse, sink, b_ih is not None, relu
        return OUT, hT

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hT):
        x, h0, w_ih, w_hh, OUT = ctx.saved_tensors
        T, B, _ = x.shape
        g_out = _zeros_if_none(g_out, OUT)
        # ReLU: pass the gradient wherever not out <= 0 — as torch does (threshold_backward), also
        # where out is NaN; tanh: 1 − out² (NaN where out is NaN, as torch)
        K = (~(OUT <= 0)).to(OUT.dtype) if ctx.relu else 1 - OUT * OUT
        dA = torch.empty_like(OUT)
        DH = torch.empty_like(OUT)
        order = list(reversed(_order(T, ctx.reverse)))
        dh = torch.add(g_out[order[0]], _zeros_if_none(g_hT, h0), out=DH[order[0]])
        for n, t in enumerate(order):
            da = torch.mul(dh, K[t], out=dA[t])
            if n + 1 < T:
                nxt = order[n + 1]
                dh = torch.addmm(g_out[nxt], da, w_hh, out=DH[nxt])
            else:
                dh = da @ w_hh
        ctx.sink({"h": _step_norms(DH)})
        dAf = dA.view(T * B, -1)
        need = ctx.needs_input_grad
        dx = (dAf @ w_ih).view(T, B, -1) if need[0] else None
        dw_ih = dAf.t() @ x.reshape(T * B, -1) if need[2] else None
        dw_hh = _recurrent_weight_grad(dA.view(T, B, -1), OUT, h0, ctx.reverse) if need[3] else None
        db = dAf.sum(0) if ctx.has_bias else None
        return dx, dh, dw_ih, dw_hh, db, db, None, None, None


def lstm_layer(x, h0, c0, step, reverse: bool, sink: Sink):
    """``(out [T,B,P|H], h_T, c_T)`` for one LSTM layer/direction; ``step`` holds the weights."""
    return _LSTMLayer.apply(x, h0, c0, step.weight_ih, step.weight_hh, step.bias_ih, step.bias_hh,
                            step.weight_hr, reverse, sink)


def gru_layer(x, h0, step, reverse: bool, sink: Sink):
    return _GRULayer.apply(x, h0, step.weight_ih, step.weight_hh, step.bias_ih, step.bias_hh, reverse, sink)


def elman_layer(x, h0, step, reverse: bool, sink: Sink):
    return _ElmanLayer.apply(x, h0, step.weight_ih, step.weight_hh, step.bias_ih, step.bias_hh,
                             step.nonlinearity == "relu", reverse, sink)
