"""The image's requirements, read from pyproject.toml: ``python requirements.py cpu|gpu [PYPROJECT]``.

cpu: the project's dependencies with ``tensorflow`` replaced by ``tensorflow-cpu`` where that
wheel is published (x86_64): the same TensorFlow built without CUDA kernels, 600 MB smaller.
gpu: the dependencies and the ``gpu`` extra (``tensorflow[and-cuda]``). The other extras
(``plots``, ``dev``) are not in the image. The Dockerfile installs these, then streamcast itself
with ``--no-deps``, so the dependency layer is rebuilt only when pyproject.toml changes.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

VARIANTS = ("cpu", "gpu")
# where tensorflow-cpu has Linux wheels; elsewhere (aarch64) the plain tensorflow wheel
CPU_WHEEL = "platform_machine == 'x86_64'"
OTHERWISE = "platform_machine != 'x86_64'"  # PEP 508 markers have no `not`


def requirements(project: dict, variant: str) -> list[str]:
    """Requirement lines for ``variant`` from pyproject's ``[project]`` table."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {', '.join(VARIANTS)}")
    dependencies: list[str] = list(project["dependencies"])
    if variant == "gpu":
        return dependencies + list(project["optional-dependencies"]["gpu"])
    lines = []
    for requirement in dependencies:
        spec, _, marker = (part.strip() for part in requirement.partition(";"))
        name = re.match(r"[A-Za-z0-9._-]+", spec)
        if name is None or name.group(0).lower() != "tensorflow":
            lines.append(requirement)
            continue
        also = f" and ({marker})" if marker else ""
        lines.append(f"tensorflow-cpu{spec[name.end() :]}; {CPU_WHEEL}{also}")
        lines.append(f"{spec}; {OTHERWISE}{also}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in VARIANTS:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    path = Path(argv[1] if len(argv) == 2 else "pyproject.toml")
    project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
    print("\n".join(requirements(project, argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
