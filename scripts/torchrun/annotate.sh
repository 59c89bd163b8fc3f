#!/bin/bash
# Chains of thought with LLM self-consistency on one GPU of one machine (annotate is one process; it resumes when run
# again). The other stages: teacher_fit.sh, teacher_cache.sh, student_fit.sh.
#   DATA=/data/esci/examples.parquet bash scripts/torchrun/annotate.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ANNOTATE_CONFIG=${ANNOTATE_CONFIG:-configs/annotate/llm_local.yaml}

ellm-mkd annotate --config "$ANNOTATE_CONFIG" \
    --data.source.path "$DATA" --data.source.preset "$PRESET" --data.item_fields "$ITEM_FIELDS" \
    --llm.backend.init_args.model "$MODEL" --llm.backend.init_args.dtype bfloat16 \
    --splits "[train,val]" --out "$ANNOTATIONS" --progress false
