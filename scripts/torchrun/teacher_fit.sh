#!/bin/bash
# Teacher fit: the 7B teacher (LoRA) sharded with FSDP over NNODES machines x NPROC_PER_NODE GPUs; run on every
# machine (common.sh says how). Full fine-tuning: TEACHER_CONFIGS="configs/teacher/large/qwen2_5_7b_lora.yaml
# configs/teacher/large/qwen2_5_7b_full.yaml" TEACHER_RUN=runs/teacher/qwen2_5_7b_full.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MODEL=/models/Qwen2.5-7B-Instruct bash scripts/torchrun/teacher_fit.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TEACHER_CONFIGS=${TEACHER_CONFIGS:-configs/teacher/large/qwen2_5_7b_lora.yaml}
configs=()
for c in $TEACHER_CONFIGS; do configs+=(--config "$c"); done

launch fit "${configs[@]}" --config configs/trainer/fsdp_teacher.yaml \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
    --trainer.default_root_dir "$TEACHER_RUN" --trainer.logger.init_args.save_dir "$TEACHER_RUN" \
    --model.init_args.model "$MODEL" --model.init_args.export_dir "$TEACHER_RUN/teacher" \
    --data.source.path "$DATA" --data.source.preset "$PRESET" --data.item_fields "$ITEM_FIELDS" \
    --data.annotations "$ANNOTATIONS" \
    --ckpt_path last
