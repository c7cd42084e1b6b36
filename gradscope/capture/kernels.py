"""Optional compiled CPU kernel: the LSTM fast replay's loops (:mod:`.fastbptt`) and watch()'s taps.

At small sizes (H 64, T 50) a scheduled step of the Python fast replay spends most of its time
dispatching tiny eager ops from Python, one time step at a time; a user cell loop spends it in
Python work per time step; and every step off the schedule pays the root module's Python forward
hooks. This module holds a short C++ extension that torch compiles on the user's machine
(``torch.utils.cpp_extension.load_inline``; needs a C++ compiler and ``ninja``) and caches under
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR``), so only the first use on a machine pays
the build (~25 s of one core). It contains:

- ``lstm_forward`` / ``lstm_backward``: the LSTM forward and BPTT loops of one layer and direction;
- ``hook_norms`` / ``NormSink`` / ``HookSet``: tensor hooks that record the norm of a state's
  gradient (float64) without entering Python;
- ``CellTap``: a user cell's forward for one scheduled pass — calls the cell, hooks its states;
- ``RootTap`` / ``RootForward``: the watched model's forward once the kernel is in use (a C type,
  no Python frame) — counts steps (backward calls reaching a pass's output) in C++ and hands
  scheduled passes to Python, so steps off the schedule run no Python of gradscope's at all.

The build starts in a background thread the first time a watched model with a recurrent site has a
scheduled step; until it is ready — or when it cannot be built — the pure-Python paths run, and
results are the same (both are tested). ``GRADSCOPE_KERNELS`` chooses:

- ``auto`` (default): build in the background on first use, use once ready;
- ``sync``: build on first use and wait for it;
- ``0`` / ``off``: never build, never use.

``gradscope.capture.kernels.status()`` says which applies and why; :func:`build` builds now.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Optional

import torch

from ..errors import GradscopeError

__all__ = ["get", "build", "status", "mode"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/graph_task.h>
#include <structmember.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

using at::Tensor;

// One LSTM layer and direction, time-major and contiguous. XW [T, B, 4H] holds every step's input
// pre-activations (biases included) with the g block doubled, and w_hh2 is the recurrent weight with
// its g rows doubled (both exact): sigmoids of the four blocks then give i, f, o and sigmoid(2g),
// and tanh(g) = 2 sigmoid(2g) - 1. XW is overwritten by the gates (the g block then holds
// sigmoid(2g), which nothing reads; tanh(g) goes to G). Returns OUT, h_T, c_T, G, C, TC = tanh(C),
// HH (o * tanh(c) before the projection; undefined without one).
//
// Per step: one product (ATen) and one pass of cell arithmetic over [B, H] that computes all five
// sigmoids itself (gs_exp below), so that the pass vectorises; compiled for AVX-512, AVX2 and the
// baseline, chosen at load time (GCC target_clones, x86-64 Linux), elsewhere for the baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GS_CLONES
#endif
#define GS_INLINE inline __attribute__((always_inline))

// exp(x) for float: Cephes' expf polynomial after range reduction by ln 2 (about 1 ulp), without
// branches or library calls so that loops over it vectorise; x is clamped to [-87, 88] (exp
// stays a normal float) and NaN stays NaN. Doubles use std::exp.
static GS_INLINE float gs_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
static GS_INLINE double gs_exp(double x) { return std::exp(x); }
template <typename T> static GS_INLINE T gs_sigmoid(T x) { return T(1) / (T(1) + gs_exp(-x)); }

// Rows b0..b1 of one step: pre [B, 4H] (pre-activations in, gates out), cp = c_{t-1}; writes
// g = tanh(g), c, tc = tanh(c) and hh = o * tanh(c).
template <typename T>
static GS_INLINE void cell_forward_body(int64_t b0, int64_t b1, int64_t H, T* __restrict__ pre,
                                        const T* __restrict__ cp, T* __restrict__ g, T* __restrict__ c,
                                        T* __restrict__ tc, T* __restrict__ hh) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ s = pre + b * 4 * H;
    const int64_t o0 = b * H;
    for (int64_t j = 0; j < H; ++j) {
      const int64_t n = o0 + j;
      const T i = gs_sigmoid(s[j]), f = gs_sigmoid(s[H + j]);
      const T q = gs_sigmoid(s[2 * H + j]), o = gs_sigmoid(s[3 * H + j]);
      const T gv = T(2) * q - T(1);
      const T cv = f * cp[n] + i * gv;
      const T t = T(2) * gs_sigmoid(T(2) * cv) - T(1);
      s[j] = i;
      s[H + j] = f;
      s[2 * H + j] = q;
      s[3 * H + j] = o;
      g[n] = gv;
      c[n] = cv;
      tc[n] = t;
      hh[n] = o * t;
    }
  }
}

GS_CLONES static void cell_forward_f(int64_t b0, int64_t b1, int64_t H, float* pre, const float* cp, float* g,
                                     float* c, float* tc, float* hh) {
  cell_forward_body<float>(b0, b1, H, pre, cp, g, c, tc, hh);
}
GS_CLONES static void cell_forward_d(int64_t b0, int64_t b1, int64_t H, double* pre, const double* cp,
                                     double* g, double* c, double* tc, double* hh) {
  cell_forward_body<double>(b0, b1, H, pre, cp, g, c, tc, hh);
}
static void cell_forward(int64_t b0, int64_t b1, int64_t H, float* pre, const float* cp, float* g, float* c,
                         float* tc, float* hh) {
  cell_forward_f(b0, b1, H, pre, cp, g, c, tc, hh);
}
static void cell_forward(int64_t b0, int64_t b1, int64_t H, double* pre, const double* cp, double* g,
                         double* c, double* tc, double* hh) {
  cell_forward_d(b0, b1, H, pre, cp, g, c, tc, hh);
}

// Rows per thread in the cell passes: threads only for large [B, H] (a parallel region costs µs).
static int64_t cell_grain(int64_t H) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 4 * H)); }

std::vector<Tensor> lstm_forward(Tensor XW, Tensor h0, Tensor c0, Tensor w_hh2,
                                 c10::optional<Tensor> w_hr_opt, bool reverse) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our own buffers, inside Function.forward
  const int64_t T = XW.size(0), B = XW.size(1), H = w_hh2.size(0) / 4;
  const bool proj = w_hr_opt.has_value() && w_hr_opt->defined();
  const int64_t P = proj ? w_hr_opt->size(0) : H;
  auto opts = XW.options();
  Tensor G = at::empty({T, B, H}, opts), C = at::empty({T, B, H}, opts);
  Tensor TC = at::empty({T, B, H}, opts), OUT = at::empty({T, B, P}, opts);
  Tensor HH = proj ? at::empty({T, B, H}, opts) : Tensor();
  Tensor whT = w_hh2.t(), wrT = proj ? w_hr_opt->t() : Tensor();
  auto XW_t = XW.unbind(0), OUT_t = OUT.unbind(0);
  std::vector<Tensor> HH_t = proj ? HH.unbind(0) : std::vector<Tensor>();
  Tensor h = h0;
  const int64_t s4 = B * 4 * H, s1 = B * H, grain = cell_grain(H);
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    const int64_t tp = k == 0 ? -1 : (reverse ? t + 1 : t - 1);
    XW_t[t].addmm_(h, whT);
    Tensor& hh = proj ? HH_t[t] : OUT_t[t];
    AT_DISPATCH_FLOATING_TYPES(XW.scalar_type(), "gradscope_lstm_cell_forward", [&] {
      scalar_t* pre = XW.data_ptr<scalar_t>() + t * s4;
      const scalar_t* cp = tp < 0 ? c0.data_ptr<scalar_t>() : C.data_ptr<scalar_t>() + tp * s1;
      scalar_t* g = G.data_ptr<scalar_t>() + t * s1;
      scalar_t* c = C.data_ptr<scalar_t>() + t * s1;
      scalar_t* tc = TC.data_ptr<scalar_t>() + t * s1;
      scalar_t* hp = hh.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { cell_forward(b0, b1, H, pre, cp, g, c, tc, hp); });
    });
    h = proj ? at::mm_out(OUT_t[t], hh, wrT) : hh;
  }
  const int64_t last = reverse ? 0 : T - 1;
  return {OUT, OUT[last].clone(), C[last].clone(), G, C, TC, HH};
}

// One step of the cell's backward, elementwise: from dhh = dL/d(o*tanh c) and the cell gradient
// carried back from the next step, the total dL/dc_t, the four gate gradients and dL/dc_{t-1}'s
// recurrent part (f * dc), all from stored forward values (no transcendental functions).
template <typename T>
static GS_INLINE void cell_backward_body(int64_t b0, int64_t b1, int64_t H, const T* __restrict__ sig,
                                         const T* __restrict__ g, const T* __restrict__ tc,
                                         const T* __restrict__ cp, const T* __restrict__ dhh,
                                         T* __restrict__ dcrec, T* __restrict__ dG, T* __restrict__ dc_out) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict__ s = sig + b * 4 * H;
    T* __restrict__ d = dG + b * 4 * H;
    const int64_t o0 = b * H;
    for (int64_t j = 0; j < H; ++j) {
      const int64_t n = o0 + j;
      const T i = s[j], f = s[H + j], o = s[3 * H + j];
      const T gv = g[n], t = tc[n], dh = dhh[n];
      const T dc = dcrec[n] + dh * o * (T(1) - t * t);
      d[j] = dc * gv * i * (T(1) - i);
      d[H + j] = dc * cp[n] * f * (T(1) - f);
      d[2 * H + j] = dc * i * (T(1) - gv * gv);
      d[3 * H + j] = dh * t * o * (T(1) - o);
      dc_out[n] = dc;
      dcrec[n] = dc * f;
    }
  }
}

GS_CLONES static void cell_backward_f(int64_t b0, int64_t b1, int64_t H, const float* sig, const float* g,
                                      const float* tc, const float* cp, const float* dhh, float* dcrec,
                                      float* dG, float* dc_out) {
  cell_backward_body<float>(b0, b1, H, sig, g, tc, cp, dhh, dcrec, dG, dc_out);
}
GS_CLONES static void cell_backward_d(int64_t b0, int64_t b1, int64_t H, const double* sig, const double* g,
                                      const double* tc, const double* cp, const double* dhh, double* dcrec,
                                      double* dG, double* dc_out) {
  cell_backward_body<double>(b0, b1, H, sig, g, tc, cp, dhh, dcrec, dG, dc_out);
}
static void cell_backward(int64_t b0, int64_t b1, int64_t H, const float* sig, const float* g, const float* tc,
                          const float* cp, const float* dhh, float* dcrec, float* dG, float* dc_out) {
  cell_backward_f(b0, b1, H, sig, g, tc, cp, dhh, dcrec, dG, dc_out);
}
static void cell_backward(int64_t b0, int64_t b1, int64_t H, const double* sig, const double* g,
                          const double* tc, const double* cp, const double* dhh, double* dcrec, double* dG,
                          double* dc_out) {
  cell_backward_d(b0, b1, H, sig, g, tc, cp, dhh, dcrec, dG, dc_out);
}

// The BPTT loop. DH [T, B, P|H] holds dL/dout (plus dL/dh_T at the last position) and receives the
// recurrent part in place, so it ends as the total dL/dh_t; dcrec [B, H] holds dL/dc_T and ends as
// dL/dc_0. SIG [T, B, 4H] are the gates (g block unused), G = tanh(g), C the cells, TC = tanh(C).
// Returns dG [T, B, 4H] (pre-activation gradients), DC [T, B, H] (total dL/dc_t) and dL/dh_0.
std::vector<Tensor> lstm_backward(Tensor DH, Tensor SIG, Tensor G, Tensor C, Tensor TC, Tensor c0,
                                  Tensor w_hh, c10::optional<Tensor> w_hr_opt, Tensor dcrec,
                                  bool reverse) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = SIG.size(0), B = SIG.size(1), H = w_hh.size(0) / 4;
  const bool proj = w_hr_opt.has_value() && w_hr_opt->defined();
  auto opts = SIG.options();
  Tensor dG = at::empty({T, B, 4 * H}, opts), DC = at::empty({T, B, H}, opts);
  Tensor tmp = proj ? at::empty({B, H}, opts) : Tensor();
  Tensor dh0;
  auto DH_t = DH.unbind(0), dG_t = dG.unbind(0);
  const int64_t grain = cell_grain(H);
  for (int64_t k = T - 1; k >= 0; --k) {
    const int64_t t = reverse ? T - 1 - k : k;
    const int64_t tp = k == 0 ? -1 : (reverse ? t + 1 : t - 1);  // position of the previous state
    Tensor dhh = proj ? at::mm_out(tmp, DH_t[t], *w_hr_opt) : DH_t[t];
    AT_DISPATCH_FLOATING_TYPES(SIG.scalar_type(), "gradscope_lstm_cell_backward", [&] {
      const int64_t s4 = B * 4 * H, s1 = B * H;
      const scalar_t* sig = SIG.data_ptr<scalar_t>() + t * s4;
      const scalar_t* g = G.data_ptr<scalar_t>() + t * s1;
      const scalar_t* tc = TC.data_ptr<scalar_t>() + t * s1;
      const scalar_t* cp = tp < 0 ? c0.data_ptr<scalar_t>() : C.data_ptr<scalar_t>() + tp * s1;
      const scalar_t* dh = dhh.data_ptr<scalar_t>();
      scalar_t* dcr = dcrec.data_ptr<scalar_t>();
      scalar_t* dg = dG.data_ptr<scalar_t>() + t * s4;
      scalar_t* dc = DC.data_ptr<scalar_t>() + t * s1;
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        cell_backward(b0, b1, H, sig, g, tc, cp, dh, dcr, dg, dc);
      });
    });
    if (tp >= 0) {
      DH_t[tp].addmm_(dG_t[t], w_hh);
    } else {
      dh0 = at::mm(dG_t[t], w_hh);
    }
  }
  return {dG, DC, dh0};
}

// State-gradient norms without Python in the backward pass: a C++ tensor hook appends the norm of
// the gradient reaching a state (float64) and the state's id to a sink
// that Python empties at the end of the step. Used for user cells' states (two hooks per time step).
struct NormSink {
  std::mutex mu;
  std::vector<double> norms;
  std::vector<int64_t> ids;
};

// Sum of squares in float64 with eight independent partial sums (the compiler vectorises them).
template <typename T>
static double sum_squares(const T* p, int64_t n) {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double v = static_cast<double>(p[i + j]);
      a[j] += v * v;
    }
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  return s + ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// Frobenius norm of a gradient, accumulated in float64 (the precision the recording keeps):
// a plain loop over contiguous float32/float64 CPU memory (no tensor allocated in the backward
// pass), ATen's norm for anything else (strided, expanded, half precisions).
static double grad_norm(const Tensor& g) {
  if (g.device().is_cpu() && g.layout() == at::kStrided && g.is_contiguous()) {
    if (g.scalar_type() == at::kFloat) return std::sqrt(sum_squares(g.data_ptr<float>(), g.numel()));
    if (g.scalar_type() == at::kDouble) return std::sqrt(sum_squares(g.data_ptr<double>(), g.numel()));
  }
  return at::linalg_vector_norm(g, 2, c10::nullopt, false, at::kDouble).item<double>();
}

static unsigned hook_norm(const std::shared_ptr<NormSink>& sink, const Tensor& t, int64_t id) {
  return t.register_hook([sink, id](const at::TensorBase& gb) {
    if (!gb.defined()) return;
    const double n = grad_norm(Tensor(gb).detach());
    std::lock_guard<std::mutex> lock(sink->mu);
    sink->norms.push_back(n);
    sink->ids.push_back(id);
  });
}

// Hooks kept by weak reference to their tensors, removed together (a tensor the user keeps is
// unhooked; one already freed needs nothing). Python holds one per forward pass for its state hooks.
struct HookSet {
  std::vector<std::pair<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>, unsigned>> hooks;

  void keep(const Tensor& t, unsigned pos) {
    hooks.emplace_back(c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()), pos);
  }

  void remove_all() {
    for (auto& entry : hooks) {
      auto impl = entry.first.lock();
      if (impl) {
        Tensor t(std::move(impl));
        t.remove_hook(entry.second);
      }
    }
    hooks.clear();
  }
};

// Hooks on several states at once (ids first_id, first_id + 1, ...): one call per cell call.
void hook_norms(const std::shared_ptr<HookSet>& hs, const std::shared_ptr<NormSink>& sink,
                const std::vector<Tensor>& ts, int64_t first_id) {
  for (size_t k = 0; k < ts.size(); ++k) {
    const Tensor& t = ts[k];
    if (!t.defined() || !t.requires_grad()) continue;
    hs->keep(t, hook_norm(sink, t, first_id + static_cast<int64_t>(k)));
  }
}

void unhook_all(const std::shared_ptr<HookSet>& hs) { hs->remove_all(); }

// A user cell's forward for one scheduled pass (installed as the cell's instance ``forward``):
// calls the cell's own forward, then hooks the states among its outputs with C++ norm hooks, with
// no Python in between. State k of call t gets id first_id + t * 64 + k (Python decodes it).
// Outputs it does not handle (not a tensor or a tuple of tensors, not on the CPU, more than 64
// states) go to ``slow(t, args, kwargs, output)`` in Python.
struct CellTap {
  pybind11::object base;
  pybind11::object slow;
  std::vector<int64_t> idx;  // positions of the states among the outputs
  std::shared_ptr<NormSink> sink;
  std::shared_ptr<HookSet> hooks;
  int64_t first_id = 0;
  int64_t calls = 0;
};

static pybind11::object tap_call(CellTap& tap, pybind11::args args, pybind11::kwargs kwargs) {
  pybind11::object out = tap.base(*args, **kwargs);
  const int64_t t = tap.calls++;
  PyObject* o = out.ptr();
  std::vector<Tensor> outs;
  bool ok = tap.idx.size() <= 64 && tap.hooks && tap.sink;
  if (ok && THPVariable_Check(o)) {
    outs.push_back(THPVariable_Unpack(o));
  } else if (ok && PyTuple_Check(o)) {
    const Py_ssize_t n = PyTuple_GET_SIZE(o);
    for (Py_ssize_t i = 0; i < n && ok; ++i) {
      PyObject* item = PyTuple_GET_ITEM(o, i);
      if (THPVariable_Check(item)) outs.push_back(THPVariable_Unpack(item));
      else ok = false;
    }
  } else {
    ok = false;
  }
  for (size_t k = 0; ok && k < tap.idx.size(); ++k)
    if (tap.idx[k] < static_cast<int64_t>(outs.size()) && !outs[tap.idx[k]].device().is_cpu()) ok = false;
  if (!ok) {
    tap.slow(t, args, kwargs, out);
    return out;
  }
  for (size_t k = 0; k < tap.idx.size(); ++k) {
    const int64_t i = tap.idx[k];
    if (i >= static_cast<int64_t>(outs.size())) continue;
    const Tensor& s = outs[i];
    if (!s.defined() || !s.requires_grad()) continue;
    tap.hooks->keep(s, hook_norm(tap.sink, s, tap.first_id + t * 64 + static_cast<int64_t>(k)));
  }
  return out;
}

// The watched model's forward off schedule, with no Python hook (called by RootForward below,
// which Scope installs as the root module's forward, with the module's previous forward and the
// Python path). A step is one backward call (autograd graph task) that reaches the output of a
// forward pass: each pass with gradients hooks its output tensors with a C++ hook that notes the
// graph task that first reaches it; the next forward counts the distinct tasks noted so far as
// steps, and runs the Python path (``slow(args, kwargs)``, the root hooks' work) when the step is
// scheduled. Scope keeps the same count in Python for passes taken there (Scope._settle).
struct RootRec {
  bool fired = false;
  int64_t task = -1;
  HookSet hooks;
};

struct RootTap {
  int64_t step = 0;          // steps counted so far (Scope reads and writes it)
  int64_t period = 1;        // every * stride: step % period == 0 is scheduled
  int64_t probe_period = 0;  // probe_every (0: none)
  int64_t max_pending = 16;  // forward passes kept waiting for a backward
  bool quiet = false;        // Scope is probing: no pass of its own
  bool closed = false;
  pybind11::object flatten;  // Python: tensors in an output that is not a tensor, tuple or list
  std::mutex mu;
  std::deque<std::shared_ptr<RootRec>> pending;
};

static void unhook_rec(RootRec& r) { r.hooks.remove_all(); }

// Distinct tasks of the fired passes (other than ``current`` when given), which are dropped.
static std::vector<int64_t> take_fired(RootTap& tap, bool has_current, int64_t current) {
  std::lock_guard<std::mutex> lock(tap.mu);
  std::vector<int64_t> tasks;
  std::deque<std::shared_ptr<RootRec>> keep;
  for (auto& r : tap.pending) {
    if (r->fired && !(has_current && r->task == current)) {
      if (std::find(tasks.begin(), tasks.end(), r->task) == tasks.end()) tasks.push_back(r->task);
      unhook_rec(*r);
    } else {
      keep.push_back(r);
    }
  }
  tap.pending.swap(keep);
  return tasks;
}

static void drop_task(RootTap& tap, int64_t task) {
  std::lock_guard<std::mutex> lock(tap.mu);
  std::deque<std::shared_ptr<RootRec>> keep;
  for (auto& r : tap.pending) {
    if (r->fired && r->task == task) unhook_rec(*r);
    else keep.push_back(r);
  }
  tap.pending.swap(keep);
}

static void drop_all(RootTap& tap) {
  std::lock_guard<std::mutex> lock(tap.mu);
  for (auto& r : tap.pending) unhook_rec(*r);
  tap.pending.clear();
}

// Tensors of an output: a tensor, or tuples / lists of them (two levels); false for anything else.
static bool collect(PyObject* o, std::vector<Tensor>& out, int depth) {
  if (THPVariable_Check(o)) {
    out.push_back(THPVariable_Unpack(o));
    return true;
  }
  if (depth < 2 && (PyTuple_Check(o) || PyList_Check(o))) {
    PyObject* seq = o;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
      if (item == Py_None) continue;
      if (!collect(item, out, depth + 1)) return false;
    }
    return true;
  }
  return o == Py_None;
}

// A new reference to ``fn(*args, **kwargs)`` (kwargs may be empty), or a pybind11 error.
static pybind11::object call_obj(PyObject* fn, PyObject* args, PyObject* kwargs) {
  PyObject* r = PyObject_Call(fn, args, kwargs != nullptr && PyDict_GET_SIZE(kwargs) > 0 ? kwargs : nullptr);
  if (r == nullptr) throw pybind11::error_already_set();
  return pybind11::reinterpret_steal<pybind11::object>(r);
}

static pybind11::object root_call(RootTap& tap, PyObject* base, PyObject* slow, PyObject* args, PyObject* kwargs) {
  if (tap.closed || tap.quiet || !at::GradMode::is_enabled()) return call_obj(base, args, kwargs);
  tap.step += static_cast<int64_t>(take_fired(tap, false, 0).size());
  if (tap.step % tap.period == 0 || (tap.probe_period > 0 && tap.step % tap.probe_period == 0)) {
    PyObject* r = PyObject_CallFunctionObjArgs(slow, args, kwargs, nullptr);
    if (r == nullptr) throw pybind11::error_already_set();
    return pybind11::reinterpret_steal<pybind11::object>(r);
  }
  pybind11::object out = call_obj(base, args, kwargs);
  std::vector<Tensor> outs;
  if (!collect(out.ptr(), outs, 0)) {
    outs.clear();
    for (pybind11::handle t : tap.flatten(out)) outs.push_back(THPVariable_Unpack(t.ptr()));
  }
  auto rec = std::make_shared<RootRec>();
  for (const Tensor& t : outs) {
    if (!t.defined() || !t.requires_grad()) continue;
    const unsigned pos = t.register_hook([rec](const at::TensorBase&) {
      if (!rec->fired) {
        rec->task = torch::autograd::get_current_graph_task_id();
        rec->fired = true;
      }
    });
    rec->hooks.keep(t, pos);
  }
  if (rec->hooks.hooks.empty()) return out;
  std::lock_guard<std::mutex> lock(tap.mu);
  tap.pending.push_back(rec);
  while (static_cast<int64_t>(tap.pending.size()) > tap.max_pending) {
    unhook_rec(*tap.pending.front());
    tap.pending.pop_front();
  }
  return out;
}

// ``RootForward(tap, base, slow)``: the watched model's forward as a plain CPython type, so that
// nn.Module's call reaches root_call with no Python frame and no pybind11 dispatch in between
// (each cost ~1.5-3 µs a call, on every step of the watched model). Subclassable: Scope's Python
// subclass adds what copies, pickles and inspect.signature need (no __call__ of its own).
struct RootForwardObject {
  PyObject_HEAD
  PyObject* tap;
  RootTap* ctap;  // the C++ object inside tap (kept alive by it)
  PyObject* base;
  PyObject* slow;
};

static int rf_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  auto* o = reinterpret_cast<RootForwardObject*>(self);
  PyObject *tap = nullptr, *base = nullptr, *slow = nullptr;
  if (kwargs != nullptr && PyDict_GET_SIZE(kwargs) > 0) {
    PyErr_SetString(PyExc_TypeError, "RootForward(tap, base, slow) takes no keyword arguments");
    return -1;
  }
  if (!PyArg_UnpackTuple(args, "RootForward", 3, 3, &tap, &base, &slow)) return -1;
  try {
    o->ctap = &pybind11::handle(tap).cast<RootTap&>();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_TypeError, "RootForward: the first argument must be a RootTap");
    return -1;
  }
  Py_INCREF(tap);
  Py_INCREF(base);
  Py_INCREF(slow);
  Py_XSETREF(o->tap, tap);
  Py_XSETREF(o->base, base);
  Py_XSETREF(o->slow, slow);
  return 0;
}

static PyObject* rf_call(PyObject* self, PyObject* args, PyObject* kwargs) {
  auto* o = reinterpret_cast<RootForwardObject*>(self);
  if (o->ctap == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "RootForward was not initialised");
    return nullptr;
  }
  try {
    return root_call(*o->ctap, o->base, o->slow, args, kwargs).release().ptr();
  } catch (pybind11::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

static int rf_traverse(PyObject* self, visitproc visit, void* arg) {
  auto* o = reinterpret_cast<RootForwardObject*>(self);
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(o->tap);
  Py_VISIT(o->base);
  Py_VISIT(o->slow);
  return 0;
}

static int rf_clear(PyObject* self) {
  auto* o = reinterpret_cast<RootForwardObject*>(self);
  o->ctap = nullptr;
  Py_CLEAR(o->tap);
  Py_CLEAR(o->base);
  Py_CLEAR(o->slow);
  return 0;
}

static void rf_dealloc(PyObject* self) {
  PyTypeObject* tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  rf_clear(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

static PyMemberDef rf_members[] = {
    {const_cast<char*>("tap"), T_OBJECT, offsetof(RootForwardObject, tap), READONLY, nullptr},
    {const_cast<char*>("base"), T_OBJECT, offsetof(RootForwardObject, base), READONLY, nullptr},
    {const_cast<char*>("slow"), T_OBJECT, offsetof(RootForwardObject, slow), READONLY, nullptr},
    {nullptr, 0, 0, 0, nullptr}};

static PyType_Slot rf_slots[] = {
    {Py_tp_init, reinterpret_cast<void*>(rf_init)},
    {Py_tp_new, reinterpret_cast<void*>(PyType_GenericNew)},
    {Py_tp_call, reinterpret_cast<void*>(rf_call)},
    {Py_tp_traverse, reinterpret_cast<void*>(rf_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(rf_clear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(rf_dealloc)},
    {Py_tp_members, rf_members},
    {Py_tp_doc, const_cast<char*>("RootForward(tap, base, slow): the watched model's forward under the root tap")},
    {0, nullptr}};

static PyType_Spec rf_spec = {"gradscope_kernel.RootForward", sizeof(RootForwardObject), 0,
                              Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, rf_slots};

// (norms [n] float64, ids) recorded since the last take; None for no norms.
std::tuple<c10::optional<Tensor>, std::vector<int64_t>> take(const std::shared_ptr<NormSink>& sink) {
  std::lock_guard<std::mutex> lock(sink->mu);
  std::vector<int64_t> ids;
  ids.swap(sink->ids);
  if (sink->norms.empty()) return {c10::nullopt, ids};
  Tensor out = at::empty({static_cast<int64_t>(sink->norms.size())}, at::kDouble);
  std::copy(sink->norms.begin(), sink->norms.end(), out.data_ptr<double>());
  sink->norms.clear();
  return {out, ids};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward, "gradscope LSTM layer forward (CPU)");
  m.def("lstm_backward", &lstm_backward, "gradscope LSTM layer BPTT (CPU)");
  pybind11::class_<NormSink, std::shared_ptr<NormSink>>(m, "NormSink").def(pybind11::init<>());
  pybind11::class_<HookSet, std::shared_ptr<HookSet>>(m, "HookSet").def(pybind11::init<>());
  m.def("hook_norms", &hook_norms, "hook_norm on several states, kept in a HookSet");
  m.def("unhook_all", &unhook_all, "remove every hook of a HookSet");
  m.def("take", &take, "(norms, ids) recorded since the last take");
  pybind11::class_<CellTap, std::shared_ptr<CellTap>>(m, "CellTap")
      .def(pybind11::init([](pybind11::object base, pybind11::object slow, std::vector<int64_t> idx,
                             std::shared_ptr<NormSink> sink) {
        auto tap = std::make_shared<CellTap>();
        tap->base = std::move(base);
        tap->slow = std::move(slow);
        tap->idx = std::move(idx);
        tap->sink = std::move(sink);
        return tap;
      }))
      .def("start", [](CellTap& tap, std::shared_ptr<HookSet> hooks, int64_t first_id) {
        tap.hooks = std::move(hooks);
        tap.first_id = first_id;
        tap.calls = 0;
      }, "begin a pass: hooks go to this HookSet, ids from first_id, calls from 0")
      .def("stop", [](CellTap& tap) { tap.hooks.reset(); }, "end the pass (later calls: slow path)")
      .def_readonly("calls", &CellTap::calls)
      .def_readonly("base", &CellTap::base)
      .def("__call__", &tap_call);
  pybind11::class_<RootTap, std::shared_ptr<RootTap>>(m, "RootTap")
      .def(pybind11::init([](pybind11::object flatten) {
        auto tap = std::make_shared<RootTap>();
        tap->flatten = std::move(flatten);
        return tap;
      }))
      .def_readwrite("step", &RootTap::step)
      .def_readwrite("period", &RootTap::period)
      .def_readwrite("probe_period", &RootTap::probe_period)
      .def_readwrite("max_pending", &RootTap::max_pending)
      .def_readwrite("quiet", &RootTap::quiet)
      .def_readwrite("closed", &RootTap::closed)
      .def_property_readonly("n_pending", [](RootTap& tap) {
        std::lock_guard<std::mutex> lock(tap.mu);
        return tap.pending.size();
      })
      .def("take_fired", [](RootTap& tap, c10::optional<int64_t> current) {
        return take_fired(tap, current.has_value(), current.value_or(0));
      }, "distinct graph tasks of the fired passes (except current), dropping those passes")
      .def("drop_task", &drop_task, "drop the passes a graph task reached (counted by Scope)")
      .def("drop_all", &drop_all, "unhook and drop every waiting pass");
  PyObject* rf_type = PyType_FromSpec(&rf_spec);
  if (rf_type == nullptr) throw pybind11::error_already_set();
  m.add_object("RootForward", pybind11::reinterpret_steal<pybind11::object>(rf_type));
}
"""

# -fno-trapping-math lets the cell passes' clamps and selects vectorise (no FP exception is read).
_CFLAGS = ["-O3", "-fno-trapping-math"]
# The source's and flags' hash names the build, so a change never loads a stale cached library.
NAME = "gradscope_lstm_" + hashlib.sha1((_SOURCE + " ".join(_CFLAGS)).encode()).hexdigest()[:12]

_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_thread: Optional[threading.Thread] = None


def mode() -> str:
    """``auto``, ``sync`` or ``off``, from ``GRADSCOPE_KERNELS`` (unknown values raise)."""
    raw = os.environ.get("GRADSCOPE_KERNELS", "auto").strip().lower()
    if raw in ("", "auto", "1", "on"):
        return "auto"
    if raw in ("0", "off", "no", "false"):
        return "off"
    if raw == "sync":
        return "sync"
    raise GradscopeError(f"GRADSCOPE_KERNELS={raw!r} is not understood; expected auto (default), "
                         "sync or off. Set it to off to use the pure-Python replay only.")


# torch's build lock (a file in the build directory) stays behind when a process dies while it
# builds, and every later load would wait on it forever: one older than this is removed.
_STALE_LOCK_S = 600.0
_EXIT_WAIT_S = 120.0  # longest wait at interpreter exit for a build or load under way
_exit_hook = False


def _clear_stale_lock() -> None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(NAME, False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
            os.remove(lock)
    except Exception:  # private torch helper moved, a race with another process: nothing to do
        pass


def _join_at_exit() -> None:
    """At interpreter exit, wait (bounded) for a background build or load still under way. A
    daemon thread that is inside torch's extension loader when the interpreter finalizes is torn
    down mid-call — the process can abort ("terminate called without an active exception", seen
    in one of eight two-rank torchrun runs that exited seconds after starting a build) — and a
    build cut short leaves torch's lock behind. A load from the cache takes well under a second;
    only a first build (~25 s) makes a script that ends early wait for it."""
    global _exit_hook
    if _exit_hook:
        return
    _exit_hook = True
    import atexit

    def join() -> None:
        th = _thread
        if th is not None and th.is_alive():
            th.join(_EXIT_WAIT_S)

    atexit.register(join)


def _compile():
    global _module, _error
    try:
        from torch.utils.cpp_extension import load_inline

        _clear_stale_lock()
        mod = load_inline(NAME, cpp_sources=[_SOURCE], extra_cflags=_CFLAGS, verbose=False)
    except Exception as e:  # any failure (no compiler, no ninja, ABI): the Python path stays
        msg = str(e).strip().splitlines()
        with _lock:
            _error = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500]
        return
    with _lock:
        _module = mod


def build(wait: bool = True):
    """Build (or load the cached) kernel now. With ``wait``, return the module or raise
    :class:`GradscopeError` saying why it could not be built; without, start a background build
    (if none is running) and return ``None``."""
    global _thread
    with _lock:
        if _module is not None:
            return _module
        if _thread is None:  # one attempt per process; a failure is remembered (see status())
            _thread = threading.Thread(target=_compile, name="gradscope-kernel-build", daemon=True)
            _thread.start()
            _join_at_exit()
        th = _thread
    if not wait:
        return None
    th.join()
    if _module is None:
        raise GradscopeError(f"gradscope's compiled LSTM kernel could not be built ({_error}); the "
                             "pure-Python replay is used instead. It needs a C++ compiler and ninja "
                             "(pip install ninja); set GRADSCOPE_KERNELS=off to stop trying.")
    return _module


def get():
    """The compiled kernel if it is ready, else ``None`` (starting a background build in ``auto``
    mode, building and waiting in ``sync`` mode). Never raises for a failed build."""
    try:
        m = mode()
    except GradscopeError:  # watch() reports a bad value when it starts; never fail a forward pass
        return None
    if m == "off":
        return None
    if _module is not None:
        return _module
    if _error is not None:
        return None
    if m == "sync":
        try:
            return build(wait=True)
        except GradscopeError:
            return None
    build(wait=False)
    return _module


def status() -> str:
    """One line: whether the compiled kernel is in use, being built, off, or failed and why."""
    m = mode()
    if m == "off":
        return "off (GRADSCOPE_KERNELS=off): the pure-Python replay is used"
    if _module is not None:
        return f"ready ({NAME})"
    if _error is not None:
        return f"unavailable: {_error}"
    if _thread is not None and _thread.is_alive():
        return "building in the background; the pure-Python replay runs meanwhile"
    return f"not built yet ({m}: built at the first scheduled step of a watched model)"


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel applies to this input: CPU, float32 or float64."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
