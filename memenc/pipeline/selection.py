"""The CLI's selection options: ``--frames`` (`parse_frames`) and ``--objects``
(`parse_objects`), parsed into what the engine and batch runner take."""

from __future__ import annotations

import re

from memenc.errors import UsageError

__all__ = ["parse_frames", "parse_objects"]


def parse_frames(spec: str | None) -> slice:
    """Parse a ``--frames`` selection ``START:STOP[:STEP]`` into a slice.

    Python slice semantics: parts may be empty (``"::4"``, ``"100:"``) and START/STOP
    may be negative (counted from the end). STEP must be positive, so frames come in
    increasing order. ``None`` or ``""`` selects every frame.

    Raises:
        UsageError: the text is not of that form; the message quotes it.
    """
    if spec is None or not spec.strip():
        return slice(None)
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3):
        raise UsageError(
            f"--frames {spec!r}: expected START:STOP or START:STOP:STEP "
            "(each part an integer or empty, e.g. 0:100, ::4, 10:)"
        )
    values: list[int | None] = []
    for part in parts:
        part = part.strip()
        try:
            values.append(int(part) if part else None)
        except ValueError:
            raise UsageError(f"--frames {spec!r}: {part!r} is not an integer") from None
    if len(values) == 3 and values[2] is not None and values[2] < 1:
        raise UsageError(f"--frames {spec!r}: STEP must be a positive integer")
    return slice(*values)


def parse_objects(spec: str | None) -> list[int] | None:
    """Parse the `--objects` option.

    Takes a comma-separated list of non-negative object ids (``"1,2,7"``, spaces
    allowed) or None. Returns the ids in the order given, or None when `spec` is
    None (meaning: every object). Raises `UsageError` on an empty list, an empty
    item, something that is not a non-negative integer, or a repeated id.
    """
    if spec is None:
        return None
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise UsageError(f"--objects {spec!r}: expected comma-separated object ids, e.g. 1,2,7")
    ids: list[int] = []
    for item in items:
        if not re.fullmatch(r"[0-9]+", item):
            raise UsageError(f"--objects {spec!r}: {item!r} is not a non-negative integer id")
        value = int(item)
        if value in ids:
            raise UsageError(f"--objects {spec!r}: id {value} is given twice")
        ids.append(value)
    return ids
