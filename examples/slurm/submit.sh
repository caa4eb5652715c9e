#!/bin/bash
# Submit a 64-task array, then the finalize step once every task has ended.
set -euo pipefail
mkdir -p logs
array=$(sbatch --parsable --array=0-63 encode-array.sbatch)
sbatch --dependency=afterany:"$array" finalize.sbatch
