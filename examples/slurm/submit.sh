#!/bin/bash
# Prepare every store, run a 64-task array over the units, then finalize once every task
# has ended (afterany: failed tasks too; rerunning the array resumes what they left).
set -euo pipefail
mkdir -p logs
prep=$(sbatch --parsable prepare.sbatch)
array=$(sbatch --parsable --dependency=afterok:"$prep" --array=0-63 encode-array.sbatch)
sbatch --dependency=afterany:"$array" finalize.sbatch
