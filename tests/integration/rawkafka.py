"""Records confluent-kafka's Python API cannot write, written through librdkafka itself
(ctypes): a header key that is not UTF-8, as a Go (sarama, franz-go), kcat or Java
byte-level producer may send."""

from __future__ import annotations

import ctypes
import glob
import os

import confluent_kafka

_RD_KAFKA_PRODUCER = 0
_VTYPE_END, _VTYPE_TOPIC, _VTYPE_VALUE, _VTYPE_KEY = 0, 1, 4, 5
_VTYPE_MSGFLAGS, _VTYPE_HEADERS, _MSG_F_COPY = 7, 10, 2


def _library() -> ctypes.CDLL:
    """The librdkafka confluent-kafka's wheel ships (the one the worker uses)."""
    here = os.path.dirname(confluent_kafka.__file__)
    (path,) = glob.glob(os.path.join(here, "..", "confluent_kafka.libs", "librdkafka*.so*"))
    rk = ctypes.CDLL(path)
    rk.rd_kafka_conf_new.restype = ctypes.c_void_p
    rk.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                     ctypes.c_char_p, ctypes.c_size_t]
    rk.rd_kafka_new.restype = ctypes.c_void_p
    rk.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    rk.rd_kafka_headers_new.restype = ctypes.c_void_p
    rk.rd_kafka_headers_new.argtypes = [ctypes.c_size_t]
    rk.rd_kafka_header_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ssize_t,
                                       ctypes.c_char_p, ctypes.c_ssize_t]
    rk.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    rk.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    rk.rd_kafka_err2str.restype = ctypes.c_char_p
    return rk


def produce_with_header(bootstrap: str, topic: str, key: bytes, value: bytes,
                        header_key: bytes, header_value: bytes = b"x") -> None:
    """One record with one header whose key is `header_key` as given (any bytes)."""
    rk = _library()
    error = ctypes.create_string_buffer(512)
    conf = rk.rd_kafka_conf_new()
    assert rk.rd_kafka_conf_set(conf, b"bootstrap.servers", bootstrap.encode(), error,
                                512) == 0, error.value
    producer = rk.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, error, 512)
    assert producer, error.value
    try:
        headers = rk.rd_kafka_headers_new(1)
        rk.rd_kafka_header_add(headers, header_key, len(header_key), header_value,
                               len(header_value))
        code = rk.rd_kafka_producev(
            ctypes.c_void_p(producer),
            ctypes.c_int(_VTYPE_TOPIC), ctypes.c_char_p(topic.encode()),
            ctypes.c_int(_VTYPE_VALUE), ctypes.c_char_p(value), ctypes.c_size_t(len(value)),
            ctypes.c_int(_VTYPE_KEY), ctypes.c_char_p(key), ctypes.c_size_t(len(key)),
            ctypes.c_int(_VTYPE_MSGFLAGS), ctypes.c_int(_MSG_F_COPY),
            ctypes.c_int(_VTYPE_HEADERS), ctypes.c_void_p(headers),
            ctypes.c_int(_VTYPE_END))
        assert code == 0, rk.rd_kafka_err2str(code)
        assert rk.rd_kafka_flush(ctypes.c_void_p(producer), 30000) == 0, "not acknowledged"
    finally:
        rk.rd_kafka_destroy(ctypes.c_void_p(producer))
