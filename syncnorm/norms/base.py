"""What the synchronized batch-dependent norms share: a batch branch over the global
batch, its running statistics, and how a layer picks its transport.

A layer here decides (train or eval? synchronized or local?) and computes its
own per-sample branches with plain autograd; the batch branch is
:func:`syncnorm.batch_moments.global_batch_moments`, one collective per direction.
The transport is chosen as :class:`syncnorm.SyncBatchNorm` chooses it: an
explicit ``reducer``, else the torch.distributed group (``process_group``, default
the whole world) when it has more than one rank, else the local batch alone
through the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.batch_moments import LOCAL, global_batch_moments, update_running_mean
from syncnorm.function import compute_dtype
from syncnorm.moments import update_running_stats
from syncnorm.transports.base import LayerKey, StatsReducer
from syncnorm.transports.torch_distributed import default_reducer


@dataclass(frozen=True)
class NormLayerKey(LayerKey):
    """A :class:`~syncnorm.transports.LayerKey` that names the layer's class in messages."""

    kind: str = "SyncBatchNorm"

    def describe(self) -> str:
        label = repr(self.name) if self.name else "<unnamed; see syncnorm.name_layers>"
        return f"{self.kind} layer {label} (num_features={self.num_features})"


def channel_view(v: Tensor) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast over ``(N, C, H, W)``."""
    return v.view(1, -1, 1, 1)


class BatchBranchNorm(nn.Module):
    """Base of the layers in :mod:`syncnorm.norms`: holds the batch branch.

    Subclasses compute their output from :meth:`batch_statistics` (global batch
    mean and biased variance, or the running statistics in eval) and whatever
    per-sample statistics their formula needs.

    Running statistics, when ``track_running_stats``, are torch's: ``running_mean``
    and ``running_var`` (the *unbiased* variance of the global batch) updated
    with ``momentum`` (``None``: cumulative average), ``num_batches_tracked``
    counting training calls; identical on every worker.
    """

    tracks_variance = True
    """Whether the layer keeps ``running_var`` (mean-only batch norm does not)."""

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        track_running_stats: bool,
        process_group: Any | None,
        reducer: StatsReducer | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        self.reducer = reducer
        self.layer_name = ""
        self._layer_key: NormLayerKey | None = None
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            if self.tracks_variance:
                self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            if self.tracks_variance:
                self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        if not self.tracks_variance:
            self.running_var = None  # a plain attribute, not a buffer: no state_dict entry

    def register_affine(self, affine: bool, weight: bool = True, **factory: Any) -> None:
        """``weight`` (ones) and ``bias`` (zeros) per channel when ``affine``, else ``None``;
        ``weight=False`` registers the bias only (mean-only batch norm has no scale)."""
        self.affine = affine
        for name, init, wanted in (("weight", torch.ones, weight), ("bias", torch.zeros, True)):
            if affine and wanted:
                self.register_parameter(name, nn.Parameter(init(self.num_features, **factory)))
            elif wanted:
                self.register_parameter(name, None)

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            self.running_mean.zero_()
            if self.running_var is not None:
                self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._layer_key = None  # a copy is a different layer to the transports

    @property
    def layer_key(self) -> NormLayerKey:
        """How transports identify this layer; follows ``layer_name``."""
        if self._layer_key is None or self._layer_key.name != self.layer_name:
            self._layer_key = NormLayerKey(self.layer_name, self.num_features, kind=type(self).__name__)
        return self._layer_key

    def active_reducer(self) -> StatsReducer | None:
        """The transport a training call would use now; ``None`` means the local batch only."""
        if self.reducer is not None:
            return self.reducer
        return default_reducer(self.process_group)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, C, H, W)`` with this layer's C."""
        if x.dim() != 4:
            raise ValueError(
                f"{self.layer_key.describe()} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.layer_key.describe()} got an input with {x.shape[1]} channels "
                f"(input size {tuple(x.shape)}); dimension 1 must hold the channels"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.layer_key.describe()} expects a floating-point input, got {x.dtype}")

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The batch branch's per-channel mean and biased variance, in ``x``'s compute dtype
        (pass the input already upcast to it, so half inputs are converted once).

        Training (or ``track_running_stats=False``): the statistics of the global
        batch, differentiable, and the running statistics are updated.  Eval with
        running statistics: those, and no communication.  The variance is
        ``None`` in eval for layers without ``running_var``.
        """
        dtype = compute_dtype(x)
        if not self.training and self.running_mean is not None:
            var = None if self.running_var is None else self.running_var.to(dtype)
            return self.running_mean.to(dtype), var
        stats = global_batch_moments(x, self.active_reducer() or LOCAL, self.layer_key)
        if self.training and self.running_mean is not None:
            assert self.num_batches_tracked is not None
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked + 1)
            else:
                factor = self.momentum
            if self.running_var is not None:
                update_running_stats(self.running_mean, self.running_var, stats.moments, factor)
            else:
                update_running_mean(self.running_mean, stats.mean, factor)
            self.num_batches_tracked.add_(1)
        return stats.mean, stats.var

    @classmethod
    def from_batchnorm(
        cls,
        source: _BatchNorm,
        process_group: Any | None = None,
        reducer: StatsReducer | None = None,
        **options: Any,
    ) -> BatchBranchNorm:
        """A layer of this class built from a torch batch norm: same ``num_features``,
        ``momentum``, ``track_running_stats`` (and ``eps``, ``affine`` where the
        class has them), device and dtype; ``source``'s ``weight``, ``bias`` and
        running buffers are shared where this class has them; its own extra
        parameters start at their defaults.  ``options`` go to the constructor.
        """
        reference = source.weight if source.weight is not None else source.running_mean
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        kwargs = {
            "momentum": source.momentum,
            "track_running_stats": source.track_running_stats,
            **factory,
            **cls._options_from(source),
            **options,
        }
        layer = cls(source.num_features, process_group=process_group, reducer=reducer, **kwargs)
        layer._adopt(source)
        return layer

    @classmethod
    def _options_from(cls, source: _BatchNorm) -> dict[str, Any]:
        """Constructor arguments beyond the common ones that carry over from ``source``."""
        return {"eps": source.eps, "affine": source.affine}

    def _adopt(self, source: _BatchNorm) -> None:
        """Share ``source``'s parameters and buffers that this layer also has, and its mode."""
        for name in ("weight", "bias"):
            if getattr(self, name, None) is not None and getattr(source, name, None) is not None:
                setattr(self, name, getattr(source, name))
        if self.running_mean is not None and source.running_mean is not None:
            self.running_mean = source.running_mean
            if self.running_var is not None:
                self.running_var = source.running_var
            self.num_batches_tracked = source.num_batches_tracked
        self.train(source.training)

    def extra_repr(self) -> str:
        name = f", layer_name={self.layer_name!r}" if self.layer_name else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}{name}"
        )
