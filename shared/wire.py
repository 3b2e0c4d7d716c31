"""Conversions between the domain dataclasses and their protobuf messages, one place per
concept (torch-free: the router and clients import it)."""

from __future__ import annotations

from shared.pb.specdec.v1 import common_pb2
from shared.types import SamplingParams


def sampling_to_proto(sampling: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
    )
    if sampling.seed is not None:
        msg.seed = sampling.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """The message's parameters, unvalidated (call `.validate()`). proto3 cannot tell an
    unset top_p from 0, so 0 means off (1.0); a NaN stays NaN and fails validation."""
    return SamplingParams(
        temperature=float(msg.temperature),
        top_p=1.0 if msg.top_p == 0.0 else float(msg.top_p),
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
    )
