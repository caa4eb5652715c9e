"""Video sources: probe a video, then decode and resize its frames in a child process.

`probe_video` says what a video is (size, frame rate, true frame count, codec) and
which decoder reads it; `VideoSource` hands out frames as `FrameBatch`es of uint8
RGB tensors ``[B, 3, S, S]`` with the pixels SAM 2's own loader produces.

Backends (DESIGN.md §3, RELIABILITY.md "decord"):

- ``decord``: the default for MP4/MOV, Matroska and AVI files. Each frame is resized
  to S×S in decord's FFmpeg filter graph (``VideoReader(path, width=S, height=S)``),
  exactly as ``sam2.utils.misc.load_video_frames_from_video_file`` does.
- ``pyav``: files decord mis-reads or refuses, found by the probe: containers other
  than the above (MPEG-TS, raw ``.h264`` ...), MP4s whose edit list hides frames
  (decord returns every frame shifted, without an error), and files where decord's
  frame count or timestamps disagree with what a player presents. PyAV decodes with
  edit lists applied and resizes through the same filter chain decord builds
  (``[transpose=…,]scale=S:S,format=rgb24`` with FFmpeg's default scaler flags), so
  the pixels match decord's (tests/test_video.py measures it).
- ``images``: a folder of ``.jpg``/``.jpeg``/``.png`` frames, named by frame number
  as SAM 2 expects (sorted by integer stem when every stem is an integer, otherwise
  by name), resized like SAM 2's ``_load_img_as_tensor``: PIL ``convert("RGB")``
  then ``resize((S, S))`` with PIL's default filter.

The frame count and timestamps are those a player presents: the frames PyAV's
demuxer does not discard (edit lists applied), ordered by presentation time, minus
frames at the end that do not decode or lost a neighbour (a truncated file). What the
file promises (its index, stated length or frame packets) is kept as
``frame_count_declared``, so a damaged file can be named as such. Timestamps are seconds
from the stream's start (the first presented frame of an MP4 is at 0.0); streams
without timestamps (raw ``.h264``) get ``index / fps``; image folders get the
0-based frame index.

Isolation: everything that decodes (PyAV, decord, PIL) runs in a child process
started with the ``forkserver`` method (``spawn`` where that is missing), never
``fork``, because torch is loaded in the parent. A `VideoSource` keeps one child for
its lifetime, so the decoder opens once; frames come back through a shared-memory
buffer. Every wait for the child has a deadline (``timeout_s``; a long probe sends
heartbeats, so the deadline measures a stall, not the size of the file). A child
that stalls is killed; one that dies is reported. Either way the parent raises
`VideoDecodeError` naming the file and carries on. As with any multiprocessing code, a
script that uses this package must guard its entry point (``if __name__ == "__main__":``),
because the child process imports the main module. In a daemonic process (a Dask
worker), which multiprocessing may not give children, and in runs on the CPU
(`process.start_plainly`: no forkserver kept through the run), the decoder is a plain
subprocess instead (`memenc.pipeline.video.plain_process`), with the same deadlines and
kills.

Modules, by side of the process boundary:

- ``types``: `VideoInfo`, `FrameBatch` and helpers both sides use.
- child side: ``probe`` (files and image folders), ``fmp4`` (fragmented-MP4 sample
  counts), ``readers`` (decord, PyAV, image readers), ``labels`` (mask-video frames),
  ``child`` (the decoder processes' main loops and message protocol).
- parent side: ``process`` (starting a decoder, deadlines, shared buffers),
  ``plain_process`` (the decoder as a plain subprocess), ``source`` (`VideoSource`,
  `probe_video`, `read_frame`), ``label_video`` (`LabelVideo`).
"""

from memenc.pipeline.video.label_video import LabelVideo
from memenc.pipeline.video.probe import list_images
from memenc.pipeline.video.source import VideoSource, probe_video, read_frame
from memenc.pipeline.video.types import IMAGE_SUFFIXES, FrameBatch, VideoInfo

__all__ = [
    "IMAGE_SUFFIXES",
    "FrameBatch",
    "LabelVideo",
    "VideoInfo",
    "VideoSource",
    "list_images",
    "probe_video",
    "read_frame",
]
