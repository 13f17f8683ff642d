"""``max_dynamic_patch``: one user-facing tile option, mapped to each model format's own knobs.

InternVL splits a large image into up to ``max_dynamic_patch`` tiles (plus a thumbnail),
each worth a fixed number of image tokens. The option's name comes from the original
InternVL checkpoints (``InternVLChatModel``, trust_remote_code), whose processor takes it
as is. The Hugging Face format (``InternVLForConditionalGeneration``) uses the
``GotOcr2`` image processor instead, which ignores ``max_dynamic_patch`` and reads
``crop_to_patches``, ``min_patches`` and ``max_patches``. Passing the original name to
an HF-format model is silently a no-op (vLLM only logs a warning), so the mapping lives
here, once, for every engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORIGINAL_INTERNVL = ("InternVLChatModel",)
HF_INTERNVL = ("InternVLForConditionalGeneration",)


def architectures(model: str) -> list[str]:
    """The ``architectures`` a local checkpoint's ``config.json`` declares (empty when it has none)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return []
    declared = json.loads(config.read_text()).get("architectures") or []
    return [str(name) for name in declared]


def processor_kwargs(model: str, max_dynamic_patch: int | None) -> dict[str, Any]:
    """Image-processor keyword arguments that give ``model`` at most ``max_dynamic_patch`` tiles.

    Empty when no limit is asked for. Raises ``ValueError`` for a model of another family
    (its processor has other knobs; pass them through the engine's own options) and for a
    model whose format cannot be read from a local ``config.json``.
    """
    if max_dynamic_patch is None:
        return {}
    if max_dynamic_patch < 1:
        raise ValueError(f"max_dynamic_patch must be >= 1, got {max_dynamic_patch}")
    declared = architectures(model)
    if any(name in ORIGINAL_INTERNVL for name in declared):
        return {"max_dynamic_patch": max_dynamic_patch}
    if any(name in HF_INTERNVL for name in declared):
        # One tile means no cropping (the whole image, resized); more means a grid plus a thumbnail.
        return {"crop_to_patches": max_dynamic_patch > 1, "min_patches": 1, "max_patches": max_dynamic_patch}
    raise ValueError(
        f"max_dynamic_patch applies to InternVL models; {model} declares {declared or 'no architecture'}: "
        "set its own image-processor options instead (engine option mm_processor_kwargs for vLLM)"
    )
