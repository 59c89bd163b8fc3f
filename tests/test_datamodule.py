"""RelevanceDataModule: late-bound tokenizer, dynamic padding, input layouts, workers, batch contract."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from datamodules.datamodule import RelevanceDataModule
from datamodules.inputs import InputLayout, TextInputs
from datamodules.text import render_item
from datamodules.validation import DataSource
from ellm_mkd.schema import BUCKETS, DIMENSIONS, VERDICTS
from lightning_modules.cross_encoder import PairInputs
from lightning_modules.two_tower import TowerInputs


def make_dm(synth_dir, **kw) -> RelevanceDataModule:
    dm = RelevanceDataModule(DataSource(path=str(synth_dir)), batch_size=8, **kw)
    dm.setup("fit")
    return dm


def test_setup_reads_example_dir_with_its_splits(synth_dir):
    dm = make_dm(synth_dir)
    assert dm.num_levels == 4 and dm.level_names[-1] == "exact"
    for split in ("train", "val", "test"):
        ids = set(pq.read_table(synth_dir / f"{split}.parquet").column("example_id").to_pylist())
        assert {r["example_id"] for r in dm.datasets[split].rows} == ids
    assert len(dm.datasets["train"]) > len(dm.datasets["test"]) > 0


def test_batch_without_tokenizer_carries_the_contract(synth_dir):
    dm = make_dm(synth_dir)
    batch = next(iter(dm.val_dataloader()))
    n = len(batch["example_id"])
    assert n == 16  # eval batch = 2 x batch_size
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (n,)
    assert batch["grades"].dtype == torch.float32 and torch.equal(batch["grades"], batch["labels"].float())
    assert batch["dim_targets"].shape == (n, len(DIMENSIONS))
    assert ((batch["dim_targets"] >= 0) & (batch["dim_targets"] < len(VERDICTS))).all()  # synth knows every dim
    assert ((batch["bucket_ids"] >= 0) & (batch["bucket_ids"] < len(BUCKETS))).all()
    assert "input_ids" not in batch
    # the rows of the batch are the rows of the file, with item text rendered from their fields
    table = {r["example_id"]: r for r in pq.read_table(synth_dir / "val.parquet").to_pylist()}
    for eid, q, text, lab in zip(batch["example_id"], batch["query"], batch["item_text"], batch["labels"].tolist()):
        assert table[eid]["query"] == q and table[eid]["label"] == lab
        assert text == render_item(table[eid], dm.item_fields)[0]


def test_pair_inputs_are_dynamically_padded(synth_dir, minilm_tokenizer):
    dm = make_dm(synth_dir)
    dm.connect(layout=PairInputs(minilm_tokenizer, 256))
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    longest = int(mask.sum(1).max())
    assert ids.shape[1] == longest < 256  # padded to the batch's longest, not to max_seq_length
    assert batch["token_type_ids"].max() == 1  # query and item segments
    dm.connect(layout=PairInputs(minilm_tokenizer, 24))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 24
    # truncation cut the item, never the query
    first = minilm_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert first.startswith(
        minilm_tokenizer.decode(minilm_tokenizer(batch["query"][0])["input_ids"], skip_special_tokens=True)
    )


def test_tower_and_text_inputs(synth_dir, minilm_tokenizer):
    dm = make_dm(synth_dir)
    dm.connect(layout=TowerInputs(minilm_tokenizer, 128))
    b = next(iter(dm.test_dataloader()))
    assert {"query_input_ids", "query_attention_mask", "item_input_ids", "item_attention_mask"} <= set(b)
    assert b["query_input_ids"].shape[0] == b["item_input_ids"].shape[0] == len(b["example_id"])
    dm.connect(layout=TextInputs())
    b = next(iter(dm.test_dataloader()))
    assert "input_ids" not in b and "query_input_ids" not in b


def test_workers_and_extra_fields(synth_dir, minilm_tokenizer):
    dm = make_dm(synth_dir, num_workers=2)
    dm.connect(layout=PairInputs(minilm_tokenizer, 128))
    for r in dm.datasets["train"].rows:
        r["teacher_probs"] = [0.1, 0.2, 0.3, 0.4]
    dm.extra_fields["teacher_probs"] = torch.float32
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["teacher_probs"].shape == (len(batch["example_id"]), 4)
        seen += len(batch["example_id"])
    assert seen == len(dm.datasets["train"])


def test_empty_split_and_bad_fields_are_clear(synth_dir):
    with pytest.raises(ValueError, match="unknown item field"):
        RelevanceDataModule(DataSource(path=str(synth_dir)), item_fields=["title", "price"])
    dm = RelevanceDataModule(DataSource(path=str(synth_dir)))
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_limit_pairs_keeps_whole_queries_per_split(synth_dir):
    from ellm_mkd.schema import normalize_text

    full = make_dm(synth_dir)
    dm = make_dm(synth_dir, limit_pairs={"train": 40, "test": 25})
    assert len(dm.datasets["val"]) == len(full.datasets["val"])  # no limit: the whole split
    for split, limit in (("train", 40), ("test", 25)):
        kept, rows = dm.datasets[split].rows, full.datasets[split].rows
        assert 0 < len(kept) <= limit
        queries = {normalize_text(r["query"]) for r in kept}
        # every kept query keeps all its pairs, in the split's order
        assert kept == [r for r in rows if normalize_text(r["query"]) in queries]
    again = make_dm(synth_dir, limit_pairs={"train": 40, "test": 25})
    assert [r["example_id"] for r in again.datasets["train"].rows] == [
        r["example_id"] for r in dm.datasets["train"].rows
    ]
    with pytest.raises(ValueError, match="data.limit_pairs: keys are splits"):
        RelevanceDataModule(DataSource(path=str(synth_dir)), limit_pairs={"dev": 10})
    with pytest.raises(ValueError, match=r"data.limit_pairs.test must be an integer >= 1"):
        RelevanceDataModule(DataSource(path=str(synth_dir)), limit_pairs={"test": 0})
    with pytest.raises(ValueError, match=r"data.limit_pairs.train 1 is smaller than the first train query"):
        make_dm(synth_dir, limit_pairs={"train": 1})


def test_connect_takes_an_input_layout_and_nothing_else(synth_dir, minilm_tokenizer):
    """The model's layout is the one source of its token budget: the data section has no max_seq_length
    or inputs of its own, and connect refuses what is not a layout."""
    import inspect

    assert {"max_seq_length", "inputs", "tokenizer"}.isdisjoint(inspect.signature(RelevanceDataModule).parameters)
    for layout in (PairInputs(minilm_tokenizer, 16), TowerInputs(minilm_tokenizer, 16), TextInputs()):
        assert isinstance(layout, InputLayout)
    dm = make_dm(synth_dir)
    with pytest.raises(TypeError, match="needs an InputLayout, got BertTokenizer"):
        dm.connect(layout=minilm_tokenizer)


def test_length_grouped_sampler_groups_lengths_and_reshuffles():
    from datamodules.sampling import LengthGroupedSampler

    lengths = [(i * 37) % 101 for i in range(400)]
    s = LengthGroupedSampler(lengths, batch_size=8, window_batches=10, seed=3)
    first, second = list(s), list(s)
    assert sorted(first) == list(range(400)) and sorted(second) == list(range(400))  # every row once per epoch
    assert first != second  # a new order each epoch

    def spread(order):  # mean length range inside a batch of 8
        batches = [order[j : j + 8] for j in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert spread(first) < spread(shuffled) / 4
    s.set_epoch(0)
    assert list(s) == list(LengthGroupedSampler(lengths, batch_size=8, window_batches=10, seed=3))  # seeded


def test_group_by_length_drives_the_training_loader(synth_dir):
    from datamodules.sampling import LengthGroupedSampler

    dm = RelevanceDataModule(source={"path": str(synth_dir)}, batch_size=4, group_by_length=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    ids = [e for b in loader for e in b["example_id"]]
    assert sorted(ids) == sorted(r["example_id"] for r in dm.datasets["train"].rows)
