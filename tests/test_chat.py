import pytest
import torch
from PIL import Image

from mpo.chat import collate, conversation, encode, render_prompt, user_content


def test_user_content_splits_on_placeholders() -> None:
    assert user_content("<image>\nWhat?", 1) == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert user_content("A <image> vs <image>", 2) == [
        {"type": "text", "text": "A "},
        {"type": "image"},
        {"type": "text", "text": " vs "},
        {"type": "image"},
    ]
    assert user_content("What?", 1) == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert user_content("Text only", 0) == [{"type": "text", "text": "Text only"}]


def test_placeholder_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        user_content("<image><image>", 1)


def test_response_mask_is_exact_after_image_expansion(tiny_model) -> None:
    _, processor = tiny_model
    image = Image.new("RGB", (224, 224), "white")
    encoded = encode(processor, "<image>\nHow many?", [image], "Final answer: 3")
    tokens = processor.tokenizer.convert_ids_to_tokens(encoded.input_ids.tolist())
    assert tokens.count("<IMG_CONTEXT>") == processor.image_seq_length
    response = processor.tokenizer.decode(encoded.input_ids[encoded.response_mask])
    assert response == "Final answer: 3<|im_end|>"
    assert not encoded.response_mask[: tokens.index("</img>") + 1].any()


def test_continuation_prompt_ends_with_the_prefix(tiny_model) -> None:
    _, processor = tiny_model
    prompt = render_prompt(processor, conversation("<image>\nDescribe.", 1, "The image shows"))
    assert prompt.endswith("<|im_start|>assistant\nThe image shows")


def test_collate_masks_padding_and_prompt(tiny_model) -> None:
    _, processor = tiny_model
    image = Image.new("RGB", (224, 224), "white")
    short = encode(processor, "<image>\nQ?", [image], "A")
    long = encode(processor, "<image>\nA longer question here?", [image], "A longer answer")
    batch = collate([short, long], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert int((batch["labels"] != -100).sum()) == int(short.response_mask.sum() + long.response_mask.sum())
    assert batch["attention_mask"][0].sum() == short.input_ids.numel()
    assert torch.equal(batch["input_ids"][1], long.input_ids)
