"""``ellm-mkd bench packing``: what packing pairs that share a prompt prefix into one row saves the teacher.

The teacher's prompts begin with the same fixed instructions; ``pack_tokens`` (``TeacherLM``, ``TeacherReadout``)
packs the token sequences of a batch into rows where that shared part is computed once and each pair hangs off it
with its own attention mask and position ids (``ellm_mkd.candidate_scoring._pack``). For each ``pack_tokens``
setting, on the same training batches of a labelled catalog and from the same weights:

1. tokens through the model per batch (candidate words and padding included) and the loss of the first batch
   (the settings must agree: packing changes what is computed, never the result);
2. seconds per training step (forward, backward and the fused AdamW step of every trained weight), the mean over
   ``steps`` steps after one warm-up step;
3. direct-readout throughput (pairs/s) on ``readout_pairs`` validation pairs.

Writes ``docs/results/<name>.json`` and the ``<name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import itertools
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from .common import fmt, options, options_parser, publish, result_head, section_head


@dataclass
class PackingBenchOptions:
    """Options of ``ellm-mkd bench packing`` (each a ``--name`` flag; ``--config FILE`` reads them from YAML).

    Args:
        data: the labelled examples (a directory or file the readers take)
        annotations: their annotated chains (``ellm-mkd annotate``)
        item_fields: item fields rendered into the product text
        teacher_model: bundled name, local Hugging Face directory or hub id
        use_lora: train a LoRA adapter (false: every weight, as the recipe of ``configs/teacher/overlays``)
        train_modes: responses learned per example (direct, cot)
        batch_size: pairs per training step
        steps: timed training steps per setting (after one warm-up step)
        pack_tokens: the settings compared (0: a row per pair)
        readout_pairs: validation pairs read per setting
        eval_batch_size: pairs per readout batch
        seed: order of the training batches
        name: benchmark name (the JSON file and the markdown section)
        out_json: default docs/results/<name>.json
        out_md: markdown file whose <name> section is replaced
    """

    data: str = "runs/demo/data"
    annotations: str = "runs/demo/annotations"
    item_fields: list[str] = field(default_factory=lambda: ["title", "brand", "color", "attributes"])
    teacher_model: str = "smollm2-135m-instruct"
    use_lora: bool = False
    train_modes: list[str] = field(default_factory=lambda: ["direct"])
    batch_size: int = 8
    steps: int = 4
    pack_tokens: list[int] = field(default_factory=lambda: [0, 1024])
    readout_pairs: int = 128
    eval_batch_size: int = 32
    seed: int = 0
    name: str = "teacher_packing"
    out_json: str | None = None
    out_md: str = "docs/benchmarks.md"


def _tokens(m: Any, batch: dict[str, Any], pack: int) -> tuple[int, int]:
    """``(rows, tokens)`` of the model input of ``batch``'s responses (candidate words and padding included), per
    train mode summed."""
    from ellm_mkd.candidate_scoring import _pack, _plan
    from lightning_modules.teacher_objective import build_responses

    rows = tokens = 0
    for mode in m.hparams.train_modes:
        r = build_responses(m.readout, batch, mode, m.hparams.max_seq_length, m.level_names)
        trees, tree_of, _ = _pack(r.sequences, pack)
        _plan(trees, tree_of, r.sequences, r.points)  # hangs the candidate words off the texts, as a step does
        rows += len(trees)
        tokens += len(trees) * max(len(t) for t in trees)
    return rows, tokens


def bench_packing(opts, command: str) -> dict[str, Any]:
    import torch

    from datamodules.datamodule import RelevanceDataModule
    from datamodules.inputs import TextInputs
    from lightning_modules import TeacherLM

    torch.manual_seed(opts.seed)
    dm = RelevanceDataModule(
        {"path": opts.data},
        annotations=opts.annotations,
        item_fields=list(opts.item_fields),
        batch_size=opts.batch_size,
    )
    dm.connect(layout=TextInputs())
    dm.setup("fit")
    batches = list(itertools.islice(iter(dm.train_dataloader()), opts.steps + 1))
    val = dm.datasets["val"].rows[: opts.readout_pairs]
    m = TeacherLM(
        model=opts.teacher_model, num_levels=dm.num_levels, use_lora=opts.use_lora, train_modes=list(opts.train_modes)
    )
    m.level_names = tuple(dm.level_names)
    m.level_grades = torch.arange(dm.num_levels, dtype=torch.float32)
    start = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
    trained = [p for p in m.model.parameters() if p.requires_grad]
    settings = []
    for pack in opts.pack_tokens:
        m.model.load_state_dict(start)
        m.hparams.pack_tokens = pack
        m.readout.pack_tokens = pack
        m.train()
        with torch.no_grad():
            first_loss = float(m.objective(batches[0])[0])
        opt = torch.optim.AdamW(trained, lr=1e-5, fused=True)
        times = []
        for b in batches:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            m.objective(b)[0].backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        shapes = [_tokens(m, b, pack) for b in batches]
        m.eval()
        with torch.inference_mode():  # one untimed batch: first-call costs are nobody's
            m.readout.direct([r["query"] for r in val[:4]], [r["item_text"] for r in val[:4]])
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(val), opts.eval_batch_size):
                chunk = val[i : i + opts.eval_batch_size]
                m.readout.direct([r["query"] for r in chunk], [r["item_text"] for r in chunk])
        readout_s = time.perf_counter() - t0
        del opt
        settings.append(
            {
                "pack_tokens": pack,
                "rows_per_batch": sum(r for r, _ in shapes) / len(shapes),
                "tokens_per_batch": sum(t for _, t in shapes) / len(shapes),
                "first_batch_loss": first_loss,
                "step_s": sum(times[1:]) / max(len(times) - 1, 1),
                "readout_pairs_per_s": len(val) / readout_s,
            }
        )
    base = settings[0]
    for s in settings:
        s["step_speedup"] = base["step_s"] / s["step_s"]
        s["readout_speedup"] = s["readout_pairs_per_s"] / base["readout_pairs_per_s"]
        s["loss_difference"] = abs(s["first_batch_loss"] - base["first_batch_loss"])
    return {
        **result_head(opts.name, command),
        "setup": {
            "data": opts.data,
            "teacher_model": opts.teacher_model,
            "use_lora": opts.use_lora,
            "train_modes": list(opts.train_modes),
            "batch_size": opts.batch_size,
            "steps": opts.steps,
            "readout_pairs": len(val),
            "eval_batch_size": opts.eval_batch_size,
            "threads": torch.get_num_threads(),
        },
        "settings": settings,
    }


def markdown_section(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        *section_head(result),
        f"`{s['teacher_model']}` ({'LoRA' if s['use_lora'] else 'every weight trained'}, train modes "
        f"{', '.join(s['train_modes'])}): per setting, from the same weights, one untimed warm-up step and "
        f"{s['steps']} timed steps on the same batches of {s['batch_size']} pairs of `{s['data']}`, then the direct "
        "readout of "
        f"{s['readout_pairs']} validation pairs at batch {s['eval_batch_size']}; `pack_tokens` 0 is a row per pair.",
        "",
        "| pack_tokens | rows / batch | tokens / batch (with padding) | loss, batch 1 | s / step | step speed-up "
        "| readout pairs/s | readout speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["settings"]:
        lines.append(
            f"| {r['pack_tokens']} | {r['rows_per_batch']:.1f} | {r['tokens_per_batch']:.0f} | "
            f"{fmt(r['first_batch_loss'], 5)} | {r['step_s']:.2f} | {r['step_speedup']:.2f}x | "
            f"{r['readout_pairs_per_s']:.1f} | {r['readout_speedup']:.2f}x |"
        )
    lines.append(f"<!-- /bench:{result['benchmark']} -->")
    return "\n".join(lines)


def bench_packing_main(argv: list[str]) -> int:
    parser = options_parser(PackingBenchOptions, "ellm-mkd bench packing", __doc__.split("\n\n")[0])
    opts = options(PackingBenchOptions, parser.parse_args(argv))
    result = bench_packing(opts, "ellm-mkd bench packing " + shlex.join(argv))
    publish(result, opts, markdown_section(result))
    return 0
