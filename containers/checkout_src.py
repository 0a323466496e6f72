"""Run the bound checkout's code, not the copy installed in the image (imported by a .pth file).

The Dockerfile installs this as site-packages/_pcam_checkout_src.py with a one-line .pth that
imports it, so it runs at the start of every Python in the image, however the image is started:
`docker run` (the entrypoint also sets PYTHONPATH), a SIF built from containers/apptainer.def
(%environment does too), or a SIF pulled straight from the registry image, which has neither.
When the working directory is inside a pcam-pipeline checkout (src/pcam_pipeline/__init__.py and
pyproject.toml), that checkout's src/ goes first on sys.path: what runs is what dvc.lock hashes.
PCAM_USE_IMAGE_SRC=1 turns this off.
"""

import os
import sys


def _checkout_src() -> str | None:
    try:
        here = os.getcwd()
    except OSError:  # the working directory is gone or not visible in the container
        return None
    while True:
        src = os.path.join(here, "src")
        if os.path.isfile(os.path.join(src, "pcam_pipeline", "__init__.py")) and os.path.isfile(
            os.path.join(here, "pyproject.toml")
        ):
            return src
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


if not os.environ.get("PCAM_USE_IMAGE_SRC"):
    _src = _checkout_src()
    if _src is not None and _src not in sys.path:
        sys.path.insert(0, _src)
