"""What a run needs, checked before any stage starts: a bad path fails in a second, not after ingest.

``mpo run`` and ``mpo demo`` call ``check_run`` first. Each problem is one sentence naming the
config field and the path or value at fault, so that a typo in a YAML file reads as such instead
of as a Hugging Face or polars traceback from deep inside a stage.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from mpo.config import PipelineConfig
from mpo.errors import InputError

ENGINE_MODULES = {"transformers": "transformers", "vllm": "vllm", "lmdeploy": "lmdeploy"}


def check_run(config: PipelineConfig, source: str = "the config") -> None:
    """Raise ``InputError`` listing every problem of ``config`` (from ``source``) that would stop a run."""
    problems = [*_data_problems(config), *_model_problems(config), *_engine_problems(config)]
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))


def _data_problems(config: PipelineConfig) -> list[str]:
    wanted = [("train_data", config.train_data)]
    if config.evaluate and config.heldout_data is not None:
        wanted.append(("heldout_data", config.heldout_data))
    return [f"{name}: {path} does not exist" for name, path in wanted if not Path(path).exists()]


def _model_problems(config: PipelineConfig) -> list[str]:
    """The model must be a local folder whose config the Auto classes load (no hub is reachable)."""
    folder = Path(config.model)
    if not folder.is_dir():
        return [f"model: {config.model} is not a model folder"]
    if not (folder / "config.json").is_file():
        return [f"model: {folder} holds no config.json (not a Hugging Face model folder)"]
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        return [f"model: {folder}/config.json does not load ({str(error).splitlines()[0]})"]
    return []


def _engine_problems(config: PipelineConfig) -> list[str]:
    module = ENGINE_MODULES.get(config.engine)
    if module is None:
        return [f"engine: {config.engine!r} is not one of {', '.join(ENGINE_MODULES)}"]
    if config.engine_python is None:
        if config.engine == "transformers":
            return []
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return [
                f"engine: {config.engine} is not installed here; set engine_python to its environment's python"
            ]
        return []
    try:
        done = subprocess.run(
            [config.engine_python, "-c", f"import mpo.jobs, {module}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except OSError as error:
        return [f"engine_python: {config.engine_python} does not run ({error.strerror})"]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"engine_python: {config.engine_python} cannot import mpo and {module} ({last})"]
    return []
