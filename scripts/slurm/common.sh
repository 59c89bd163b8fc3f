# Sourced by the sbatch templates in this folder (submit them from the repository root: sbatch copies a script
# elsewhere, so this file is found through $SLURM_SUBMIT_DIR). Settings every stage shares; override any of them
# when submitting, e.g.  sbatch --export=ALL,DATA=/data/esci/examples.parquet scripts/slurm/teacher_fit.sbatch
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1

DATA=${DATA:-data/examples.parquet}                      # the labelled pairs (CSV, TSV, JSONL or Parquet; docs/data.md)
PRESET=${PRESET:-esci}                                   # their column mapping and label scheme
ITEM_FIELDS=${ITEM_FIELDS:-[title,brand,color,description]}   # item text the teacher reads; every stage uses the same
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}                 # the teacher's base model: hub id or local directory
ANNOTATIONS=${ANNOTATIONS:-runs/annotations}             # chains of thought (annotate writes, teacher fit reads)
TEACHER_RUN=${TEACHER_RUN:-runs/teacher/qwen2_5_7b_lora} # teacher fit: checkpoints in tb/checkpoints, export in teacher/
CACHE=${CACHE:-runs/teacher/cache_qwen2_5_7b_cot}        # teacher cache (predict writes, students read)

# the environment: a virtual environment with ellm-mkd installed (VENV= to use the one already active)
VENV=${VENV-.venv}
if [ -n "$VENV" ] && [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-8}   # srun does not take --cpus-per-task from sbatch (SLURM >= 22.05)
export TOKENIZERS_PARALLELISM=false
# Lightning's SLURMEnvironment reads the ranks (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID), the world size and the
# main address (first host of SLURM_NODELIST) from srun, and checks that --trainer.devices equals --ntasks-per-node.
NODES=${SLURM_JOB_NUM_NODES:-1}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}

# requeueable CMD...: run one srun step so that a time limit or a preemption ends in a checkpoint and a requeue.
# SLURM signals this batch shell (not the ranks) with USR1 before the time limit (#SBATCH --signal=B:USR1@...), and
# with TERM on preemption. Either way every rank gets SIGTERM: Lightning stops at the end of the batch and
# callbacks.CheckpointOnPreemption writes last.ckpt (a cache run keeps its finished shards). The step is waited
# for, then the job is requeued (#SBATCH --requeue) and runs the same command again: --ckpt_path last (or the
# cache's own resume) goes on from there. Lightning's own SIGUSR1 requeue never fires: the ranks never get USR1.
requeueable() {
    STOPPED= STEP=
    trap 'STOPPED=1; echo "$(date): stop requested: SIGTERM to every rank, then requeue" >&2
          if [ -n "$STEP" ]; then kill -TERM "$STEP" 2>/dev/null; fi' USR1 TERM
    "$@" &
    STEP=$!
    if [ -n "$STOPPED" ]; then kill -TERM "$STEP" 2>/dev/null; fi  # a signal that came before the step started
    local status=0
    wait "$STEP"; status=$?
    while kill -0 "$STEP" 2>/dev/null; do  # a trapped signal ends the first wait early
        wait "$STEP"; status=$?
    done
    trap - USR1 TERM
    if [ -n "$STOPPED" ]; then
        echo "$(date): step ended with status $status; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$status"
}
