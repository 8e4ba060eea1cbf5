"""Synchronized versions of the other batch-dependent normalizations.

Each layer synchronizes only its batch branch, through
:func:`syncnorm.batch_moments.global_batch_moments` and the same transports as
:class:`syncnorm.SyncBatchNorm` (one collective in forward, one in backward per
call); per-sample branches are computed locally.

* :class:`SyncBatchInstanceNorm2d`: batch-instance norm (Nam & Kim, 2018).
* :class:`SyncSwitchableNorm2d`: switchable norm (Luo et al., 2018).
* :class:`SyncMeanOnlyBatchNorm2d`: mean-only batch norm, with weight normalization
  (Salimans & Kingma, 2016).
* :class:`SyncConditionalBatchNorm2d`: conditional batch norm (de Vries et al., 2017;
  Perez et al., 2017).
"""

from syncnorm.norms.base import BatchBranchNorm, NormLayerKey
from syncnorm.norms.batch_instance import SyncBatchInstanceNorm2d, clip_rho_after_steps
from syncnorm.norms.conditional import SyncConditionalBatchNorm2d
from syncnorm.norms.mean_only import SyncMeanOnlyBatchNorm2d
from syncnorm.norms.switchable import SyncSwitchableNorm2d

__all__ = [
    "BatchBranchNorm",
    "NormLayerKey",
    "SyncBatchInstanceNorm2d",
    "SyncConditionalBatchNorm2d",
    "SyncMeanOnlyBatchNorm2d",
    "SyncSwitchableNorm2d",
    "clip_rho_after_steps",
]
