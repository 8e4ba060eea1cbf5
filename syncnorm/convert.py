"""Swap a model's batch norm layers for SyncBatchNorm (or another synchronized norm) and back."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.norms.base import BatchBranchNorm
from syncnorm.transports.base import StatsReducer

_BY_INPUT_DIM: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _bias_kwargs(source: _BatchNorm) -> dict[str, bool]:
    # torch >= 2.13 has affine layers without bias; older releases lack the argument.
    return {"bias": False} if source.affine and source.bias is None else {}


def _copy_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Share ``source``'s parameters and buffers with ``target`` and copy its flags."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: Any | None = None,
    reducer: StatsReducer | None = None,
    to: type[nn.Module] = SyncBatchNorm,
    **options: Any,
) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` in ``module``
    with :class:`SyncBatchNorm`, sharing the same parameters and buffers (so
    ``requires_grad``, device and dtype carry over) and the training flag.

    Each new layer gets its qualified name as ``layer_name``, used in error
    messages.  Returns the converted module (a new object if ``module`` itself
    was a batch norm layer); converts in place otherwise.

    ``to`` picks another synchronized norm from :mod:`syncnorm.norms`
    (``SyncBatchInstanceNorm2d``, ``SyncSwitchableNorm2d``,
    ``SyncMeanOnlyBatchNorm2d``, ``SyncConditionalBatchNorm2d``).  Those are 2-D
    layers: they replace every ``torch.nn.BatchNorm2d`` (and every
    :class:`SyncBatchNorm` converted from one); other batch norms stay as they are
    (a second, plain call turns them into :class:`SyncBatchNorm`).  ``options``
    go to the new layer's constructor (``num_conditions=`` for the conditional
    one).  What carries over, shared: ``weight``, ``bias`` and the running
    buffers where the new layer has them, plus ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, device and dtype; the new layer's own parameters
    start at their papers' initial values.  So batch-instance norm (``rho = 1``)
    and conditional batch norm (zero deltas) compute what the batch norm
    computed until they train; switchable norm starts with equal branch weights;
    mean-only batch norm keeps ``bias`` and ``running_mean`` and drops
    ``weight``, ``running_var`` and ``eps`` (put the scale in the preceding
    layer's weight normalization).  The conversion builds every new layer before
    it replaces any, so an error leaves ``module`` unchanged.
    """
    if to is SyncBatchNorm:
        if options:
            raise TypeError(f"SyncBatchNorm conversion takes no further options, got {sorted(options)}")
        converted = _convert(module, process_group, reducer)
    elif isinstance(to, type) and issubclass(to, BatchBranchNorm) and to is not BatchBranchNorm:
        converted = _convert_to_2d(module, to, process_group, reducer, options)
    else:
        raise ValueError(
            f"to= must be syncnorm.SyncBatchNorm or a layer from syncnorm.norms "
            f"(SyncBatchInstanceNorm2d, SyncSwitchableNorm2d, SyncMeanOnlyBatchNorm2d, "
            f"SyncConditionalBatchNorm2d), got {to!r}"
        )
    name_layers(converted)
    return converted


def _is_batchnorm_2d(module: nn.Module) -> bool:
    if isinstance(module, nn.BatchNorm2d):
        return True
    return isinstance(module, SyncBatchNorm) and (
        getattr(module, "original_class", None) is nn.BatchNorm2d or module.last_input_dim == 4
    )


def _convert_to_2d(
    module: nn.Module,
    to: type[BatchBranchNorm],
    process_group: Any | None,
    reducer: StatsReducer | None,
    options: dict[str, Any],
) -> nn.Module:
    def build(source: nn.Module) -> BatchBranchNorm:
        assert isinstance(source, _BatchNorm)
        return to.from_batchnorm(source, process_group=process_group, reducer=reducer, **options)

    if _is_batchnorm_2d(module):
        return build(module)
    # Every new layer is built before any is put in place: a failure changes nothing.
    replacements = [
        (parent, name, build(child))
        for parent in module.modules()
        for name, child in parent.named_children()
        if _is_batchnorm_2d(child)
    ]
    for parent, name, layer in replacements:
        setattr(parent, name, layer)
    return module


def _convert(module: nn.Module, process_group: Any | None, reducer: StatsReducer | None) -> nn.Module:
    if isinstance(module, _CONVERTIBLE):
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group=process_group, reducer=reducer,
            **_bias_kwargs(module),
        )  # fmt: skip
        if not isinstance(module, nn.SyncBatchNorm):
            sync.original_class = type(module)
        return _copy_state(module, sync)
    for name, child in module.named_children():
        new = _convert(child, process_group, reducer)
        if new is not child:
            setattr(module, name, new)
    return module


def revert_sync_batchnorm(module: nn.Module, cls: type[_BatchNorm] | None = None) -> nn.Module:
    """Replace every :class:`SyncBatchNorm` in ``module`` with a plain torch batch norm.

    The class is ``cls`` if given, else the class the layer was converted from,
    else the one matching the last input the layer saw (2-D/3-D input:
    ``BatchNorm1d``, 4-D: ``BatchNorm2d``, 5-D: ``BatchNorm3d``).  Parameters
    and buffers are shared, as in :func:`convert_sync_batchnorm`.
    """
    if isinstance(module, SyncBatchNorm):
        target = (
            cls or getattr(module, "original_class", None) or _BY_INPUT_DIM.get(module.last_input_dim or 0)
        )
        if target is None:
            raise ValueError(
                f"{module.layer_key.describe()} has never run and was not converted from a torch "
                "layer, so its dimensionality is unknown: pass cls=torch.nn.BatchNorm1d, "
                "BatchNorm2d or BatchNorm3d"
            )
        plain = target(module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats, **_bias_kwargs(module))  # fmt: skip
        return _copy_state(module, plain)
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child, cls)
        if new is not child:
            setattr(module, name, new)
    return module


def name_layers(module: nn.Module) -> nn.Module:
    """Set each synchronized layer's ``layer_name`` to its qualified name in ``module``
    (:class:`SyncBatchNorm` and the layers of :mod:`syncnorm.norms`).

    Names appear in synchronization errors and in the layer signature that lets
    workers detect that they are calling different layers.
    """
    for name, child in module.named_modules():
        if isinstance(child, (SyncBatchNorm, BatchBranchNorm)):
            child.layer_name = name or child.layer_name
    return module
