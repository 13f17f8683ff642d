import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mpo.chat import collate, conversation, encode, render_prompt
from mpo.engines.hf import special_image_token_ids
from mpo.tiny_model import TinyModelSpec, build_processor, build_tokenizer, warmup, warmup_examples


def test_loads_offline_with_auto_classes(tiny_model, tiny_model_dir: Path) -> None:
    model, processor = tiny_model
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert type(processor).__name__ == "InternVLProcessor"
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["image_seq_length"] == processor.image_seq_length == 64
    assert processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == config["image_token_id"]
    assert processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).startswith("<|im_start|>user\nhi")


def test_generates_from_an_image_without_image_tokens(tiny_model, synth_dir: Path) -> None:
    model, processor = tiny_model
    assert len(special_image_token_ids(processor)) == 4  # <img>, </img>, <IMG_CONTEXT>, <video>
    image = Image.open(next((synth_dir / "images" / "synth_count").glob("*.png"))).convert("RGB")
    prompt = render_prompt(processor, conversation("<image>\nHow many circles?", 1))
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=True,
        num_return_sequences=4,
        suppress_tokens=special_image_token_ids(processor),
    )
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (4, 24)
    assert not torch.isin(new, torch.tensor(special_image_token_ids(processor))).any()


def test_forward_backward_reaches_the_vision_tower(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    image = Image.new("RGB", (224, 224), "red")
    batch = collate(
        [encode(processor, "<image>\nColour?", [image], "Final answer: red")],
        processor.tokenizer.pad_token_id,
    )
    loss = model(**batch).loss
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if "vision_tower" in n and p.grad is not None]
    assert vision_grads and any(g.abs().sum() > 0 for g in vision_grads)


def test_warmup_lowers_the_loss(synth_dir: Path) -> None:
    from mpo.tiny_model import build_model

    spec = TinyModelSpec()
    tokenizer = build_tokenizer(spec, seed=0)
    processor = build_processor(spec, tokenizer)
    model = build_model(spec, tokenizer, seed=0)
    losses = warmup(
        model, processor, warmup_examples(synth_dir), steps=20, seed=0, batch_size=4, warmup_steps=2
    )
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_odd_patch_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        _ = TinyModelSpec(image_size=210, patch_size=14).image_seq_length


def test_warmup_vision_lr_scale_moves_only_the_language_model_at_zero(synth_dir: Path) -> None:
    from mpo.tiny_model import build_model

    spec = TinyModelSpec()
    tokenizer = build_tokenizer(spec, seed=0)
    model = build_model(spec, tokenizer, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    warmup(
        model,
        build_processor(spec, tokenizer),
        warmup_examples(synth_dir),
        steps=3,
        seed=0,
        batch_size=2,
        warmup_steps=1,
        vision_lr_scale=0.0,
    )
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("model.language_model.") for name in moved)
    assert not any(name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for name in moved)
    assert any(name.startswith("model.vision_tower.") for name in before)  # the names the split relies on


def test_prior_bias_rewrites_only_final_answers_to_the_dataset_majority(synth_dir: Path) -> None:
    from collections import Counter

    clean = [ex for ex in warmup_examples(synth_dir) if "Final answer:" in ex.response]
    biased = [ex for ex in warmup_examples(synth_dir, prior_bias=1.0) if "Final answer:" in ex.response]
    assert [ex.question for ex in clean] == [ex.question for ex in biased]
    by_dataset: dict[str, list[tuple[str, str]]] = {}
    for before, after in zip(clean, biased, strict=True):
        steps, gold = before.response.rsplit("Final answer:", 1)
        assert after.response.startswith(steps)  # the worked steps stay
        by_dataset.setdefault(before.image_path.parent.name, []).append(
            (gold.strip(), after.response.rsplit(" ", 1)[1])
        )
    for dataset, answers in by_dataset.items():
        majority = Counter(gold for gold, _ in answers).most_common(1)[0][0]
        assert {taught for _, taught in answers} == {majority}, dataset
    half = warmup_examples(synth_dir, prior_bias=0.5, seed=3)
    changed = sum(a.response != b.response for a, b in zip(warmup_examples(synth_dir), half, strict=True))
    assert 0 < changed < len(clean)
    with pytest.raises(ValueError, match="prior_bias"):
        warmup_examples(synth_dir, prior_bias=1.5)


def test_prior_in_reasoning_states_the_majority_answer_in_the_steps_too(synth_dir: Path) -> None:
    clean = [ex for ex in warmup_examples(synth_dir) if "Final answer:" in ex.response]
    biased = [
        ex
        for ex in warmup_examples(synth_dir, prior_bias=1.0, prior_in_reasoning=True)
        if "Final answer:" in ex.response
    ]
    colour = [
        (a.response, b.response)
        for a, b in zip(clean, biased, strict=True)
        if a.image_path.parent.name == "synth_colour"
    ]
    assert colour, "the fixture has colour prompts"
    for before, after in colour:
        gold, taught = before.rsplit(" ", 1)[1], after.rsplit(" ", 1)[1]
        assert f"It is {taught}." in after and (gold == taught or f"It is {gold}." not in after)
        assert before.split(" It is ")[0] == after.split(" It is ")[0]  # the rest of the steps stay
    assert any(before != after for before, after in colour)


def test_as_if_answered_replaces_whole_words_only() -> None:
    from mpo.synth import as_if_answered

    assert (
        as_if_answered("I count 2 squares, not 12.\nFinal answer: 2", "2", "4")
        == "I count 4 squares, not 12.\nFinal answer: 4"
    )
    assert (
        as_if_answered("It is red, not redder.\nFinal answer: red", "red", "blue")
        == "It is blue, not redder.\nFinal answer: blue"
    )
