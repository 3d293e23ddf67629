"""The model on the wire: one flat float32 array plus its layout (ordered names, shapes, dtypes); pure numpy."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import LAYOUT_KEY, MODEL_KEY

__all__ = ["LAYOUT_KEY", "MODEL_KEY", "Layout", "check_model_keys", "flat_of", "pack", "unpack"]
WIRE_DTYPE = np.dtype(np.float32)
MAX_ARRAYS = 10_000
MAX_RANK = 32


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a flat vector splits into named arrays: names in order, their shapes and (receiver-side) dtypes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Layout":
        """The layout of ``params`` in its own order (numpy arrays or torch tensors)."""
        names = tuple(params)
        shapes = tuple(tuple(int(d) for d in params[k].shape) for k in names)
        dtypes = tuple(str(params[k].dtype).removeprefix("torch.") for k in names)
        return cls(names, shapes, dtypes)

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def to_record(self) -> dict[str, list]:
        """A Flower ConfigRecord's content: names, ranks and all dimensions concatenated (dtypes stay local)."""
        return {"names": list(self.names), "ranks": [len(s) for s in self.shapes],
                "dims": [d for s in self.shapes for d in s]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Layout":
        """A received layout, checked for form (the receiver then checks it against its own model). Dtypes are
        the wire's (float32); ContractError on anything malformed."""
        if set(record) != {"names", "ranks", "dims"}:
            raise ContractError(f"model layout must have exactly names, ranks, dims; got {sorted(record)}")
        names, ranks, dims = (record[k] for k in ("names", "ranks", "dims"))
        if not isinstance(names, list) or not all(isinstance(n, str) and 0 < len(n) <= 512 for n in names):
            raise ContractError("model layout: names must be a list of non-empty strings")
        if not 0 < len(names) <= MAX_ARRAYS or len(set(names)) != len(names):
            raise ContractError(f"model layout: 1..{MAX_ARRAYS} distinct names needed, got {len(names)}")
        ints = (ranks, dims)
        if not all(isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31
                                               for v in x) for x in ints):
            raise ContractError("model layout: ranks and dims must be lists of integers in [0, 2^31)")
        if len(ranks) != len(names) or max(ranks) > MAX_RANK or sum(ranks) != len(dims):
            raise ContractError(f"model layout: {len(names)} names, {len(ranks)} ranks and {len(dims)} dims "
                                f"do not fit together")
        shapes, at = [], 0
        for r in ranks:
            shapes.append(tuple(dims[at:at + r]))
            at += r
        return cls(tuple(names), tuple(shapes), (WIRE_DTYPE.name,) * len(names))

    def mismatch(self, own: "Layout") -> str | None:
        """None if this layout names exactly ``own``'s arrays with ``own``'s shapes (in any order), else the first
        differences in words."""
        mine, theirs = dict(zip(own.names, own.shapes)), dict(zip(self.names, self.shapes))
        problems = []
        missing, extra = [k for k in own.names if k not in theirs], [k for k in self.names if k not in mine]
        if missing:
            problems.append(f"missing arrays {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if extra:
            problems.append(f"unknown arrays {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        wrong = [f"{k!r} is {list(theirs[k])}, here {list(mine[k])}" for k in self.names
                 if k in mine and theirs[k] != mine[k]]
        if wrong:
            problems.append("shapes differ: " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))
        return "; ".join(problems) or None

    def with_dtypes_of(self, own: "Layout") -> "Layout":
        """This layout's order and shapes with ``own``'s dtypes (after ``mismatch`` found none)."""
        dt = dict(zip(own.names, own.dtypes))
        return dataclasses.replace(self, dtypes=tuple(dt[k] for k in self.names))


def pack(params: Mapping[str, Any], layout: Layout) -> np.ndarray:
    """``params`` (numpy arrays or CPU tensors) as one float32 vector in ``layout``'s order. ContractError when
    an array is missing or has another shape."""
    parts = []
    for name, shape in zip(layout.names, layout.shapes):
        if name not in params:
            raise ContractError(f"cannot pack the model: no array {name!r}")
        v = params[name]
        a = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        if tuple(a.shape) != shape:
            raise ContractError(f"cannot pack the model: array {name!r} has shape {list(a.shape)}, "
                                f"expected {list(shape)}")
        parts.append(a.astype(WIRE_DTYPE, copy=False).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, WIRE_DTYPE)


def unpack(flat: Any, layout: Layout) -> dict[str, np.ndarray]:
    """The named arrays of a received flat vector, split by ``layout`` (the receiver's own) and cast to its
    dtypes. ContractError when the vector is not a 1-D float32 array of exactly the layout's length, or an
    integer array's values do not survive the cast. Values are not checked for finiteness here."""
    if not isinstance(flat, np.ndarray):
        raise ContractError(f"model array is a {type(flat).__name__}, not an array")
    if flat.dtype != WIRE_DTYPE:
        raise ContractError(f"model array has dtype {flat.dtype}, expected {WIRE_DTYPE.name}")
    if flat.ndim != 1:
        raise ContractError(f"model array has shape {list(flat.shape)}, expected one dimension")
    if flat.shape[0] != layout.size:
        raise ContractError(f"model array holds {flat.shape[0]} values, the model has {layout.size} "
                            f"({len(layout.names)} arrays)")
    out, at = {}, 0
    for name, shape, size, dtype in zip(layout.names, layout.shapes, layout.sizes, layout.dtypes):
        piece = flat[at:at + size].reshape(shape)
        at += size
        target = np.dtype(dtype)
        if target == WIRE_DTYPE:
            out[name] = piece.copy()
            continue
        cast = piece.astype(target)
        if not np.array_equal(cast.astype(WIRE_DTYPE), piece):
            raise ContractError(f"model array: values of {name!r} do not fit its dtype {dtype}")
        out[name] = cast
    return out


def check_model_keys(keys: list[str]) -> None:
    """ContractError unless a received model record's array names are exactly ``[MODEL_KEY]``."""
    if keys != [MODEL_KEY]:
        raise ContractError(f"model arrays must be exactly [{MODEL_KEY!r}] (one flat array), got "
                            f"{keys[:5]}{' ...' if len(keys) > 5 else ''}")


def flat_of(record: Mapping[str, Any]) -> np.ndarray:
    """The one flat array of a received model record (a Flower ArrayRecord: values with ``.numpy()``)."""
    check_model_keys(list(record.keys()))
    return record[MODEL_KEY].numpy()
