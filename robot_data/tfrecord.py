"""TFRecord files of ``tf.train.Example`` protos, read without TensorFlow (for RLDS datasets).

A TFRecord file is a sequence of records, each framed as::

    uint64 length | uint32 masked crc32c(length) | length bytes of data | uint32 masked crc32c(data)

(little-endian). :func:`record_spans` walks the frames once and returns where each record's data
lies, so a reader seeks straight to one episode; it checks every length's checksum (8 bytes each,
cheap), so a file cut short or a damaged header is an error naming the file, record and byte.
The data's checksum costs a pass over every byte (:mod:`robot_data.checksum`, about 100 MB/s), so
reading a record for training does not check it; :func:`read_checked_record` does, and
``vla-ft data check`` (and the check training runs first) call it on every record.

``Example`` is TensorFlow's ``tensorflow/core/example/{example,feature}.proto`` built from its
descriptor with protobuf's own message factory: field numbers as in TensorFlow, so protobuf parses
the bytes TensorFlow wrote.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from robot_data.checksum import masked_crc

HEADER = 12  # uint64 length + uint32 crc
FOOTER = 4  # uint32 crc


def record_spans(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every record's data in the file at ``path``, in file order; a ValueError
    naming the file, record and byte for a header cut short or whose length fails its checksum."""
    spans, size = [], path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            f.seek(offset)
            header = f.read(HEADER)
            if len(header) < HEADER:
                raise ValueError(f"{path}: truncated record header at byte {offset}")
            (length,), (stored,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc(header[:8]) != stored:
                raise ValueError(
                    f"{path}: record {len(spans)} at byte {offset}: its length fails its checksum (damaged header)"
                )
            end = offset + HEADER + length + FOOTER
            if end > size:
                raise ValueError(f"{path}: record at byte {offset} claims {length} bytes; the file ends first")
            spans.append((offset + HEADER, length))
            offset = end
    return spans


def read_record(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_checked_record(path: Path, offset: int, length: int) -> tuple[bytes, str | None]:
    """The data of the record at ``offset`` (a span of :func:`record_spans`) and why it fails its
    checksum (naming the byte where the record's data starts), or None when it passes: one read
    serves the check and the parse."""
    with open(path, "rb") as f:
        f.seek(offset)
        data, footer = f.read(length), f.read(FOOTER)
    (stored,) = struct.unpack("<I", footer)
    computed = masked_crc(data)
    if computed == stored:
        return data, None
    sums = f"stored {stored:#010x}, computed {computed:#010x}"
    return data, f"data at byte {offset} fails its checksum ({sums}): damaged record"


def _example_class() -> type:
    f = descriptor_pb2.FileDescriptorProto(name="vla_ft_tf_example.proto", package="tensorflow", syntax="proto3")
    repeated, optional = (
        descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    t = descriptor_pb2.FieldDescriptorProto

    def message(name: str, *fields: tuple[str, int, int, int, str | None], oneof: bool = False):
        m = f.message_type.add(name=name)
        if oneof:
            m.oneof_decl.add(name="kind")
        for field_name, number, label, kind, type_name in fields:
            field = m.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = type_name
            if oneof:
                field.oneof_index = 0
        return m

    message("BytesList", ("value", 1, repeated, t.TYPE_BYTES, None))
    message("FloatList", ("value", 1, repeated, t.TYPE_FLOAT, None))
    message("Int64List", ("value", 1, repeated, t.TYPE_INT64, None))
    message(
        "Feature",
        ("bytes_list", 1, optional, t.TYPE_MESSAGE, ".tensorflow.BytesList"),
        ("float_list", 2, optional, t.TYPE_MESSAGE, ".tensorflow.FloatList"),
        ("int64_list", 3, optional, t.TYPE_MESSAGE, ".tensorflow.Int64List"),
        oneof=True,
    )
    features = message("Features", ("feature", 1, repeated, t.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, label=optional, type=t.TYPE_STRING)
    entry.field.add(name="value", number=2, label=optional, type=t.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    entry.options.map_entry = True
    message("Example", ("features", 1, optional, t.TYPE_MESSAGE, ".tensorflow.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()


def parse_example(data: bytes) -> dict[str, Any]:
    """A serialised ``tf.train.Example`` -> {key: list of bytes | float32 array | int64 array}."""
    example = Example.FromString(data)
    out: dict[str, Any] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feature.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.asarray(feature.float_list.value, np.float32)
        elif kind == "int64_list":
            out[key] = np.asarray(feature.int64_list.value, np.int64)
        else:  # an empty Feature: TensorFlow reads it as a zero-length list
            out[key] = np.zeros(0, np.float32)
    return out
