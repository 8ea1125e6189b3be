from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Group(_message.Message):
    __slots__ = ("group_id", "qid", "submit_version", "worker", "cursor", "trajectories", "created")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    QID_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    qid: str
    submit_version: int
    worker: str
    cursor: int
    trajectories: _containers.RepeatedScalarFieldContainer[bytes]
    created: float
    def __init__(self, group_id: _Optional[str] = ..., qid: _Optional[str] = ..., submit_version: _Optional[int] = ..., worker: _Optional[str] = ..., cursor: _Optional[int] = ..., trajectories: _Optional[_Iterable[bytes]] = ..., created: _Optional[float] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: Group
    def __init__(self, group: _Optional[_Union[Group, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("count", "timeout_s", "wait_s")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    count: int
    timeout_s: float
    wait_s: float
    def __init__(self, count: _Optional[int] = ..., timeout_s: _Optional[float] = ..., wait_s: _Optional[float] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("lease_id", "groups", "expires_in_s", "count")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    expires_in_s: float
    count: int
    def __init__(self, lease_id: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ..., expires_in_s: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ReadLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "start")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    start: int
    def __init__(self, lease_id: _Optional[str] = ..., start: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("lease_id", "timeout_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    timeout_s: float
    def __init__(self, lease_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class VersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: str
    def __init__(self, worker: _Optional[str] = ...) -> None: ...

class StateResponse(_message.Message):
    __slots__ = ("version", "accepted", "cursor", "queued", "leased", "leases", "consumed", "accepted_total", "duplicates", "expired_leases", "queued_by_version", "oldest_queued_version")
    class QueuedByVersionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_BY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OLDEST_QUEUED_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    accepted: int
    cursor: int
    queued: int
    leased: int
    leases: int
    consumed: int
    accepted_total: int
    duplicates: int
    expired_leases: int
    queued_by_version: _containers.ScalarMap[int, int]
    oldest_queued_version: int
    def __init__(self, version: _Optional[int] = ..., accepted: _Optional[int] = ..., cursor: _Optional[int] = ..., queued: _Optional[int] = ..., leased: _Optional[int] = ..., leases: _Optional[int] = ..., consumed: _Optional[int] = ..., accepted_total: _Optional[int] = ..., duplicates: _Optional[int] = ..., expired_leases: _Optional[int] = ..., queued_by_version: _Optional[_Mapping[int, int]] = ..., oldest_queued_version: _Optional[int] = ...) -> None: ...
