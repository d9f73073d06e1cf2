"""The suite every op inherits: a test file subclasses :class:`OpSuite` (as ``Test<Name>Suite``),
says how to make inputs and how to call the op, and gets, for the reference and every kernel
backend available here:

* parity with the float64 reference, outputs and every gradient, in float32 and float64
  (tolerances of tests/helpers.py: fp32 ≤ 1e-5 relative, fp16 / bf16 twice the reference's
  own error);
* float64 ``gradcheck``;
* the op and its backward op registered as ``attnpool::<name>`` / ``<name>_backward``, with
  the backend as the last argument, and the kernels in the backend registry under the name;
  an eager forward + backward runs both ops where a dispatch mode sees them;
* determinism: the same input twice gives bitwise the same outputs and gradients;
* autocast: under CPU bf16 autocast the outputs are bf16;
* empty batch: B = 0 gives the reference's (empty) outputs, and a backward;
* bad input: a non-Tensor first input raises TypeError, a dtype mix raises TypeError.

The op's own file adds what is particular to it (opcheck of its ops with their argument
variants, layouts, NaN handling, its module's API). tests/test_transforms.py runs every op
under the tracers and transforms (torch.compile with changing sizes, jit.trace, ONNX,
torch.func, thread counts).

The ``backend`` argument of the suite's tests is parametrized by tests/conftest.py
(``pytest_generate_tests``) with ``"reference"`` and :meth:`OpSuite.kernel_backends`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from helpers import assert_close, backends_for, torch_ops
from torch import Tensor

from attnpool import backends


class OpSuite:
    """Base of every op's suite. Subclasses set :attr:`op` and implement :meth:`inputs` and
    :meth:`call`."""

    op: str = ""        # the canonical name: attnpool::<op>, the registry key, the file stems
    batch: int = 3      # B of the default case
    # {index of an output or gradient (outputs first, then the floating inputs' gradients):
    #  the magnitude it is computed from}, for results that are 0 in exact arithmetic, where
    # the reference's rounding residue would otherwise count as the scale (helpers.assert_close)
    scale_floors: dict = {}

    # ---------------------------------------------------------------- what an op provides
    def inputs(self, B: int, seed: int) -> list[Tensor]:
        """The op's float64 inputs for batch size B (the floating ones get gradients)."""
        raise NotImplementedError

    def call(self, backend: str, *inputs: Tensor) -> Sequence[Tensor]:
        """The op's functional form on ``inputs`` with ``backend``; its outputs, as a tuple."""
        raise NotImplementedError

    @classmethod
    def kernel_backends(cls) -> list[str]:
        return backends_for(cls.op, "cpu", torch.float64)

    # ---------------------------------------------------------------- helpers
    def _outputs(self, backend, inputs):
        out = self.call(backend, *inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _run(self, backend: str, dtype: torch.dtype, B: int | None = None, seed: int = 0):
        """Outputs and gradients of every floating input, for fixed random output gradients."""
        B = self.batch if B is None else B
        inputs = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t
                  for t in self.inputs(B, seed)]
        outs = self._outputs(backend, inputs)
        g = torch.Generator().manual_seed(seed + 1)
        grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
                     for o in outs]
        wrt = [t for t in inputs if t.requires_grad]
        diff = [(o, go) for o, go in zip(outs, grads_out) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], wrt, [go for _, go in diff],
                                    allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(wrt, grads)]
        return [o.detach() for o in outs] + list(grads)

    # ---------------------------------------------------------------- the suite
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_suite_matches_float64_reference(self, backend, dtype):
        ref = self._run("reference", torch.float64, seed=1)
        ref_lowp = self._run("reference", dtype, seed=1)
        got = self._run(backend, dtype, seed=1)
        assert len(got) == len(ref)
        for i, (a, r, rl) in enumerate(zip(got, ref, ref_lowp)):
            assert a.dtype == dtype, f"{self.op}/{backend}: output {i} has dtype {a.dtype}"
            assert_close(a, r, f"{self.op}/{backend}/{i}", rl, self.scale_floors.get(i, 0.0))

    def test_suite_gradcheck(self, backend):
        inputs = [t.detach().requires_grad_() if t.is_floating_point() else t
                  for t in self.inputs(2, seed=2)]

        def fn(*args):
            return self._outputs(backend, args)

        assert torch.autograd.gradcheck(fn, tuple(inputs))

    def test_suite_registered(self, backend):
        # the compiled kernels registered in C++, the Triton ones from Python, one schema
        if backend == "reference":
            return
        for name in (self.op, f"{self.op}_backward"):
            schema = getattr(torch_ops(backend), name).default._schema
            assert schema.arguments[-1].name == "backend", f"{name}: {schema}"
            if backend == "triton" and backends.extension() is not None:
                compiled = str(getattr(torch.ops.attnpool, name).default._schema)
                assert str(schema).replace("_triton(", "(", 1) == compiled, f"{schema}, {compiled}"
        if backend != "reference":
            assert backend in backends._REGISTRY[self.op]

    def test_suite_eager_call_runs_the_ops(self, backend):
        # plain eager calls take a shortcut around torch.library's autograd (attnpool/_ops.py),
        # but the ops themselves still run, where a dispatch mode sees them
        if backend == "reference":
            return
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(func._schema.name)
                return func(*args, **(kwargs or {}))

        inputs = [t.detach().requires_grad_() if t.is_floating_point() else t
                  for t in self.inputs(2, seed=6)]
        with Record():
            outs = [o for o in self._outputs(backend, inputs) if o.requires_grad]
            sum(o.sum() for o in outs).backward()
        forward = getattr(torch_ops(backend), self.op).default._schema.name
        assert forward in seen, f"{forward} not run: {seen}"
        # the backward op of the backend, or a variant of it (the cluster's fused fc1 CPU
        # backward)
        suffix = "_triton" if backend == "triton" else ""
        assert any(name.startswith(f"attnpool::{self.op}") and name.endswith(f"backward{suffix}")
                   for name in seen), f"no {backend} backward op of {self.op} run: {seen}"
        # and through the shortcut, not torch.library's autograd
        nodes, seen_nodes, names = [o.grad_fn for o in outs], set(), set()
        while nodes:
            node = nodes.pop()
            if node is not None and node not in seen_nodes:
                seen_nodes.add(node)
                names.add(type(node).__name__)
                nodes.extend(f for f, _ in node.next_functions)
        assert f"{self.op}_eagerBackward" in names, f"{self.op}: the graph holds {names}"

    def test_suite_deterministic(self, backend):
        a = self._run(backend, torch.float32, seed=3)
        b = self._run(backend, torch.float32, seed=3)
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), f"{self.op}/{backend}: {i} differs"

    def test_suite_autocast_cpu_bf16(self, backend):
        if backend == "triton":
            pytest.skip("the Triton interpreter has no bfloat16")
        inputs = [t.float() if t.is_floating_point() else t for t in self.inputs(2, seed=4)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = self._outputs(backend, inputs)
        for o in outs:
            assert o.dtype == torch.bfloat16, f"{self.op}/{backend}: {o.dtype}"

    def test_suite_empty_batch(self, backend):
        ref = self._outputs("reference", self.inputs(0, seed=5))
        inputs = [t.detach().requires_grad_() if t.is_floating_point() else t
                  for t in self.inputs(0, seed=5)]
        outs = self._outputs(backend, inputs)
        for i, (o, r) in enumerate(zip(outs, ref, strict=True)):
            assert_close(o.detach(), r, f"{self.op}/{backend}/{i}")  # shapes, NaN (a mean of none)
        total = sum(o.sum() for o in outs if o.requires_grad and o.numel() == 0)
        if isinstance(total, Tensor):
            total.backward()
        for t in inputs:
            if t.requires_grad and t.grad is not None:
                assert t.grad.shape == t.shape

    def test_suite_bad_input(self, backend):
        inputs = self.inputs(2, seed=6)
        with pytest.raises(TypeError):
            self.call(backend, inputs[0].tolist(), *inputs[1:])
        floats = [i for i, t in enumerate(inputs) if t.is_floating_point()]
        if len(floats) > 1:  # one input in another dtype than the others
            mixed = list(inputs)
            mixed[floats[-1]] = mixed[floats[-1]].float()
            with pytest.raises(TypeError, match="dtype"):
                self.call(backend, *mixed)
