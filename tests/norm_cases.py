"""Test data for the synchronized norms of syncnorm.norms, and their single-process
references written here from the papers' formulas with plain torch operations
(nothing from syncnorm), applied to the concatenation of every rank's batch in float64."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

import syncnorm
from syncnorm.transports.base import StatsReducer
from tests.cases import tolerance

KINDS = ("batch_instance", "switchable", "mean_only", "conditional_index", "conditional_vector")

LAYERS = {
    "batch_instance": syncnorm.SyncBatchInstanceNorm2d,
    "switchable": syncnorm.SyncSwitchableNorm2d,
    "mean_only": syncnorm.SyncMeanOnlyBatchNorm2d,
    "conditional_index": syncnorm.SyncConditionalBatchNorm2d,
    "conditional_vector": syncnorm.SyncConditionalBatchNorm2d,
}

EPS = 1e-5


@dataclass(frozen=True)
class NormCase:
    """One equivalence case: a layer kind, per-rank batch sizes, precision and options."""

    kind: str
    sizes: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    channels: int = 3
    spatial: tuple[int, int] = (3, 4)
    momentum: float | None = 0.1
    track_running_stats: bool = True
    num_conditions: int = 4
    steps: int = 2
    seed: int = 0
    channels_last: bool = False
    primitive: str = "auto"

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def conditional(self) -> bool:
        return self.kind.startswith("conditional")

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _split(self, t: Tensor) -> list[Tensor]:
        parts = list(torch.split(t, list(self.sizes)))
        if self.channels_last and t.dim() == 4:
            parts = [p.contiguous(memory_format=torch.channels_last) for p in parts]
        return parts

    def batches(self, step: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        x = torch.randn(sum(self.sizes), self.channels, *self.spatial, generator=g, dtype=torch.float64)
        # channel offsets and scales, so batch and instance statistics differ visibly
        offsets = torch.linspace(-1.0, 2.0, self.channels, dtype=torch.float64).view(1, -1, 1, 1)
        return self._split((x * 1.5 + offsets).to(self.dtype))

    def upstream(self, step: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1000 + step + 500)
        dy = torch.randn(sum(self.sizes), self.channels, *self.spatial, generator=g, dtype=torch.float64)
        return self._split(dy.to(self.dtype))

    def conditions(self, step: int) -> list[Tensor] | None:
        if not self.conditional:
            return None
        g = torch.Generator().manual_seed(self.seed * 1000 + step + 900)
        n = sum(self.sizes)
        if self.kind == "conditional_index":
            c = torch.randint(0, self.num_conditions, (n,), generator=g)
        else:
            c = torch.randn(n, self.num_conditions, generator=g, dtype=torch.float64).to(self.param_dtype)
        return list(torch.split(c, list(self.sizes)))

    EVAL_STEP = 99

    def initial_params(self) -> dict[str, Tensor]:
        """Non-trivial starting values for every parameter of the kind, in float64."""
        g = torch.Generator().manual_seed(self.seed + 7)
        c, k = self.channels, self.num_conditions

        def uniform(*shape: int, low: float = 0.5, high: float = 1.5) -> Tensor:
            return torch.rand(*shape, generator=g, dtype=torch.float64) * (high - low) + low

        def normal(*shape: int, scale: float = 1.0) -> Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

        if self.kind == "mean_only":
            return {"bias": normal(c)}
        params = {"weight": uniform(c), "bias": normal(c)}
        if self.kind == "batch_instance":
            params["rho"] = uniform(c, low=0.0, high=1.0)
        elif self.kind == "switchable":
            params["mean_weight"] = normal(3)
            params["var_weight"] = normal(3)
        else:
            params["weight_delta"] = normal(k, c, scale=0.3)
            params["bias_delta"] = normal(k, c, scale=0.3)
        return params


@dataclass
class NormTrace:
    """What a layer did over a case: per step outputs and gradients, then buffers and eval."""

    outputs: list[Tensor] = field(default_factory=list)
    input_grads: list[Tensor] = field(default_factory=list)
    param_grads: list[dict[str, Tensor]] = field(default_factory=list)
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_batches_tracked: int = 0
    eval_output: Tensor | None = None


# -- the thing under test --------------------------------------------------------


def build_layer(case: NormCase, reducer: StatsReducer | None = None) -> torch.nn.Module:
    """The syncnorm layer of ``case``, with ``case.initial_params()`` loaded."""
    cls = LAYERS[case.kind]
    kwargs: dict = {"momentum": case.momentum, "track_running_stats": case.track_running_stats}
    if case.conditional:
        kwargs["num_conditions"] = case.num_conditions
    layer = cls(case.channels, reducer=reducer, dtype=case.param_dtype, **kwargs)
    with torch.no_grad():
        for name, value in case.initial_params().items():
            getattr(layer, name).copy_(value)
    return layer


def run_layer(layer: torch.nn.Module, case: NormCase, rank: int) -> NormTrace:
    """Run a syncnorm layer on rank ``rank``'s batches of ``case``."""
    trace = NormTrace()
    layer.train()
    for step in range(case.steps):
        x = case.batches(step)[rank].clone().requires_grad_(True)
        for p in layer.parameters():
            p.grad = None
        conditions = case.conditions(step)
        y = layer(x) if conditions is None else layer(x, conditions[rank])
        y.backward(case.upstream(step)[rank])
        trace.outputs.append(y.detach())
        trace.input_grads.append(x.grad)
        trace.param_grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    if layer.running_mean is not None:
        trace.running_mean = layer.running_mean.clone()
        trace.running_var = None if layer.running_var is None else layer.running_var.clone()
        trace.num_batches_tracked = int(layer.num_batches_tracked)
    layer.eval()
    with torch.no_grad():
        x = case.batches(case.EVAL_STEP)[rank]
        conditions = case.conditions(case.EVAL_STEP)
        trace.eval_output = layer(x) if conditions is None else layer(x, conditions[rank])
    return trace


# -- the papers' formulas --------------------------------------------------------


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class PaperReference:
    """A case's layer written from its paper, with its own float64 parameters and buffers."""

    def __init__(self, case: NormCase) -> None:
        self.case = case
        self.params = {k: v.clone().requires_grad_(True) for k, v in case.initial_params().items()}
        c = case.channels
        tracked = case.track_running_stats
        self.running_mean = torch.zeros(c, dtype=torch.float64) if tracked else None
        self.running_var = (
            torch.ones(c, dtype=torch.float64) if tracked and case.kind != "mean_only" else None
        )
        self.num_batches_tracked = 0

    def batch_stats(self, x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """Per channel over (N, H, W), biased variance; the running statistics in eval."""
        if not training and self.running_mean is not None:
            var = self.running_var if self.running_var is not None else torch.ones_like(self.running_mean)
            return self.running_mean, var
        if self.case.kind == "switchable":  # the paper derives them from the instance statistics
            mu_in, var_in = self.instance_stats(x)
            mean = mu_in.mean(0)
            var = (var_in + mu_in**2).mean(0) - mean**2
        else:
            mean = x.mean(dim=(0, 2, 3))
            var = ((x - _per_channel(mean)) ** 2).mean(dim=(0, 2, 3))
        if training and self.running_mean is not None:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            m = self.case.momentum if self.case.momentum is not None else 1 / (self.num_batches_tracked + 1)
            with torch.no_grad():
                self.running_mean = (1 - m) * self.running_mean + m * mean
                if self.running_var is not None:
                    self.running_var = (1 - m) * self.running_var + m * var * n / (n - 1)
            self.num_batches_tracked += 1
        return mean, var

    @staticmethod
    def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample and channel over (H, W), biased variance; shapes (N, C)."""
        mean = x.mean(dim=(2, 3))
        var = ((x - mean[:, :, None, None]) ** 2).mean(dim=(2, 3))
        return mean, var

    def __call__(self, x: Tensor, condition: Tensor | None, training: bool) -> Tensor:
        p = self.params
        kind = self.case.kind
        mean_b, var_b = self.batch_stats(x, training)
        if kind == "mean_only":  # Salimans & Kingma: subtract the batch mean, add a bias
            return x - _per_channel(mean_b) + _per_channel(p["bias"])
        if kind == "batch_instance":  # Nam & Kim: rho * BN + (1 - rho) * IN, then gamma, beta
            x_bn = (x - _per_channel(mean_b)) / torch.sqrt(_per_channel(var_b) + EPS)
            mu_in, var_in = self.instance_stats(x)
            x_in = (x - mu_in[:, :, None, None]) / torch.sqrt(var_in[:, :, None, None] + EPS)
            rho = _per_channel(p["rho"])
            return (rho * x_bn + (1 - rho) * x_in) * _per_channel(p["weight"]) + _per_channel(p["bias"])
        if kind == "switchable":  # Luo et al.: softmax-weighted IN, LN, BN statistics
            mu_in, var_in = self.instance_stats(x)
            mu_ln = mu_in.mean(1, keepdim=True)
            var_ln = (var_in + mu_in**2).mean(1, keepdim=True) - mu_ln**2
            w = torch.softmax(p["mean_weight"], 0)
            v = torch.softmax(p["var_weight"], 0)
            mean = w[0] * mu_in + w[1] * mu_ln + w[2] * mean_b[None, :]
            var = v[0] * var_in + v[1] * var_ln + v[2] * var_b[None, :]
            x_hat = (x - mean[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + EPS)
            return x_hat * _per_channel(p["weight"]) + _per_channel(p["bias"])
        # conditional batch norm: gamma, beta = base + a learned map of the condition
        assert condition is not None
        x_bn = (x - _per_channel(mean_b)) / torch.sqrt(_per_channel(var_b) + EPS)
        if kind == "conditional_index":
            gamma = p["weight"] + p["weight_delta"][condition]
            beta = p["bias"] + p["bias_delta"][condition]
        else:
            gamma = p["weight"] + condition.double() @ p["weight_delta"]
            beta = p["bias"] + condition.double() @ p["bias_delta"]
        return x_bn * gamma[:, :, None, None] + beta[:, :, None, None]


def run_reference(case: NormCase) -> NormTrace:
    """The paper's layer on the concatenation of every rank's batches, in float64."""
    ref = PaperReference(case)
    trace = NormTrace()

    def whole(parts: list[Tensor] | None) -> Tensor | None:
        if parts is None:
            return None
        joined = torch.cat(parts)
        return joined.double() if joined.is_floating_point() else joined

    for step in range(case.steps):
        x = whole(case.batches(step)).requires_grad_(True)
        for p in ref.params.values():
            p.grad = None
        y = ref(x, whole(case.conditions(step)), training=True)
        y.backward(whole(case.upstream(step)))
        trace.outputs.append(y.detach())
        trace.input_grads.append(x.grad)
        trace.param_grads.append({n: p.grad.clone() for n, p in ref.params.items()})
    trace.running_mean, trace.running_var = ref.running_mean, ref.running_var
    trace.num_batches_tracked = ref.num_batches_tracked if ref.running_mean is not None else 0
    with torch.no_grad():
        x = whole(case.batches(case.EVAL_STEP))
        trace.eval_output = ref(x, whole(case.conditions(case.EVAL_STEP)), training=False)
    return trace


def assert_matches_reference(traces: list[NormTrace], reference: NormTrace, case: NormCase) -> None:
    """Each rank's slice of outputs and input grads equals the reference's slice; parameter
    grads summed over ranks equal the reference's; buffers are equal; eval outputs too."""
    tol = tolerance(case.dtype)
    param_tol = tol if case.dtype in (torch.float64, torch.float32) else {"rtol": 1e-4, "atol": 1e-4}
    bounds = [0]
    for n in case.sizes:
        bounds.append(bounds[-1] + n)

    def close(actual: Tensor, expected: Tensor, what: str, **t: float) -> None:
        torch.testing.assert_close(actual, expected.to(actual.dtype), msg=lambda m: f"{what}: {m}", **t)

    for step in range(case.steps):
        for rank, t in enumerate(traces):
            lo, hi = bounds[rank], bounds[rank + 1]
            assert t.outputs[step].dtype == case.dtype
            assert t.outputs[step].shape == reference.outputs[step][lo:hi].shape
            close(t.outputs[step], reference.outputs[step][lo:hi], f"rank {rank} step {step} output", **tol)
            close(
                t.input_grads[step], reference.input_grads[step][lo:hi], f"rank {rank} step {step} dx", **tol
            )
            if case.channels_last:
                assert t.outputs[step].is_contiguous(memory_format=torch.channels_last)
        for name, expected in reference.param_grads[step].items():
            summed = torch.stack([t.param_grads[step][name] for t in traces]).sum(0)
            close(summed, expected, f"step {step} grad of {name} summed over ranks", **param_tol)
        assert set(traces[0].param_grads[step]) == set(reference.param_grads[step])
    buffer_tol = tol if case.dtype in (torch.float64, torch.float32) else {"rtol": 1e-5, "atol": 1e-5}
    for rank, t in enumerate(traces):
        if reference.running_mean is not None:
            close(t.running_mean, reference.running_mean, f"rank {rank} running_mean", **buffer_tol)
            if reference.running_var is None:
                assert t.running_var is None
            else:
                close(t.running_var, reference.running_var, f"rank {rank} running_var", **buffer_tol)
        else:
            assert t.running_mean is None
        assert t.num_batches_tracked == reference.num_batches_tracked
        lo, hi = bounds[rank], bounds[rank + 1]
        close(t.eval_output, reference.eval_output[lo:hi], f"rank {rank} eval output", **tol)
