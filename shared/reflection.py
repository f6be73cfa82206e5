"""Server reflection that carries the contract's comments.

The generated modules register descriptors without their source info, so reflection served from
them gives `grpcurl describe` no comments. protos/generate.py also writes the descriptors with
source info (profiles/descriptors.binpb); this servicer answers with those for the contract's own
files and leaves every other file (well-known types, health, reflection) as the stock one does.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

import profiles

SOURCE_DESCRIPTORS = Path(profiles.__file__).parent / "descriptors.binpb"


@cache
def contract_sources() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with source info, of every contract file."""
    try:
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(SOURCE_DESCRIPTORS.read_bytes())
    except OSError:
        return {}  # an install without the file still serves reflection, without comments
    return {file.name: file.SerializeToString() for file in descriptors.file}


class _ReflectionWithComments(reflection.aio.ReflectionServicer):
    def __init__(self, service_names: Iterable[str], sources: dict[str, bytes]) -> None:
        super().__init__(service_names)
        self._sources = sources

    def _with_sources(self, response: Any) -> Any:
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            for index, raw in enumerate(files):
                name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                files[index] = self._sources.get(name, raw)
        return response

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return self._with_sources(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        return self._with_sources(super()._file_containing_symbol(request, fully_qualified_name))

    def _file_containing_extension(
        self, request: Any, containing_type: str, extension_number: int
    ) -> Any:
        return self._with_sources(
            super()._file_containing_extension(request, containing_type, extension_number)
        )


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection of service_names (and what they use) on server, comments included."""
    servicer = _ReflectionWithComments(service_names, contract_sources())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
