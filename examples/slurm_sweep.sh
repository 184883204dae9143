#!/usr/bin/env bash
# Table 1 on a SLURM cluster: N array tasks, one shard of the sweep each, all on one shared
# results store (a filesystem every node mounts: the sweep's locks are flock(2), which NFSv4
# and Lustre honour), then one job that assembles and scores the table.
#
#   sbatch examples/slurm_sweep.sh                        # the 8 shards (all must run at once:
#                                                         # a shard waits for another's cells)
#   sbatch --dependency=afterany:<jobid> --wrap "python -m eqicl.sweep --paper-dir $STORE/paper --run-root $STORE/sweep"
#                                                         # the table, once all have ended
#
# Arguments after the script's name go to every shard (e.g. --noise 5 --layers 1-3; --list
# prints the cells a shard owns). A shard that was killed or timed out resumes with the same command (sbatch the array
# again, or one index with --array=K); cells it left waiting say so in its log.
#SBATCH --job-name=eqicl-table1
#SBATCH --array=1-8
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=12:00:00
#SBATCH --output=eqicl-table1-%a.log
set -euo pipefail
STORE=${STORE:-$PWD/runs}
python -m eqicl.sweep --paper-dir "$STORE/paper" --run-root "$STORE/sweep" --no-progress \
    --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" --wait 36000 "$@"
