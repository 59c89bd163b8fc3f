"""Teacher-labelled augmentation: sampled and file pairs, leakage rules, teacher join, the whole flow via the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import write_cache

from datamodules.augment import Augmentation
from datamodules.datamodule import RelevanceDataModule
from datamodules.teacher_signal import CachedTeacher
from ellm_mkd.schema import normalize_text
from ellm_mkd.teacher_cache import TeacherCache, TeacherSignal
from lightning_modules.cross_encoder import PairInputs

REPO = Path(__file__).resolve().parent.parent
ITEM_FIELDS = ["title", "brand", "color", "attributes"]


def dm_with(data: Path, **kw) -> RelevanceDataModule:
    dm = RelevanceDataModule({"path": str(data)}, item_fields=ITEM_FIELDS, **kw)
    dm.setup("fit")
    return dm


def test_sampled_pairs(synth_dir):
    plain = dm_with(synth_dir)
    dm = dm_with(synth_dir, augment={"items_per_query": 3, "seed": 0})
    labelled = plain.datasets["train"].rows
    aug = [r for r in dm.datasets["train"].rows if r.get("augmented")]
    train_queries = {r["query_id"] for r in labelled}
    assert len(aug) == 3 * len(train_queries)
    assert dm.datasets["train"].rows[: len(labelled)] == labelled  # labelled rows untouched
    judged = {(r["query_id"], r["item_id"]) for r in labelled}
    assert not {(r["query_id"], r["item_id"]) for r in aug} & judged  # never a pair that has a label
    assert len({r["example_id"] for r in aug}) == len(aug)
    assert {r["query_id"] for r in aug} == train_queries  # training queries only: nothing held out leaks in
    assert all(r["label"] is None and r["grade"] is None and set(r["dims"]) == {None} for r in aug)
    items = {r["item_id"]: r["item_text"] for r in labelled}
    assert all(items[r["item_id"]] == r["item_text"] for r in aug)
    for split in ("val", "test"):  # evaluation untouched
        assert dm.datasets[split].rows == plain.datasets[split].rows
    again = dm_with(synth_dir, augment={"items_per_query": 3, "seed": 0})
    other = dm_with(synth_dir, augment={"items_per_query": 3, "seed": 1})
    ids = lambda d: [r["example_id"] for r in d.datasets["train"].rows if r.get("augmented")]  # noqa: E731
    assert ids(again) == ids(dm) and ids(other) != ids(dm)
    batch = dm.collator()([aug[0], labelled[0]])
    assert batch["labels"].tolist()[0] == -100 and torch.isnan(batch["grades"][0])


def test_file_pairs_leave_out_held_out_queries_and_judged_pairs(synth_dir, tmp_path):
    plain = dm_with(synth_dir)
    tr, te = plain.datasets["train"].rows, plain.datasets["test"].rows
    raw = {r["example_id"]: r for r in plain.table.to_pylist()}
    path = tmp_path / "unlabelled.csv"
    rows = [  # query, item id, title
        (tr[0]["query"], "new-1", "Cordless drill 18V"),  # kept
        (te[0]["query"], "new-2", "Cordless drill 18V"),  # test query: left out
        (tr[1]["query"], raw[tr[1]["example_id"]]["item_id"], raw[tr[1]["example_id"]]["title"]),  # judged: left out
        ("a query nobody typed before", "new-3", "Garden hose 50 ft"),  # kept, a new query
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "product_id", "title"])
        w.writerows(rows)
    src = {"path": str(path), "require_label": False, "mapping": {"item_id": "product_id"}}
    dm = dm_with(synth_dir, augment={"source": src})
    aug = [r for r in dm.datasets["train"].rows if r.get("augmented")]
    assert sorted(r["item_id"] for r in aug) == ["new-1", "new-3"]
    new = next(r for r in aug if r["item_id"] == "new-3")
    assert (
        new["query_id"] not in {r["query_id"] for r in tr}
        and dm._query_index[normalize_text(new["query"])] == new["query_id"]
    )
    with pytest.raises(ValueError, match="items_per_query"):
        Augmentation()


def test_teacher_join_keeps_covered_pairs_and_soft_targets_reach_them(synth_dir, tmp_path, minilm_tokenizer):
    dm = dm_with(synth_dir, augment={"items_per_query": 2})
    rows = [r for ds in dm.datasets.values() for r in ds.rows]
    aug = [r for r in rows if r.get("augmented")]
    covered = {r["example_id"] for r in aug[::2]}
    sigs = [
        TeacherSignal(
            r["example_id"], r["query"], r["item_text"], [0.1, 0.2, 0.3, 0.4][: dm.num_levels], None, "", None, [], None
        )
        for r in rows
        if not r.get("augmented") or r["example_id"] in covered
    ]
    write_cache(tmp_path / "cache", dm, sigs)
    joined = dm_with(synth_dir, augment={"items_per_query": 2}, teacher=CachedTeacher(str(tmp_path / "cache")))
    joined.connect(layout=PairInputs(minilm_tokenizer, 128))
    kept = [r for r in joined.datasets["train"].rows if r.get("augmented")]
    assert {r["example_id"] for r in kept} == covered  # the rest have nothing to learn from
    batch = joined.collator()(kept[:4])
    assert batch["teacher_present"].all() and (batch["labels"] == -100).all()
    assert torch.allclose(batch["teacher_probs"][0], torch.tensor([0.1, 0.2, 0.3, 0.4][: dm.num_levels]))


@pytest.mark.integration
def test_cache_writer_labels_augmented_pairs_and_a_student_distils_them(tiny_llama, tiny_encoder, tmp_path):
    """The flow a user runs: the cache written over train with the augment setting, then a student
    with the same setting trains with MKD and no missing-signal error."""
    from datamodules.synth import SynthConfig, write
    from ellm_mkd.commands.main import main

    data = tmp_path / "data"
    write(data, SynthConfig(seed=2, num_queries=30, items_per_query=6))
    aug = ["--data.augment.items_per_query", "2", "--data.augment.seed", "0"]
    cache = tmp_path / "cache"
    main(
        [
            "predict",
            "--config",
            str(REPO / "configs" / "teacher" / "cache_smollm2_direct.yaml"),
            "--model.init_args.model",
            tiny_llama,
            "--data.source.path",
            str(data),
            "--data.predict_split",
            "train",
            "--trainer.callbacks.init_args.cache_dir",
            str(cache),
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.precision",
            "32-true",
            "--trainer.default_root_dir",
            str(tmp_path / "predict_run"),
            *aug,
        ]
    )
    dm = dm_with(data, augment={"items_per_query": 2, "seed": 0})
    n_aug = sum(1 for r in dm.datasets["train"].rows if r.get("augmented"))
    assert n_aug > 0 and TeacherCache(cache).manifest["row_count"] == len(dm.datasets["train"])
    from ellm_mkd.commands.lightning_cli import cli_main

    cli = cli_main(
        [
            "--config",
            str(REPO / "configs" / "students" / "cross_encoder.yaml"),
            "--model.init_args.encoder",
            tiny_encoder,
            "--data.source.path",
            str(data),
            "--data.item_fields",
            "[" + ",".join(ITEM_FIELDS) + "]",
            *aug,
            "--data.teacher",
            "datamodules.teacher_signal.CachedTeacher",
            "--data.teacher.cache_dir",
            str(cache),
            "--distill.enabled",
            "true",
            "--distill.w_rationale",
            "0",
            "--distill.w_rationale_embedding",
            "0",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.precision",
            "32-true",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    augmented = [r for r in cli.datamodule.datasets["train"].rows if r.get("augmented")]
    assert len(augmented) == n_aug and all(cli.datamodule.teacher.covers(r["example_id"]) for r in augmented)
    # the distillation terms were computed (augmented rows have no label: only these terms see them)
    assert {"train/loss/soft", "train/loss/dim_kd"} <= set(cli.trainer.callback_metrics)
