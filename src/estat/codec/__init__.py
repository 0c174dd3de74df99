"""gzip JSON Lines encoding and decoding: pure functions."""

from estat.codec.jsonl import CodecError, decode, encode, iter_records

__all__ = ["CodecError", "decode", "encode", "iter_records"]
