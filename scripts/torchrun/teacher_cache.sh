#!/bin/bash
# Teacher cache over NNODES machines x NPROC_PER_NODE GPUs with DDP (each GPU holds the whole 7B model in bf16 and
# writes its own shards); run on every machine (common.sh says how). Run again after a failure: it resumes.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MODEL=/models/Qwen2.5-7B-Instruct bash scripts/torchrun/teacher_cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CACHE_CONFIG=${CACHE_CONFIG:-configs/teacher/large/cache_qwen2_5_7b_cot.yaml}
ADAPTER=${ADAPTER:-$TEACHER_RUN/teacher/adapter}
USE_LORA=${USE_LORA:-true}

launch predict --config "$CACHE_CONFIG" --config configs/trainer/multinode.yaml \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
    --model.init_args.model "$MODEL" --model.init_args.adapter "$ADAPTER" --model.init_args.use_lora "$USE_LORA" \
    --data.source.path "$DATA" --data.source.preset "$PRESET" --data.item_fields "$ITEM_FIELDS" \
    --trainer.callbacks.init_args.cache_dir "$CACHE"
