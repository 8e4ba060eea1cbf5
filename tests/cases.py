"""Shared test data and the single-process reference: torch's BatchNorm on the
concatenation of every rank's batch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


@dataclass(frozen=True)
class Case:
    """One equivalence case: per-rank batch sizes and the layer's configuration."""

    sizes: tuple[int, ...]
    spatial: tuple[int, ...] = (3, 3)
    channels: int = 4
    dtype: torch.dtype = torch.float64
    affine: bool = True
    momentum: float | None = 0.1
    track_running_stats: bool = True
    primitive: str = "auto"
    channels_last: bool = False
    seed: int = 0
    steps: int = 2
    layer_kwargs: dict = field(default_factory=dict)

    @property
    def half(self) -> bool:
        """Half-precision input; the layer's parameters and the reference stay fp32."""
        return self.dtype in (torch.bfloat16, torch.float16)

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    def batches(self, step: int) -> list[Tensor]:
        """Each rank's input at ``step`` (identical on every process)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        shape = (sum(self.sizes), self.channels, *self.spatial)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5
        x = x.to(self.dtype)
        return [self._format(p) for p in torch.split(x, list(self.sizes))]

    def upstream(self, step: int) -> list[Tensor]:
        """Each rank's gradient w.r.t. the layer's output at ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1000 + step + 500)
        shape = (sum(self.sizes), self.channels, *self.spatial)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(self.dtype)
        return [self._format(p) for p in torch.split(dy, list(self.sizes))]

    def eval_batches(self) -> list[Tensor]:
        return self.batches(step=99)

    def params(self) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed + 7)
        return (
            torch.rand(self.channels, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(self.channels, generator=g, dtype=torch.float64),
        )

    def _format(self, t: Tensor) -> Tensor:
        if not self.channels_last:
            return t
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)


@dataclass
class Trace:
    """What a layer did over a case: per step outputs and gradients, then buffers and eval."""

    outputs: list[Tensor] = field(default_factory=list)
    input_grads: list[Tensor] = field(default_factory=list)
    weight_grads: list[Tensor] = field(default_factory=list)
    bias_grads: list[Tensor] = field(default_factory=list)
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_batches_tracked: int = 0
    eval_output: Tensor | None = None


def run_layer(layer: torch.nn.Module, case: Case, pick: int | None) -> Trace:
    """Run ``layer`` over ``case``: on rank ``pick``'s batches, or on the
    concatenation of all of them when ``pick`` is None (the reference)."""

    def take(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts) if pick is None else parts[pick]

    trace = Trace()
    if case.affine:
        weight, bias = case.params()
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.copy_(bias)
    layer.train()
    for step in range(case.steps):
        x = take(case.batches(step)).clone().requires_grad_(True)
        if case.affine:
            layer.weight.grad = None
            if layer.bias is not None:
                layer.bias.grad = None
        y = layer(x)
        y.backward(take(case.upstream(step)))
        trace.outputs.append(y.detach())
        trace.input_grads.append(x.grad)
        if case.affine:
            trace.weight_grads.append(layer.weight.grad.clone())
            if layer.bias is not None:
                trace.bias_grads.append(layer.bias.grad.clone())
    if layer.running_mean is not None:
        trace.running_mean = layer.running_mean.clone()
        trace.running_var = layer.running_var.clone()
        trace.num_batches_tracked = int(layer.num_batches_tracked)
    layer.eval()
    with torch.no_grad():
        trace.eval_output = layer(take(case.eval_batches()))
    return trace


def reference_layer(case: Case) -> torch.nn.Module:
    ndim = 2 + len(case.spatial)
    return TORCH_BN[ndim](
        case.channels, momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats, dtype=torch.float32 if case.half else case.dtype,
        **case.layer_kwargs,
    )  # fmt: skip


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: {"rtol": 1e-10, "atol": 1e-10},
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    }[dtype]


def assert_matches_reference(traces: list[Trace], reference: Trace, case: Case) -> None:
    """Each rank's slice of outputs and input grads equals the reference's slice;
    parameter grads summed over ranks equal the reference's; buffers are equal."""
    tol = tolerance(case.dtype)
    bounds = [0]
    for n in case.sizes:
        bounds.append(bounds[-1] + n)
    for step in range(case.steps):
        for rank, t in enumerate(traces):
            lo, hi = bounds[rank], bounds[rank + 1]
            ref_y = reference.outputs[step][lo:hi]
            ref_dx = reference.input_grads[step][lo:hi]
            assert t.outputs[step].shape == ref_y.shape
            assert t.outputs[step].dtype == case.dtype
            torch.testing.assert_close(t.outputs[step], ref_y.to(case.dtype), **tol)
            torch.testing.assert_close(t.input_grads[step], ref_dx.to(case.dtype), **tol)
        if case.affine:
            param_tol = tol if not case.half else {"rtol": 1e-4, "atol": 1e-4}
            summed_w = torch.stack([t.weight_grads[step] for t in traces]).sum(0)
            torch.testing.assert_close(summed_w, reference.weight_grads[step], **param_tol)
            if reference.bias_grads:
                summed_b = torch.stack([t.bias_grads[step] for t in traces]).sum(0)
                torch.testing.assert_close(summed_b, reference.bias_grads[step], **param_tol)
    buffer_tol = tol if not case.half else {"rtol": 1e-5, "atol": 1e-5}
    for rank, t in enumerate(traces):
        if reference.running_mean is not None:
            torch.testing.assert_close(t.running_mean, reference.running_mean, **buffer_tol)
            torch.testing.assert_close(t.running_var, reference.running_var, **buffer_tol)
            assert t.num_batches_tracked == reference.num_batches_tracked
        lo, hi = case.sizes[:rank], case.sizes[: rank + 1]
        ref_eval = reference.eval_output[sum(lo) : sum(hi)]
        torch.testing.assert_close(t.eval_output, ref_eval.to(case.dtype), **tol)


def printed_accuracy(stdout: str) -> float:
    """The ``test accuracy: 0.xxx`` line that ``syncnorm train`` prints on rank 0."""
    match = re.search(r"^test accuracy: (\d\.\d{3})$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))
