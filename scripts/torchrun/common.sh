# Sourced by the torchrun launchers in this folder: run the same script on every machine, from the repository root,
# with the same MASTER_ADDR and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/torchrun/teacher_fit.sh     # on the first machine
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/torchrun/teacher_fit.sh     # on the second
# torchrun starts NPROC_PER_NODE processes here and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
# Lightning's TorchElasticEnvironment reads them and checks that num_nodes x devices equals WORLD_SIZE. When a
# process fails on one machine, torchrun restarts every process there (up to MAX_RESTARTS times): the fits resume
# from last.ckpt (--ckpt_path last), the cache skips the pairs already written. On several machines the default is
# no restart: with this static rendezvous a restarted node waits for a peer whose launcher has gone (found in
# tests/test_multinode.py: still waiting after 180 s); start every node again (or let the scheduler requeue).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

DATA=${DATA:-data/examples.parquet}
PRESET=${PRESET:-esci}
ITEM_FIELDS=${ITEM_FIELDS:-[title,brand,color,description]}
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
ANNOTATIONS=${ANNOTATIONS:-runs/annotations}
TEACHER_RUN=${TEACHER_RUN:-runs/teacher/qwen2_5_7b_lora}
CACHE=${CACHE:-runs/teacher/cache_qwen2_5_7b_cot}

VENV=${VENV-.venv}
if [ -n "$VENV" ] && [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
export TOKENIZERS_PARALLELISM=false

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NNODES" -gt 1 ]; then MAX_RESTARTS=${MAX_RESTARTS:-0}; else MAX_RESTARTS=${MAX_RESTARTS:-3}; fi
# torchrun ARGS...: the ellm-mkd command ARGS in NPROC_PER_NODE processes on this machine
launch() {
    torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts "$MAX_RESTARTS" \
        -m ellm_mkd "$@"
}
