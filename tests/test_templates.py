import pytest

from mpo.templates import TEMPLATES, apply_template, strip_short_answer_instructions


def test_short_answer_instructions_are_stripped() -> None:
    q = "<image>\nHow many?\nAnswer the question using a single word or phrase."
    assert strip_short_answer_instructions(q) == "<image>\nHow many?"
    q = "Which?\nA. 1\nB. 2\nAnswer with the option's letter from the given choices directly."
    assert strip_short_answer_instructions(q) == "Which?\nA. 1\nB. 2"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_single_image_moves_to_front(template: str) -> None:
    prompt = apply_template("What is in <image> this picture? Please answer Yes or No.", template)
    assert prompt.startswith("<image>\n") and prompt.count("<image>") == 1
    assert "What is in  this picture?" in prompt or "What is in this picture?" in prompt
    assert "Please answer Yes or No." not in prompt


def test_several_images_stay_in_place() -> None:
    prompt = apply_template("Compare <image> and <image>.", "en")
    assert "Compare <image> and <image>." in prompt and not prompt.startswith("<image>")


def test_template_wording() -> None:
    assert "Final answer: .." in apply_template("q", "en")
    assert "\\boxed{$FINAL_ANSWER}" in apply_template("q", "en_v2")
    assert "<think>" in apply_template("q", "r1")
    assert "答案: .." in apply_template("q", "zh")


def test_unknown_template_is_named() -> None:
    with pytest.raises(KeyError, match="en_v3"):
        apply_template("q", "en_v3")
