"""Pair encoding, the one-vision-pass chunked log-probs, and the reference log-probs step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mpo.chat import collate, encode, load_rgb
from mpo.logps import PairLogps, split_pairs
from mpo.pair_data import PairTable, PairTooLong, collate_pairs, encode_pair
from mpo.ref_logps import compute_reference_logps, shard_spec
from mpo.schemas import PAIRS, shard_files, write_table


def naive_logp(model, processor, prompt: str, images: list[str], response: str) -> float:
    """Full-logits teacher forcing of one sequence through the model's own forward."""
    enc = encode(processor, prompt, [load_rgb(p) for p in images], response)
    batch = collate([enc], processor.tokenizer.pad_token_id)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
    ).logits
    logps = logits[0, :-1].log_softmax(-1).gather(-1, batch["input_ids"][0, 1:, None]).squeeze(-1)
    return logps[batch["labels"][0, 1:] != -100].sum().item()


def batch_of(pairs: PairTable, processor, rows: list[int], max_length: int = 512):
    return collate_pairs(
        [pairs.encode(processor, r, max_length) for r in rows], processor.tokenizer.pad_token_id
    )


def test_shared_vision_pass_equals_the_models_own_forward(tiny_model, gold_pairs_dir: Path) -> None:
    model, processor = tiny_model
    pairs = PairTable.read(gold_pairs_dir)
    batch = batch_of(pairs, processor, [0, 7, 21])
    with torch.no_grad():
        shared = PairLogps(model, "shared").batch_logps(batch)
        repeat = PairLogps(model, "repeat").batch_logps(batch)
        chunked = PairLogps(model, "shared", chunk_tokens=5).batch_logps(batch)
        expected = [
            naive_logp(model, processor, pairs.prompts[r], pairs.images[r], pairs.chosen[r])
            for r in batch.rows
        ]
        expected += [
            naive_logp(model, processor, pairs.prompts[r], pairs.images[r], pairs.rejected[r])
            for r in batch.rows
        ]
    assert torch.allclose(shared, torch.tensor(expected), atol=1e-3)
    assert torch.allclose(shared, repeat, atol=1e-4)
    assert torch.allclose(shared, chunked, atol=1e-4)
    assert (
        batch.pixel_values is not None and batch.pixel_values.shape[0] == 3
    )  # once per pair, not per sequence


def test_gradients_match_between_vision_passes_and_chunk_sizes(tiny_model, gold_pairs_dir: Path) -> None:
    model, processor = tiny_model
    batch = batch_of(PairTable.read(gold_pairs_dir), processor, [3, 30])
    vision = next(model.model.vision_tower.parameters())
    head = model.get_output_embeddings().weight
    grads = []
    for forward in (
        PairLogps(model, "shared", 4096),
        PairLogps(model, "repeat", 4096),
        PairLogps(model, "shared", 3),
    ):
        model.zero_grad()
        chosen, rejected = split_pairs(forward.batch_logps(batch))
        (chosen - 2 * rejected).sum().backward()
        grads.append((vision.grad.clone(), head.grad.clone()))
    model.zero_grad()
    for other in grads[1:]:
        assert torch.allclose(grads[0][0], other[0], atol=1e-5, rtol=1e-3)
        assert torch.allclose(grads[0][1], other[1], atol=1e-5, rtol=1e-3)
    assert grads[0][0].abs().sum() > 0


def test_rejected_half_without_grad_gives_the_same_logps_and_chosen_gradients(
    tiny_model, gold_pairs_dir: Path
) -> None:
    """The SFT baseline's path: rejected log-probs without autograd, same numbers, same gradients of the chosen."""
    model, processor = tiny_model
    batch = batch_of(PairTable.read(gold_pairs_dir), processor, [2, 11, 25])
    vision = next(model.model.vision_tower.parameters())
    for vision_pass in ("shared", "repeat"):
        forward = PairLogps(model, vision_pass)
        results = []
        for rejected_grad in (True, False):
            model.zero_grad()
            logps = forward(
                batch.input_ids,
                batch.attention_mask,
                batch.response_mask,
                batch.pixel_values,
                rejected_grad=rejected_grad,
            )
            chosen, _ = split_pairs(logps)
            chosen.sum().backward()
            results.append((logps.detach(), vision.grad.clone()))
        model.zero_grad()
        (full, full_grad), (half, half_grad) = results
        assert torch.allclose(full, half, atol=1e-4)
        assert torch.allclose(full_grad, half_grad, atol=1e-5, rtol=1e-3) and half_grad.abs().sum() > 0


def test_truncation_keeps_the_prompt_and_every_image_token(tiny_model, gold_pairs_dir: Path) -> None:
    model, processor = tiny_model
    pairs = PairTable.read(gold_pairs_dir)
    full = pairs.encode(processor, 0, 4096)
    prompt_len = full.prompt_ids.numel()
    cut = pairs.encode(processor, 0, prompt_len + 3)
    assert torch.equal(cut.prompt_ids, full.prompt_ids)
    assert torch.equal(cut.chosen_ids, full.chosen_ids[:3]) and cut.rejected_ids.numel() == 3
    image_id = model.config.image_token_id
    assert int((cut.prompt_ids == image_id).sum()) == model.config.image_seq_length
    with pytest.raises(PairTooLong, match="max_length"):
        pairs.encode(processor, 0, prompt_len)


def test_text_only_pairs(tiny_model) -> None:
    model, processor = tiny_model
    pair = encode_pair(processor, 0, "What is two plus two?", [], "Four.", "Five.", 256)
    batch = collate_pairs([pair], processor.tokenizer.pad_token_id)
    assert batch.pixel_values is None
    with torch.no_grad():
        logps = PairLogps(model).batch_logps(batch)
        expected = naive_logp(model, processor, "What is two plus two?", [], "Four.")
    assert logps[0].item() == pytest.approx(expected, abs=1e-3)


def test_ref_logps_are_written_into_the_pairs_and_resume(
    tiny_model, tiny_model_dir: Path, gold_pairs_dir: Path, tmp_path: Path
) -> None:
    model, processor = tiny_model
    pairs_dir = tmp_path / "pairs"
    shutil.copytree(gold_pairs_dir, pairs_dir)
    # A second shard, to see per-shard resume.
    first = shard_files(pairs_dir / "data")[0]
    table = pq.read_table(first)
    write_table(table.slice(30), pairs_dir / "data" / "part-00001.parquet")
    write_table(table.slice(0, 30), first)

    report = compute_reference_logps(pairs_dir, tiny_model_dir, max_length=512, batch_size=4)
    assert report.counts == {"shards": 2, "skipped_shards": 0, "pairs_computed": 40, "pairs_from_store": 0}
    assert not report.drops
    written = PairTable.read(pairs_dir)
    assert written.ref is not None and not torch.isnan(written.ref).any()
    with torch.no_grad():
        direct = PairLogps(model).batch_logps(batch_of(written, processor, [5]))
    assert written.ref[5].tolist() == pytest.approx(direct.tolist(), abs=1e-3)
    assert set(PAIRS.names) <= set(written.table.column_names)
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(pairs_dir / "data"), split="train")
    assert "ref_chosen_logp" in loaded.column_names and len(loaded) == 40

    again = compute_reference_logps(pairs_dir, tiny_model_dir, max_length=512)
    assert (again.counts["shards"], again.counts["skipped_shards"]) == (0, 2)
    # A changed spec recomputes; a pair too long gets nulls and is counted.
    longer = compute_reference_logps(pairs_dir, tiny_model_dir, max_length=60)
    assert longer.drops == {"too_long": 40} and shard_spec(first) == longer.spec
    column = pq.read_table(first).column("ref_chosen_logp")
    assert column.null_count == column.length() and column.type == pa.float64()


def test_a_rewritten_or_grown_pairs_version_computes_only_its_new_pairs(
    gold_pairs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Reference log-probs kept by pair and reference: the same pairs written again (a re-run that
    rewrote the pairs version) take every value from the store, a version with more pairs computes
    only those, and the values are the same as computed fresh."""
    store = tmp_path / "reference"
    table = pq.read_table(shard_files(gold_pairs_dir / "data")[0])
    first, grown = tmp_path / "v1", tmp_path / "v2"
    write_table(table.slice(0, 30), first / "data" / "part-00000.parquet")
    write_table(table.slice(0, 20), grown / "data" / "part-00000.parquet")
    write_table(table.slice(20), grown / "data" / "part-00001.parquet")  # 10 old pairs, 10 new

    fresh = compute_reference_logps(first, tiny_model_dir, max_length=512, store=store)
    assert (fresh.counts["pairs_computed"], fresh.counts["pairs_from_store"]) == (30, 0)
    before = PairTable.read(first).ref
    shutil.rmtree(first / "data")
    write_table(table.slice(0, 30), first / "data" / "part-00000.parquet")  # the same pairs, rewritten
    again = compute_reference_logps(first, tiny_model_dir, max_length=512, store=store)
    assert (again.counts["pairs_computed"], again.counts["pairs_from_store"], again.counts["shards"]) == (
        0,
        30,
        1,
    )
    after = PairTable.read(first).ref
    assert before is not None and after is not None and after.tolist() == before.tolist()

    parts = [
        compute_reference_logps(grown, tiny_model_dir, max_length=512, store=store, partition=(i, 2))
        for i in range(2)
    ]
    assert [p.counts["shards"] for p in parts] == [1, 1] and sum(
        p.counts["pairs_computed"] for p in parts
    ) == 10
    alone = tmp_path / "alone"
    shutil.copytree(grown, alone)
    compute_reference_logps(alone, tiny_model_dir, max_length=512)  # no store: all computed here
    stored, direct = PairTable.read(grown), PairTable.read(alone)
    assert stored.ref is not None and direct.ref is not None
    assert torch.allclose(stored.ref, direct.ref, atol=1e-9)
    other = compute_reference_logps(first, tiny_model_dir, max_length=60, store=store)
    assert other.counts["pairs_computed"] == 30  # another max_length is another reference: its own values
