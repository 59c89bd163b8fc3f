#!/bin/bash
# Student fit with full MKD from the teacher cache over NNODES machines x NPROC_PER_NODE GPUs (DDP), then, on the
# first machine, its export (ONNX + int8, tokenizer, model.json, sentence-transformers folder).
#   NNODES=1 NPROC_PER_NODE=4 STUDENT=two_tower bash scripts/torchrun/student_fit.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
STUDENT=${STUDENT:-cross_encoder}
MKD=${MKD:-full}
STUDENT_RUN=${STUDENT_RUN:-runs/students/$STUDENT}
SHIP=${SHIP:-runs/ship/$STUDENT}

teacher=(--data.teacher.init_args.cache_dir "$CACHE")   # the cache the MKD overlays read (baseline: none)
if [ "$MKD" = baseline ]; then teacher=(); fi

launch fit --config "configs/students/$STUDENT.yaml" --config "configs/mkd/$MKD.yaml" \
    --config configs/trainer/multinode.yaml --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
    --trainer.default_root_dir "$STUDENT_RUN" --trainer.logger.init_args.save_dir "$STUDENT_RUN" \
    --data.source.path "$DATA" --data.source.preset "$PRESET" --data.item_fields "$ITEM_FIELDS" \
    "${teacher[@]}" --ckpt_path last || exit $?

if [ "$NODE_RANK" = 0 ]; then
    ellm-mkd export "$STUDENT_RUN/$MKD/checkpoints/best.ckpt" --out "$SHIP" --overwrite true --quantize true
fi
