"""Encode a folder of videos on a Dask cluster with memenc (pip install 'memenc[dask]').

    python run_batch.py /data/davis/videos caches/                    # a local cluster
    python run_batch.py /data/davis/videos s3://bucket/davis tcp://scheduler:8786

The cluster needs no special settings: `dask scheduler` + `dask worker ADDRESS` (add
`--resources GPU=1` on GPU workers, and each unit asks for one GPU) or `LocalCluster()`.
This script is the coordinator: it creates every store, hands the workers (video, range
of frame-chunks) units, retries lost workers, and marks the stores complete. The same
thing from the shell: `memenc batch VIDEOS --out DIR --dask tcp://scheduler:8786`.
"""

import sys

from memenc.pipeline.batch import BatchSettings, run_batch

if __name__ == "__main__":  # workers and decoders are separate processes
    videos, out = sys.argv[1], sys.argv[2]
    address = sys.argv[3] if len(sys.argv) > 3 else "local"  # "local:4" for 4 workers
    settings = BatchSettings(checkpoint="sam2.1_hiera_tiny", precision="fp32")
    summary = run_batch([videos], out, settings=settings, dask=address, retries=2)
    for r in summary.inputs:
        print(f"{r.status:9} {r.frames:6d} frames  {r.input}  {r.error or ''}")
    sys.exit(0 if summary.ok else 3)
