#!/usr/bin/env bash
# GPU check (issue 20, item 6): the student, teacher and teacher-cache throughput benchmarks and the demo on one
# CUDA GPU (bf16 autocast, fused AdamW, batched generation with a static cache), merged into one JSON file,
# docs/results/gpu.json: the device and versions, each stage's exact command, wall seconds and figures, and each
# benchmark's own result. It downloads nothing (HF_HUB_OFFLINE=1) and writes nothing else under docs/.
#
#   scripts/gpu_check.sh                                  # sized to finish in about 8 minutes on one H200
#   GPU_CHECK_STAGES="students teacher" scripts/gpu_check.sh
#
# Every size is an environment variable (the defaults are below); GPU_CHECK_<STAGE>_ARGS are appended to a
# stage's command, so they override its sizes. Stages: students, teacher, cache, demo (in that order by default:
# the most wanted figures first). Each stage runs under `timeout`, within what is left of GPU_CHECK_BUDGET_S;
# a stage that fails or times out is recorded (rc, the end of its log) and the next one runs; the JSON is
# rewritten after every stage; the exit status is non-zero when any stage failed.
#
# Without a CUDA GPU it stops at once with a message, unless GPU_CHECK_ALLOW_CPU=1: then the same stages run on
# the CPU (a check of this script and of the commands; the figures are not GPU figures and say so).
# docs/cluster.md, "GPU check", says what a GPU machine needs (packages, bundled weights) and how to read the JSON.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---- settings (environment) ---------------------------------------------------------------------------------
STAGES=${GPU_CHECK_STAGES:-students teacher cache demo}
WORK=${GPU_CHECK_WORK:-$REPO/runs/gpu_check}
RESULT=${GPU_CHECK_OUT:-${OUT:-$REPO/docs/results/gpu.json}}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
PRECISION=${GPU_CHECK_PRECISION:-bf16-mixed}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}            # the whole run, preflight included; 0: no limit
STAGE_TIMEOUT_S=${GPU_CHECK_STAGE_TIMEOUT_S:-0} # one stage at most; 0: what is left of the budget
TEACHER_MODEL=${GPU_CHECK_TEACHER_MODEL:-smollm2-135m-instruct}
ENCODER=${GPU_CHECK_ENCODER:-minilm-l6}
# students: both student configs on a synthetic catalog, one epoch, beside the sentence-transformers baseline
STUDENTS_QUERIES=${GPU_CHECK_STUDENTS_QUERIES:-600}
STUDENTS_EPOCHS=${GPU_CHECK_STUDENTS_EPOCHS:-1}
# teacher: LoRA steps, quality (zero-shot and LoRA, direct and cot) and readout speed
TEACHER_QUERIES=${GPU_CHECK_TEACHER_QUERIES:-300}
TEACHER_STEPS=${GPU_CHECK_TEACHER_STEPS:-60}
TEACHER_BATCH=${GPU_CHECK_TEACHER_BATCH:-16}
TEACHER_EVAL_PAIRS=${GPU_CHECK_TEACHER_EVAL_PAIRS:-128}
TEACHER_EVAL_BATCH=${GPU_CHECK_TEACHER_EVAL_BATCH:-64}
TEACHER_NAIVE_PAIRS=${GPU_CHECK_TEACHER_NAIVE_PAIRS:-8}
TEACHER_MAX_NEW_TOKENS=${GPU_CHECK_TEACHER_MAX_NEW_TOKENS:-128}
# cache: direct and cot cache writes, student epochs with and without the cache joined
CACHE_QUERIES=${GPU_CHECK_CACHE_QUERIES:-150}
CACHE_DIRECT_BATCH=${GPU_CHECK_CACHE_DIRECT_BATCH:-64}
CACHE_COT_PAIRS=${GPU_CHECK_CACHE_COT_PAIRS:-128}
CACHE_COT_BATCH=${GPU_CHECK_CACHE_COT_BATCH:-64}
CACHE_REPEATS=${GPU_CHECK_CACHE_REPEATS:-2}
# demo: ellm-mkd demo at this scale (the demo always uses the bundled SmolLM2 and MiniLM)
DEMO_SCALE=${GPU_CHECK_DEMO_SCALE:-default}
read -r -a STUDENTS_ARGS <<<"${GPU_CHECK_STUDENTS_ARGS:-}"
read -r -a TEACHER_ARGS <<<"${GPU_CHECK_TEACHER_ARGS:-}"
read -r -a CACHE_ARGS <<<"${GPU_CHECK_CACHE_ARGS:-}"
read -r -a DEMO_ARGS <<<"${GPU_CHECK_DEMO_ARGS:-}"

die() {
    echo "gpu_check: $*" >&2
    exit 2
}
now() { date +%s.%N; }
T_START=$(now)

for s in $STAGES; do
    case $s in students | teacher | cache | demo) ;; *) die "unknown stage '$s' in GPU_CHECK_STAGES (students teacher cache demo)" ;; esac
done

# ---- the Python that runs everything --------------------------------------------------------------------------
# GPU_CHECK_PYTHON, else the first of .venv/bin/python and python3 whose torch sees a CUDA device, else the first
# that imports torch (a CUDA machine's image may hold torch outside the project's .venv, which is often a CPU build)
pick_python() {
    local c found=""
    for c in "$REPO/.venv/bin/python" python3 python; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
        if [[ -z $found ]] && "$c" -c 'import torch' >/dev/null 2>&1; then found=$c; fi
    done
    [[ -n $found ]] || return 1
    echo "$found"
}
if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
    PY=$GPU_CHECK_PYTHON
else
    PY=$(pick_python) || die "no Python with torch found (.venv/bin/python, python3); set GPU_CHECK_PYTHON"
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" # the repository's packages, installed or not
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 # nothing is downloaded
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# ---- result path, work directory ------------------------------------------------------------------------------
LOG_COPY=""
if [[ -d $RESULT || $RESULT == */ ]]; then # a folder (a device machine's $OUT): gpu.json and the logs go there
    LOG_COPY=${RESULT%/}/gpu_check_logs
    RESULT=${RESULT%/}/gpu.json
fi
mkdir -p "$(dirname "$RESULT")"
RESULT=$(cd "$(dirname "$RESULT")" && pwd)/$(basename "$RESULT")
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK/stages" "$WORK/logs"
mkdir -p "$WORK/stages" "$WORK/logs"

# ---- preflight: device, versions, packages, models ------------------------------------------------------------
NVSMI=""
if command -v nvidia-smi >/dev/null 2>&1; then
    NVSMI=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true)
fi
echo "gpu_check: python $PY; work $WORK; result $RESULT"
rc=0
GPU_CHECK_NVSMI=$NVSMI GPU_CHECK_STAGE_LIST=$STAGES GPU_CHECK_TEACHER_MODEL=$TEACHER_MODEL GPU_CHECK_ENCODER=$ENCODER \
    "$PY" - "$WORK/stages/env.json" "$ALLOW_CPU" <<'PY' || rc=$?
import importlib, importlib.metadata, json, os, platform, sys, time

out, allow_cpu = sys.argv[1], sys.argv[2] == "1"
import torch

cuda = torch.cuda.is_available()
if not cuda and not allow_cpu:
    print(
        f"gpu_check: torch.cuda.is_available() is False ({sys.executable}: torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda}). Run this on a machine with a CUDA GPU and a CUDA build of torch (GPU_CHECK_PYTHON "
        "picks the interpreter), or set GPU_CHECK_ALLOW_CPU=1 to run the same stages on the CPU (a check of the "
        "script, not GPU figures).",
        file=sys.stderr,
    )
    sys.exit(2)
stages = os.environ["GPU_CHECK_STAGE_LIST"].split()
# module -> distribution: what LightningCLI, the benchmarks and the demo import (jsonargparse[signatures] included)
needed = {"lightning": "lightning", "transformers": "transformers", "peft": "peft", "torchmetrics": "torchmetrics",
          "jsonargparse": "jsonargparse", "docstring_parser": "docstring-parser", "typeshed_client": "typeshed-client",
          "gguf": "gguf", "pyarrow": "pyarrow", "yaml": "PyYAML", "filelock": "filelock"}
if "students" in stages:
    needed.update(sentence_transformers="sentence-transformers", sklearn="scikit-learn", datasets="datasets")
if "demo" in stages:
    needed.update(matplotlib="matplotlib", tensorboard="tensorboard")
versions, missing = {}, []
for name, dist in needed.items():
    try:
        importlib.import_module(name)
        versions[dist] = importlib.metadata.version(dist)
    except Exception as e:  # noqa: BLE001 - any failure to import is reported
        versions[dist] = None
        missing.append(f"{dist} (import {name}: {type(e).__name__}: {e})")
for name in ("ellm_mkd.commands.main", "ellm_mkd.commands.bench.students", "ellm_mkd.commands.bench.teacher",
             "ellm_mkd.commands.bench.cache", "ellm_mkd.commands.demo"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
models = {}
if not missing:
    from ellm_mkd.models import resolve_model

    wanted = {os.environ["GPU_CHECK_TEACHER_MODEL"], os.environ["GPU_CHECK_ENCODER"]}
    if "demo" in stages:
        wanted |= {"smollm2-135m-instruct", "minilm-l6"}
    for name in sorted(wanted):
        t = time.perf_counter()  # a bundled GGUF is dequantised once here, outside the timed stages
        try:
            models[name] = {"path": str(resolve_model(name)), "resolve_seconds": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001
            missing.append(f"model {name} ({type(e).__name__}: {e})")
if missing:
    print("gpu_check: cannot run, missing:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(3)
from ellm_mkd.commands.bench.common import machine_description

device = {"nvidia_smi": [l.strip() for l in os.environ.get("GPU_CHECK_NVSMI", "").splitlines() if l.strip()]}
if cuda:
    p = torch.cuda.get_device_properties(0)
    device.update(
        name=p.name,
        count=torch.cuda.device_count(),
        capability=f"{p.major}.{p.minor}",
        memory_gib=round(p.total_memory / 2**30, 1),
        multiprocessors=p.multi_processor_count,
        bf16_supported=torch.cuda.is_bf16_supported(),
    )
else:
    device.update(name="cpu (GPU_CHECK_ALLOW_CPU=1: no GPU; these are not GPU figures)")
env = {
    "accelerator": "gpu" if cuda else "cpu",
    "device": device,
    "versions": {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        **versions,
    },
    "machine": machine_description(),
    "cpu_count": os.cpu_count(),
    "models": models,
}
with open(out, "w") as f:
    json.dump(env, f, indent=2)
print(f"gpu_check: {env['device']['name']}; torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
[[ $rc -eq 0 ]] || exit "$rc"
# the settings in effect (defaults included), for the JSON
for v in STAGES WORK RESULT ALLOW_CPU PRECISION BUDGET_S STAGE_TIMEOUT_S TEACHER_MODEL ENCODER STUDENTS_QUERIES \
    STUDENTS_EPOCHS TEACHER_QUERIES TEACHER_STEPS TEACHER_BATCH TEACHER_EVAL_PAIRS TEACHER_EVAL_BATCH \
    TEACHER_NAIVE_PAIRS TEACHER_MAX_NEW_TOKENS CACHE_QUERIES CACHE_DIRECT_BATCH CACHE_COT_PAIRS CACHE_COT_BATCH \
    CACHE_REPEATS DEMO_SCALE; do
    printf 'GPU_CHECK_%s=%s\n' "$v" "${!v}"
done >"$WORK/stages/settings.env"
for v in STUDENTS_ARGS TEACHER_ARGS CACHE_ARGS DEMO_ARGS; do
    n=GPU_CHECK_$v
    printf '%s=%s\n' "$n" "${!n:-}"
done >>"$WORK/stages/settings.env"
ACCEL=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["accelerator"])' "$WORK/stages/env.json")

# ---- merge: the JSON of every stage so far into one file (rewritten after each stage) ---------------------------
merge() {
    "$PY" - "$WORK" "$RESULT" "$T_START" "$STAGES" <<'PY'
import json, os, sys, time
from pathlib import Path

work, result, t_start, stages = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
env = json.loads((work / "stages" / "env.json").read_text())


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def known(d):  # the keys whose value is known
    return {k: v for k, v in d.items() if v is not None}


def figures(name, res):
    """The throughput figures (and a few quality figures) of one stage's own result."""
    if res is None:
        return {}
    if name == "students":
        out = {}
        for r in res.get("rows", []):
            if "throughput" not in r:
                continue
            c = r.get("config", {})
            out[r["name"]] = known({
                **r["throughput"],
                "optimizer": c.get("optimizer"),
                "precision": c.get("precision"),
                "accelerator": c.get("accelerator"),
                "batch_size": c.get("batch_size"),
                "eval_batch_size": c.get("eval_batch_size"),
                "train_pairs": c.get("train_pairs"),
                "test_pairs": c.get("test_pairs"),
                "auc": r.get("metrics", {}).get("auc"),
                "ndcg10": r.get("metrics", {}).get("ndcg10"),
            })
        return out
    if name == "teacher":
        s = res.get("setup", {})
        return {
            **res.get("throughput", {}),
            **known({k: s.get(k) for k in ("train_seconds_per_step", "train_seconds", "batch_size", "eval_pairs",
                                              "eval_batch_size", "max_new_tokens", "precision", "accelerator",
                                              "optimizer")}),
            "quality": {r["name"]: r["metrics"] for r in res.get("rows", [])},
        }
    if name == "cache":
        se = res.get("student_epoch", {})
        runs = se.get("runs", {})
        return {
            "writes": {w["mode"]: {k: w[k] for k in ("pairs_per_s", "rows", "batch_size", "bytes_per_example",
                                                     "predict_loop_seconds", "parse_failures")} for w in res.get("writes", [])},
            "student_epoch_median_seconds": se.get("median_seconds"),
            "student_train_pairs_per_s": {
                k: sorted(r["pairs_per_s"] for r in v)[len(v) // 2] for k, v in runs.items() if v
            },
            "join_overhead": se.get("overhead"),
            **known({k: res.get("setup", {}).get(k) for k in ("precision", "accelerator")}),
        }
    if name == "demo":
        keys = ("auc", "ndcg10", "rmse", "macro_f1", "accuracy")
        runs = {k: v for k, v in res.items() if isinstance(v, dict) and "test" in v}
        return {
            "scale": res.get("scale"),
            "timings_seconds": res.get("timings_seconds"),
            "cache": {k: res.get("cache", {}).get(k) for k in ("rows", "seconds", "readout")},
            "test": {k: {m: v["test"][m] for m in keys if m in v["test"]} for k, v in runs.items()},
            "fit_seconds": {k: v["fit_seconds"] for k, v in runs.items() if "fit_seconds" in v},
        }
    return {}


out_files = {"students": "students/students.json", "teacher": "teacher/teacher.json", "cache": "cache/cache.json",
             "demo": "demo/metrics.json"}
records, commands, walls = {}, {}, {}
for name in stages.split():
    status = work / "stages" / f"{name}.status"
    if not status.exists():
        continue
    rc, wall = status.read_text().split()
    rc, wall = int(rc), round(float(wall), 1)
    cmd = (work / "stages" / f"{name}.cmd").read_text().strip()
    res = load(work / out_files[name]) if rc == 0 else None
    log = work / "logs" / f"{name}.log"
    rec = {"ok": rc == 0 and res is not None, "rc": rc, "wall_seconds": wall, "command": cmd, "log": str(log)}
    if rc == 124 or rc == 137:
        rec["timed_out"] = True
    if rc == 0 and res is None:
        rec["error"] = f"the stage exited 0 but wrote no {out_files[name]}"
    if not rec["ok"] and log.exists():
        rec["log_tail"] = log.read_text(errors="replace").splitlines()[-40:]
    rec["figures"] = figures(name, res)
    if res is not None:
        rec["result"] = res
    records[name], commands[name], walls[name] = rec, cmd, wall
skipped = [s for s in stages.split() if s not in records]
gpu = {
    "check": "scripts/gpu_check.sh",
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "ok": bool(records) and all(r["ok"] for r in records.values()) and not skipped,
    "gpu": env["accelerator"] == "gpu",
    **({} if env["accelerator"] == "gpu" else {"note": "GPU_CHECK_ALLOW_CPU=1: run on the CPU; not GPU figures"}),
    "device": env["device"],
    "versions": env["versions"],
    "machine": env["machine"],
    "models": env["models"],
    "settings": dict(line.split("=", 1) for line in (work / "stages" / "settings.env").read_text().splitlines()),
    "wall_seconds": {**walls, "total": round(time.time() - t_start, 1)},
    "commands": commands,
    "stages": records,
    **({"not_run": skipped} if skipped else {}),
}
tmp = result.with_name(f".{result.name}.tmp")
tmp.write_text(json.dumps(gpu, indent=2, allow_nan=False, default=str) + "\n")
os.replace(tmp, result)
PY
}

# ---- one stage: its command, under timeout, logged, timed -----------------------------------------------------
FAILED=0
run_stage() { # name command...
    local name=$1
    shift
    local log="$WORK/logs/$name.log" limit=0 t0 t1 rc=0
    if [[ $BUDGET_S -gt 0 ]]; then
        limit=$(awk -v b="$BUDGET_S" -v s="$T_START" -v n="$(now)" 'BEGIN { l = int(b - (n - s)); print (l > 0 ? l : 0) }')
        if [[ $limit -lt 10 ]]; then
            echo "gpu_check: $name: not run (GPU_CHECK_BUDGET_S=$BUDGET_S spent)" >&2
            FAILED=1
            return 0
        fi
    fi
    if [[ $STAGE_TIMEOUT_S -gt 0 && ($limit -eq 0 || $STAGE_TIMEOUT_S -lt $limit) ]]; then limit=$STAGE_TIMEOUT_S; fi
    "$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@" >"$WORK/stages/$name.cmd"
    local within=""
    if [[ $limit -gt 0 ]]; then within=" (timeout ${limit}s)"; fi
    echo "gpu_check: [$name] $(cat "$WORK/stages/$name.cmd")$within"
    t0=$(now)
    if [[ $limit -gt 0 ]]; then
        (cd "$WORK" && timeout --kill-after=20 "$limit" "$@") >"$log" 2>&1 || rc=$?
    else
        (cd "$WORK" && "$@") >"$log" 2>&1 || rc=$?
    fi
    t1=$(now)
    echo "$rc $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >"$WORK/stages/$name.status"
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        echo "gpu_check: [$name] FAILED (exit $rc); the end of $log:" >&2
        tail -n 25 "$log" >&2 || true
    else
        echo "gpu_check: [$name] done in $(cut -d' ' -f2 "$WORK/stages/$name.status") s"
    fi
    merge_or_say
    if [[ -n $LOG_COPY ]]; then mkdir -p "$LOG_COPY" && cp "$log" "$LOG_COPY/"; fi
}
merge_or_say() {
    if ! merge; then
        FAILED=1
        echo "gpu_check: could not write $RESULT (the stage logs and results stay under $WORK)" >&2
    fi
}

EM=("$PY" -m ellm_mkd)
STUDENT_CONFIGS="[\"$REPO/configs/students/cross_encoder.yaml\",\"$REPO/configs/students/two_tower.yaml\"]"

for stage in $STAGES; do
    case $stage in
    students)
        rm -rf "$WORK/students" "$WORK/runs"
        rc=0
        "${EM[@]}" data synth --out "$WORK/students/catalog" --num_queries "$STUDENTS_QUERIES" \
            >"$WORK/logs/students_catalog.log" 2>&1 || rc=$?
        if [[ $rc -ne 0 ]]; then # recorded as the students stage's failure; the other stages still run
            FAILED=1
            echo "gpu_check: [students] the catalog could not be written:" >&2
            tail -n 25 "$WORK/logs/students_catalog.log" >&2 || true
            cp "$WORK/logs/students_catalog.log" "$WORK/logs/students.log"
            "$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${EM[@]}" data synth \
                --out "$WORK/students/catalog" --num_queries "$STUDENTS_QUERIES" >"$WORK/stages/students.cmd"
            echo "$rc 0" >"$WORK/stages/students.status"
            merge_or_say
            if [[ -n $LOG_COPY ]]; then mkdir -p "$LOG_COPY" && cp "$WORK/logs/students.log" "$LOG_COPY/"; fi
            continue
        fi
        overrides=$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \
            "trainer.accelerator=$ACCEL" "trainer.devices=1" "trainer.precision=$PRECISION" \
            "data.source.path=$WORK/students/catalog" "model.init_args.encoder=$ENCODER")
        run_stage students "${EM[@]}" bench students --configs "$STUDENT_CONFIGS" --epochs "$STUDENTS_EPOCHS" \
            --override "$overrides" --name gpu_students --work_dir "$WORK/students" \
            --out_json "$WORK/students/students.json" --out_md "$WORK/students/benchmarks.md" ${STUDENTS_ARGS[@]+"${STUDENTS_ARGS[@]}"}
        ;;
    teacher)
        rm -rf "$WORK/teacher"
        run_stage teacher "${EM[@]}" bench teacher --accelerator "$ACCEL" --precision "$PRECISION" \
            --model "$TEACHER_MODEL" --work_dir "$WORK/teacher" --num_queries "$TEACHER_QUERIES" \
            --steps "$TEACHER_STEPS" --batch_size "$TEACHER_BATCH" --eval_pairs "$TEACHER_EVAL_PAIRS" \
            --eval_batch_size "$TEACHER_EVAL_BATCH" --naive_pairs "$TEACHER_NAIVE_PAIRS" \
            --max_new_tokens "$TEACHER_MAX_NEW_TOKENS" --name gpu_teacher \
            --out_json "$WORK/teacher/teacher.json" --out_md "$WORK/teacher/benchmarks.md" ${TEACHER_ARGS[@]+"${TEACHER_ARGS[@]}"}
        ;;
    cache)
        rm -rf "$WORK/cache"
        mkdir -p "$WORK/cache"
        student_config=configs/students/cross_encoder.yaml
        if [[ $ENCODER != minilm-l6 ]]; then # the cross-encoder config with GPU_CHECK_ENCODER in it
            student_config=$WORK/cache/cross_encoder.yaml
            "$PY" - "$REPO/configs/students/cross_encoder.yaml" "$student_config" "$ENCODER" <<'PY'
import sys, yaml

cfg = yaml.safe_load(open(sys.argv[1]))
cfg["model"]["init_args"]["encoder"] = sys.argv[3]
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
PY
        fi
        # the adapter the teacher stage trained, when it ran (else the zero-shot teacher)
        run_stage cache "${EM[@]}" bench cache --accelerator "$ACCEL" --precision "$PRECISION" \
            --model "$TEACHER_MODEL" --adapter "$WORK/teacher/teacher/adapter" --work_dir "$WORK/cache" \
            --num_queries "$CACHE_QUERIES" --direct_batch_size "$CACHE_DIRECT_BATCH" --cot_pairs "$CACHE_COT_PAIRS" \
            --cot_batch_size "$CACHE_COT_BATCH" --repeats "$CACHE_REPEATS" --student_config "$student_config" \
            --name gpu_cache --out_json "$WORK/cache/cache.json" --out_md "$WORK/cache/benchmarks.md" ${CACHE_ARGS[@]+"${CACHE_ARGS[@]}"}
        ;;
    demo)
        rm -rf "$WORK/demo"
        run_stage demo "${EM[@]}" demo --scale "$DEMO_SCALE" --out "$WORK/demo" ${DEMO_ARGS[@]+"${DEMO_ARGS[@]}"}
        ;;
    esac
done
merge_or_say
echo "gpu_check: wrote $RESULT ($(awk -v a="$T_START" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s)"
if [[ $FAILED -ne 0 ]]; then
    echo "gpu_check: some stages failed or did not run; see \"stages\" in $RESULT" >&2
    exit 1
fi
