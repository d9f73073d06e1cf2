"""Backend choice: the one dispatch mechanism of attnpool.

A backend is asked for by (first match wins) the ``backend=`` argument of a
module or functional op, the innermost :func:`use_backend` context, the
``ATTNPOOL_BACKEND`` environment variable, or else ``"auto"``. It is resolved
to a concrete backend per call, before any kernel runs, by :func:`resolve`.

This file knows what each backend needs in general (the compiled extension, a CUDA device,
Triton and its interpreter); what a backend of one op cannot serve (shapes, dtypes, level
counts) each op declares in its own file, through :func:`register_limits`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from attnpool import _jit

BACKENDS = ("reference", "cpp", "cuda", "triton")
CHOICES = ("auto",) + BACKENDS

# auto's order of preference per device type (and per op where it differs); the first that
# can serve wins.
# cpu: cpp beats the eager reference at every benchmarked shape, and torch.compile for
#   the cluster and attentional pooling (benchmarks/NOTES.md, benchmarks/results/cpu.csv);
#   the Triton interpreter is a test vehicle, never a speed choice.
# cuda: the faster kernel per op on an H200 (fp32 forward + backward, p50 ms, cuda / triton;
#   benchmarks/results/NVIDIA_H200.csv): attentional pooling 1.56 / 3.90, pyramid 1.60 / 1.81,
#   regulariser 0.33 / 0.53, temporal pool (weighted_pool) 0.55 / 1.38 take cuda; the attention cluster takes
#   triton: 2.42 / 1.40 at B=128, L=25, F=2048, N=64, faster at 6 of its 8 swept shapes (cuda
#   at N=8 and L=8), and by far at long clips, where the cuda kernels' per-unit loops grow
#   with L x N (L=300: 353 / 8.1 ms; benchmarks/NOTES.md).
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
AUTO_ORDER_BY_OP = {("cuda", "attention_cluster"): ("triton", "cuda", "reference")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve the input."""


# ---------------------------------------------------------------- extension
def _load_extension():
    try:
        return importlib.import_module("attnpool._C"), None
    except ImportError as e:  # no compiler at install time, or an isolated build
        missing = e
    try:  # build the CPU kernels now (once; cached), see attnpool/_jit.py
        return _jit.load(), None
    except ImportError as e:
        why = f"attnpool._C is not built ({missing}) and no build on first use ({e})"
    warnings.warn(
        f"attnpool: {why}; the cpp and cuda backends are off, auto uses Triton / reference. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, why


_C, _C_ERROR = _load_extension()


def extension():
    """The compiled module ``attnpool._C``, or None."""
    return _C


def extension_error() -> str | None:
    """Why ``attnpool._C`` is missing (None when it loaded)."""
    return _C_ERROR


# ---------------------------------------------------------------- triton
# Imports happen on first use, which may be inside torch.compile's tracing (a compiled model's
# first call): dynamo cannot trace an import, so the functions that import are marked
# constant-valued (their result never changes once known) and run eagerly at trace time.
_triton_state: list[str | None] = []


@torch.compiler.assume_constant_result
def _triton_error() -> str | None:
    """None if a usable triton is installed, else why not."""
    if not _triton_state:
        try:
            triton = importlib.import_module("triton")
        except ImportError as e:
            _triton_state.append(f"triton is not installed ({e})")
        else:
            major, minor = (int(p) for p in triton.__version__.split(".")[:2])
            too_old = (major, minor) < (3, 2)
            _triton_state.append(f"triton {triton.__version__} < 3.2" if too_old else None)
    return _triton_state[0]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------- choice
_local = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed attnpool calls on backend ``name`` (unless a call names its own)."""
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested(backend: str | None) -> str:
    """The backend asked for: argument, then context, then ATTNPOOL_BACKEND, then auto."""
    source = "backend"
    if backend is None:
        stack = getattr(_local, "stack", None)
        if stack:
            backend = stack[-1]
        else:
            source = "ATTNPOOL_BACKEND"
            backend = os.environ.get(source, "auto") or "auto"
    if backend not in CHOICES:
        raise ValueError(f"{source} must be one of {CHOICES}, got {backend!r}")
    return backend


@dataclass(frozen=True)
class Implementation:
    """One backend's kernels for one op: forward(...) and backward(...)."""

    forward: Callable
    backward: Callable


# op name -> backend -> zero-argument loader of its Implementation
_REGISTRY: dict[str, dict[str, Callable[[], Implementation]]] = {}


def register(op: str, backend: str, loader: Callable[[], Implementation]) -> None:
    _REGISTRY.setdefault(op, {})[backend] = loader


# op name -> limits(backend, device, dtype, **sizes): None if that backend can serve the
# input, else why not (the op's own limits: shapes, dtypes, level counts)
_LIMITS: dict[str, Callable[..., str | None]] = {}


def register_limits(op: str, limits: Callable[..., str | None]) -> None:
    """Declares ``op``'s backend limits: ``limits(backend, device, dtype, **sizes)`` returns None
    where ``backend`` can serve an input of these sizes, else the reason. The sizes are the
    keywords the op passes to :func:`resolve` (and a caller to :func:`available`); a size not
    given is not checked."""
    _LIMITS[op] = limits


_loaded: dict[tuple[str, str], Implementation | str] = {}


def _load(op: str, backend: str) -> Implementation | str:
    """The Implementation, or why it failed to load (cached)."""
    key = (op, backend)
    if key not in _loaded:
        try:
            _loaded[key] = _REGISTRY[op][backend]()
        except (ImportError, AttributeError) as e:
            _loaded[key] = f"{backend} kernels of {op} failed to load ({e})"
    return _loaded[key]


@torch.compiler.assume_constant_result
def _load_error(op: str, backend: str) -> str | None:
    """None if ``backend``'s kernels of ``op`` load, else why not (see _triton_error)."""
    impl = _load(op, backend)
    return impl if isinstance(impl, str) else None


def implementation(op: str, backend: str) -> Implementation:
    impl = _load(op, backend)
    if isinstance(impl, str):
        raise BackendUnavailableError(impl)
    return impl


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype, **sizes) -> str | None:
    """None if ``backend`` can run ``op`` on tensors of this device and dtype (and, where given,
    these sizes: the op's limits), else the reason."""
    if backend == "reference":
        return None
    if backend not in _REGISTRY.get(op, {}):
        return f"{op} has no {backend} implementation"
    limits = _LIMITS.get(op)
    if limits is not None:
        reason = limits(backend, device, dtype, **sizes)
        if reason is not None:
            return reason
    if backend == "cpp":
        if _C is None:
            return _C_ERROR
        if device.type != "cpu":
            return f"cpp runs on CPU tensors, got {device.type}"
    elif backend == "cuda":
        if _C is None:
            return _C_ERROR
        if not getattr(_C, "with_cuda", False):
            return "attnpool._C was built without CUDA"
        if device.type != "cuda":
            return f"cuda runs on CUDA tensors, got {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    elif backend == "triton":
        err = _triton_error()
        if err is not None:
            return err
        if device.type == "cpu":
            if not triton_interpreted():
                return "triton on CPU tensors needs TRITON_INTERPRET=1 set before import"
            if dtype == torch.bfloat16:
                return "the Triton interpreter has no bfloat16"
        elif device.type != "cuda":
            return f"triton runs on CUDA tensors, got {device.type}"
        elif not torch.cuda.is_available():
            return "no CUDA device is visible"
    return _load_error(op, backend)


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype,
            **sizes) -> str:
    """The concrete backend that runs ``op`` on this device, dtype and sizes (the op's limits,
    see :func:`register_limits`); raises if an explicit choice cannot."""
    choice = requested(backend)
    if torch.onnx.is_in_onnx_export():
        # An ONNX model holds no attnpool kernel: under either exporter (dynamo=True or the
        # TorchScript-based one) every op is exported as its reference math, plain torch that
        # becomes standard ONNX operators, which any ONNX runtime runs. The backend only
        # chooses kernels for the same math, so this holds whatever it names.
        return "reference"
    if choice == "auto":
        order = AUTO_ORDER_BY_OP.get((device.type, op)) or AUTO_ORDER.get(device.type,
                                                                         ("reference",))
        for candidate in order:
            if why_not(op, candidate, device, dtype, **sizes) is None:
                return candidate
        return "reference"
    reason = why_not(op, choice, device, dtype, **sizes)
    if reason is None:
        return choice
    reasons = "\n".join(
        f"  {b}: {why_not(op, b, device, dtype, **sizes) or 'available'}" for b in BACKENDS
    )
    raise BackendUnavailableError(
        f"attnpool backend {choice!r} cannot run {op} on {device.type} {dtype}: {reason}\n"
        f"backends for this input:\n{reasons}"
    )


def available(op: str, device: torch.device, dtype: torch.dtype = torch.float32, **sizes) -> dict:
    """{backend: None if it can serve, else why not} for ``op`` on this device and dtype, and
    the sizes given (e.g. ``levels=9`` for pyramid_attention; see each op's ``limits``)."""
    return {b: why_not(op, b, device, dtype, **sizes) for b in BACKENDS}
