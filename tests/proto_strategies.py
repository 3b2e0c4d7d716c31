"""Hypothesis strategies for any protobuf message, built from its descriptor: every field of
every type (scalars at and beyond their boundaries, NaN/inf floats, any text, repeated
fields, at most one member of a oneof set, nested messages), so the fuzz tests cover each
RPC's request message without a hand-written generator per message."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

_INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}  # fmt: skip
MAX_REPEATED = 12


def _scalar(field: F) -> st.SearchStrategy:
    if field.type in _INTS:
        low, high = _INTS[field.type]
        # small values reach the interesting boundaries (0, 1, limits) more often than extremes
        return st.integers(-3, 300).filter(lambda v: low <= v <= high) | st.integers(low, high)
    if field.type == F.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if field.type == F.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        # proto strings are UTF-8: no lone surrogates (those never get past the transport)
        return st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-2, 20)
    raise TypeError(field)


@st.composite
def messages(draw, message_class, depth: int = 0):
    """A `message_class` instance with a random subset of its fields set."""
    descriptor = message_class.DESCRIPTOR
    msg = message_class()
    chosen_oneofs = {o.name: draw(st.sampled_from([None, *[f.name for f in o.fields]])) for o in descriptor.oneofs}
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneofs.get(oneof.name) != field.name:
            continue
        if oneof is None and not draw(st.booleans()):
            continue
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                entry = field.message_type
                keys, values = entry.fields_by_name["key"], entry.fields_by_name["value"]
                for k, v in draw(st.dictionaries(_scalar(keys), _scalar(values), max_size=4)).items():
                    getattr(msg, field.name)[k] = v
                continue
            if depth > 3:
                continue
            if _repeated(field):
                container = getattr(msg, field.name)
                for _ in range(draw(st.integers(0, 3))):
                    item = container.add()
                    item.CopyFrom(draw(messages(type(item), depth + 1)))
                continue
            sub = getattr(msg, field.name)
            sub.CopyFrom(draw(messages(type(sub), depth + 1)))
            sub.SetInParent()
        elif _repeated(field):
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=MAX_REPEATED)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


def _repeated(field: F) -> bool:
    return field.is_repeated
