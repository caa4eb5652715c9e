"""The fragmented-MP4 box parser: how many samples a file's movie fragments list."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

__all__ = ["mp4_fragment_samples"]


def mp4_fragment_samples(path: str, track_id: int) -> int:
    """How many samples the movie fragments of an MP4 list for one track: the sum of
    ``sample_count`` over the ``moof/traf/trun`` boxes whose ``tfhd`` names the track.
    Reads the top-level box headers and each whole ``moof``; stops where the box
    structure ends (a truncated or zeroed tail)."""

    def boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
        pos = 0
        while pos + 8 <= len(data):
            size, kind = struct.unpack_from(">I4s", data, pos)
            if size < 8 or pos + size > len(data):
                return
            yield kind, data[pos + 8 : pos + size]
            pos += size

    total = 0
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            pos = 0
            while pos + 8 <= end:
                f.seek(pos)
                head = f.read(16)
                size, kind = struct.unpack_from(">I4s", head)
                header = 8
                if size == 1 and len(head) == 16:
                    size, header = struct.unpack_from(">Q", head, 8)[0], 16
                if size < header or pos + size > end:
                    break  # zeros, garbage, or a box cut short: nothing more is listed
                if kind == b"moof":
                    f.seek(pos + header)
                    for kind2, traf in boxes(f.read(size - header)):
                        if kind2 != b"traf":
                            continue
                        track, count = None, 0
                        for kind3, body in boxes(traf):
                            if kind3 == b"tfhd" and len(body) >= 8:
                                track = struct.unpack_from(">I", body, 4)[0]
                            elif kind3 == b"trun" and len(body) >= 8:
                                count += struct.unpack_from(">I", body, 4)[0]
                        if track == track_id:
                            total += count
                pos += size
    except OSError:
        return 0
    return total
