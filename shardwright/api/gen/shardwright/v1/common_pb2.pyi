from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ParallelLayout(_message.Message):
    __slots__ = ("tp", "pp", "cp", "dp", "ep")
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    CP_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    EP_FIELD_NUMBER: _ClassVar[int]
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    def __init__(self, tp: _Optional[int] = ..., pp: _Optional[int] = ..., cp: _Optional[int] = ..., dp: _Optional[int] = ..., ep: _Optional[int] = ...) -> None: ...
