"""preprocess: the training-ready dataset in data/processed, plus train-split channel statistics.

Per split, streaming in blocks (memory stays bounded for the full 7 GB train split): clip to
[0, 255] and cast to uint8 (a no-op on clean PCAM, the safe repair for wider dtypes), drop blank
patches, and write `<split>.h5` in the layout the loader reads with one system call per block
(`preprocess.layout`). Channel mean/std come from the train split only, so nothing about
valid/test leaks into training. Where the layout lets the writer know each file's md5 as it
writes (contiguous), DVC is told, so it does not read the 7 GB back to hash them.

All or nothing: free space is checked before anything is written, and a split left empty (or
with one class) by dropping blank patches, or a disk that fills up, fails the stage with
data/processed as it was. The work is `data.prepare.write_processed`.
"""

from __future__ import annotations

from pcam_pipeline.data.prepare import write_processed
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.dvc.state import known_hashes
from pcam_pipeline.params import Params
from pcam_pipeline.paths import PCAM_DIR, PREPROCESS_REPORT, PROCESSED_DIR
from pcam_pipeline.repro import write_json


def main(params: Params) -> None:
    written = write_processed(
        ProcessedData(PROCESSED_DIR), PCAM_DIR, params.preprocess, params.validate_
    )
    # The md5s the writer computed as it wrote: DVC takes them instead of hashing the files.
    with known_hashes(PROCESSED_DIR) as known:
        for path, md5 in written.md5s.items():
            known.record(path, md5)
    write_json(PREPROCESS_REPORT, written.report)
