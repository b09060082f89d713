from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SwitchRoleRequest(_message.Message):
    __slots__ = ("worker_id", "role", "grace_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    grace_s: float
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., grace_s: _Optional[float] = ...) -> None: ...

class SwitchRoleResponse(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ScalePoolRequest(_message.Message):
    __slots__ = ("role", "replicas", "grace_s")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    role: str
    replicas: int
    grace_s: float
    def __init__(self, role: _Optional[str] = ..., replicas: _Optional[int] = ..., grace_s: _Optional[float] = ...) -> None: ...

class ScalePoolResponse(_message.Message):
    __slots__ = ("changed_workers",)
    CHANGED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    changed_workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, changed_workers: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "chat", "params", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _common_pb2.TokenIds
    chat: _common_pb2.ChatPrompt
    params: _common_pb2.SamplingParams
    model: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., chat: _Optional[_Union[_common_pb2.ChatPrompt, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finish_reason", "stop_string", "stop_token_id", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.PositionLogprobs]
    finish_reason: _common_pb2.FinishReason
    stop_string: str
    stop_token_id: int
    usage: _common_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.PositionLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stop_string: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "max_model_len", "vocab_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_model_len: int
    vocab_size: int
    def __init__(self, name: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "role", "address", "healthy", "running_requests", "waiting_requests", "kv_usage", "queued_prefill_tokens", "num_kv_blocks", "restarts", "last_recovery_s", "loop_lag_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECOVERY_S_FIELD_NUMBER: _ClassVar[int]
    LOOP_LAG_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    address: str
    healthy: bool
    running_requests: int
    waiting_requests: int
    kv_usage: float
    queued_prefill_tokens: int
    num_kv_blocks: int
    restarts: int
    last_recovery_s: float
    loop_lag_s: float
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_usage: _Optional[float] = ..., queued_prefill_tokens: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., restarts: _Optional[int] = ..., last_recovery_s: _Optional[float] = ..., loop_lag_s: _Optional[float] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("mode", "model", "workers", "requests_in_flight", "router_loop_lag_s", "router_gc_pause_s", "planner")
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTER_LOOP_LAG_S_FIELD_NUMBER: _ClassVar[int]
    ROUTER_GC_PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    mode: str
    model: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    requests_in_flight: int
    router_loop_lag_s: float
    router_gc_pause_s: float
    planner: PlannerStatus
    def __init__(self, mode: _Optional[str] = ..., model: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., requests_in_flight: _Optional[int] = ..., router_loop_lag_s: _Optional[float] = ..., router_gc_pause_s: _Optional[float] = ..., planner: _Optional[_Union[PlannerStatus, _Mapping]] = ...) -> None: ...

class PlannedConfiguration(_message.Message):
    __slots__ = ("config", "goodput_per_gpu", "attainment_at_offered", "preemptions_per_request")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_PER_GPU_FIELD_NUMBER: _ClassVar[int]
    ATTAINMENT_AT_OFFERED_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    config: str
    goodput_per_gpu: float
    attainment_at_offered: float
    preemptions_per_request: float
    def __init__(self, config: _Optional[str] = ..., goodput_per_gpu: _Optional[float] = ..., attainment_at_offered: _Optional[float] = ..., preemptions_per_request: _Optional[float] = ...) -> None: ...

class PlannerStatus(_message.Message):
    __slots__ = ("mode", "status", "recommended", "current", "planned_at", "predictions", "apply_status")
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PLANNED_AT_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    APPLY_STATUS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    status: str
    recommended: str
    current: str
    planned_at: float
    predictions: _containers.RepeatedCompositeFieldContainer[PlannedConfiguration]
    apply_status: str
    def __init__(self, mode: _Optional[str] = ..., status: _Optional[str] = ..., recommended: _Optional[str] = ..., current: _Optional[str] = ..., planned_at: _Optional[float] = ..., predictions: _Optional[_Iterable[_Union[PlannedConfiguration, _Mapping]]] = ..., apply_status: _Optional[str] = ...) -> None: ...
