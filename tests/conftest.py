"""Shared test settings. GRADSCOPE_TEST_DEVICE=cuda runs the device-agnostic tests on a GPU."""
import os
import sys
import warnings

import pytest
import torch

DEVICE = torch.device(os.environ.get("GRADSCOPE_TEST_DEVICE", "cpu"))

if DEVICE.type == "cuda":
    # Float32 comparisons against references assume IEEE float32 products: no TF32 in cuBLAS
    # matmuls or cuDNN (convolutions and fused RNNs).
    with warnings.catch_warnings():  # newer torch may call these flags legacy; they still work
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # Start CUDA, cuBLAS and the autograd engine's device thread here, once per process: else
        # the first test whose first matrix product runs inside a backward pass meets torch's
        # one-time "Attempting to run cuBLAS, but there was no current CUDA context!" warning,
        # which filterwarnings = error turns into a failure of whichever test comes first.
        _w = torch.ones(2, 2, device=DEVICE, requires_grad=True)
        (_w @ _w).sum().backward()
        torch.cuda.synchronize(DEVICE)
        del _w

# CI (CI=true) replays the same hypothesis examples every run, so a green main stays green; locally
# each run explores new ones.
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        _hsettings.load_profile("ci")
except ImportError:  # hypothesis is a dev extra
    pass

# The suite's tensors are tiny: one intra-op thread avoids oneDNN's thread pool fighting for the
# cores (a 3-layer LSTM forward measured 0.85 s with 2 threads on a busy 2-core machine, 3 ms with 1).
torch.set_num_threads(1)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _close_figures():
    """Close every matplotlib figure a test left open (only if pyplot was imported at all)."""
    yield
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


@pytest.fixture
def review_dir(tmp_path):
    """Where picture tests write PNGs: ``$GRADSCOPE_REVIEW_DIR`` (to look at them) or a temp folder."""
    d = os.environ.get("GRADSCOPE_REVIEW_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        return d
    return str(tmp_path)


def assert_no_hooks(model: torch.nn.Module) -> None:
    """No module of ``model`` carries a gradscope hook or patched forward."""
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"{name!r} still has forward hooks"
        assert not m._forward_pre_hooks, f"{name!r} still has forward pre-hooks"
        assert not m._backward_hooks, f"{name!r} still has backward hooks"
        assert "forward" not in m.__dict__, f"{name!r} still has a patched forward"
    for name, p in model.named_parameters():
        # None, not an empty dict: an emptied dict keeps torch's Python hook wrapper on the
        # parameter, which then enters Python in every backward pass
        assert p._backward_hooks is None, f"parameter {name!r} still has tensor hooks ({p._backward_hooks!r})"
