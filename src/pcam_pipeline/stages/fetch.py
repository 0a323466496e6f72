"""fetch: write the PCAM-format HDF5 files of every split into data/pcam, from the chosen source.

The work, with its free-space checks, is `data.placement.fill_pcam_dir`; `pcam download` (no
stage) is `data.download.download_release`.
"""

from __future__ import annotations

from pcam_pipeline.data.placement import fill_pcam_dir
from pcam_pipeline.params import Params
from pcam_pipeline.paths import PCAM_DIR


def main(params: Params) -> None:
    fill_pcam_dir(params.fetch, PCAM_DIR)
