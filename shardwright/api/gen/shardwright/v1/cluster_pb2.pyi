from shardwright.api.gen.shardwright.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "address", "gpus_total", "gpus_free", "memory_total_bytes", "memory_free_bytes", "alive")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPUS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPUS_FREE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    gpus_total: float
    gpus_free: float
    memory_total_bytes: int
    memory_free_bytes: int
    alive: bool
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., gpus_total: _Optional[float] = ..., gpus_free: _Optional[float] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., alive: _Optional[bool] = ...) -> None: ...

class Gang(_message.Message):
    __slots__ = ("job_id", "kind", "layout", "workers", "memory_budget_bytes", "memory_peers", "memory_plan")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PLAN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    layout: _common_pb2.ParallelLayout
    workers: _containers.RepeatedScalarFieldContainer[str]
    memory_budget_bytes: int
    memory_peers: int
    memory_plan: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.ParallelLayout, _Mapping]] = ..., workers: _Optional[_Iterable[str]] = ..., memory_budget_bytes: _Optional[int] = ..., memory_peers: _Optional[int] = ..., memory_plan: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("nodes", "gangs")
    NODES_FIELD_NUMBER: _ClassVar[int]
    GANGS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    gangs: _containers.RepeatedCompositeFieldContainer[Gang]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., gangs: _Optional[_Iterable[_Union[Gang, _Mapping]]] = ...) -> None: ...
