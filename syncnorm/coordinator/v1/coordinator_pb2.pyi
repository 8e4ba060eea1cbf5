from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerStats(_message.Message):
    __slots__ = ("layer", "count", "mean", "var", "running_mean", "running_var")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    layer: str
    count: float
    mean: _containers.RepeatedScalarFieldContainer[float]
    var: _containers.RepeatedScalarFieldContainer[float]
    running_mean: _containers.RepeatedScalarFieldContainer[float]
    running_var: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[str] = ..., count: _Optional[float] = ..., mean: _Optional[_Iterable[float]] = ..., var: _Optional[_Iterable[float]] = ..., running_mean: _Optional[_Iterable[float]] = ..., running_var: _Optional[_Iterable[float]] = ...) -> None: ...

class PackedLayerStats(_message.Message):
    __slots__ = ("layer", "channels", "count", "mean", "var", "running_mean", "running_var", "value_type")
    class ValueType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VALUE_TYPE_FLOAT64: _ClassVar[PackedLayerStats.ValueType]
        VALUE_TYPE_FLOAT32: _ClassVar[PackedLayerStats.ValueType]
    VALUE_TYPE_FLOAT64: PackedLayerStats.ValueType
    VALUE_TYPE_FLOAT32: PackedLayerStats.ValueType
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    layer: _containers.RepeatedScalarFieldContainer[str]
    channels: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[float]
    mean: bytes
    var: bytes
    running_mean: bytes
    running_var: bytes
    value_type: PackedLayerStats.ValueType
    def __init__(self, layer: _Optional[_Iterable[str]] = ..., channels: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[float]] = ..., mean: _Optional[bytes] = ..., var: _Optional[bytes] = ..., running_mean: _Optional[bytes] = ..., running_var: _Optional[bytes] = ..., value_type: _Optional[_Union[PackedLayerStats.ValueType, str]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("run_id", "worker_id", "step", "device_kind", "batch_size", "step_time_seconds", "layers", "packed")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: str
    step: int
    device_kind: str
    batch_size: int
    step_time_seconds: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerStats]
    packed: PackedLayerStats
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., device_kind: _Optional[str] = ..., batch_size: _Optional[int] = ..., step_time_seconds: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerStats, _Mapping]]] = ..., packed: _Optional[_Union[PackedLayerStats, _Mapping]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("reports_received",)
    REPORTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    reports_received: int
    def __init__(self, reports_received: _Optional[int] = ...) -> None: ...

class GetGlobalStatsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GlobalLayerStats(_message.Message):
    __slots__ = ("layer", "count", "cumulative_mean", "cumulative_var", "ema_mean", "ema_var")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_MEAN_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_VAR_FIELD_NUMBER: _ClassVar[int]
    EMA_MEAN_FIELD_NUMBER: _ClassVar[int]
    EMA_VAR_FIELD_NUMBER: _ClassVar[int]
    layer: str
    count: float
    cumulative_mean: _containers.RepeatedScalarFieldContainer[float]
    cumulative_var: _containers.RepeatedScalarFieldContainer[float]
    ema_mean: _containers.RepeatedScalarFieldContainer[float]
    ema_var: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[str] = ..., count: _Optional[float] = ..., cumulative_mean: _Optional[_Iterable[float]] = ..., cumulative_var: _Optional[_Iterable[float]] = ..., ema_mean: _Optional[_Iterable[float]] = ..., ema_var: _Optional[_Iterable[float]] = ...) -> None: ...

class GetGlobalStatsResponse(_message.Message):
    __slots__ = ("run_id", "layers", "step")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    layers: _containers.RepeatedCompositeFieldContainer[GlobalLayerStats]
    step: int
    def __init__(self, run_id: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[GlobalLayerStats, _Mapping]]] = ..., step: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "device_kind", "step", "batch_size", "batch_share", "step_time_seconds", "stats_drift", "log_var_ratio", "last_report_unix_seconds", "stale", "recommended_batch_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SHARE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATS_DRIFT_FIELD_NUMBER: _ClassVar[int]
    LOG_VAR_RATIO_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device_kind: str
    step: int
    batch_size: int
    batch_share: float
    step_time_seconds: float
    stats_drift: float
    log_var_ratio: float
    last_report_unix_seconds: float
    stale: bool
    recommended_batch_size: int
    def __init__(self, worker_id: _Optional[str] = ..., device_kind: _Optional[str] = ..., step: _Optional[int] = ..., batch_size: _Optional[int] = ..., batch_share: _Optional[float] = ..., step_time_seconds: _Optional[float] = ..., stats_drift: _Optional[float] = ..., log_var_ratio: _Optional[float] = ..., last_report_unix_seconds: _Optional[float] = ..., stale: _Optional[bool] = ..., recommended_batch_size: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("run_id", "workers", "global_batch_size", "batch_size_mismatch_ratio", "running_stats_divergence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_MISMATCH_RATIO_FIELD_NUMBER: _ClassVar[int]
    RUNNING_STATS_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    global_batch_size: int
    batch_size_mismatch_ratio: float
    running_stats_divergence: float
    def __init__(self, run_id: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., global_batch_size: _Optional[int] = ..., batch_size_mismatch_ratio: _Optional[float] = ..., running_stats_divergence: _Optional[float] = ...) -> None: ...

class RecommendBatchSizesRequest(_message.Message):
    __slots__ = ("run_id", "global_batch_size")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    global_batch_size: int
    def __init__(self, run_id: _Optional[str] = ..., global_batch_size: _Optional[int] = ...) -> None: ...

class RecommendBatchSizesResponse(_message.Message):
    __slots__ = ("batch_sizes", "global_batch_size")
    class BatchSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    batch_sizes: _containers.ScalarMap[str, int]
    global_batch_size: int
    def __init__(self, batch_sizes: _Optional[_Mapping[str, int]] = ..., global_batch_size: _Optional[int] = ...) -> None: ...
