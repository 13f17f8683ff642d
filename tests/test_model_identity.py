import shutil
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from mpo.model_identity import model_fingerprint


def test_fingerprint_follows_the_weights_not_the_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)  # a copy is the same model

    config = (tiny_model_dir / "config.json").read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(copy)
    model.save_pretrained(copy)
    (copy / "config.json").write_bytes(config)  # only the weights differ from here on
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)  # the same values saved again
    names = [name for name, p in model.named_parameters() if p.numel() > 1000]
    for name in (names[0], names[len(names) // 2], names[-1]):  # one trained tensor is enough to tell
        one = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            one.get_parameter(name).add_(1e-3)  # a training step moves every value of a tensor it touches
        one.save_pretrained(copy)
        (copy / "config.json").write_bytes(config)
        assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir), name


def test_hub_ids_are_named_by_their_string() -> None:
    assert model_fingerprint("OpenGVLab/InternVL3-1B") == model_fingerprint("OpenGVLab/InternVL3-1B")
    assert model_fingerprint("OpenGVLab/InternVL3-1B") != model_fingerprint("OpenGVLab/InternVL3-2B")
