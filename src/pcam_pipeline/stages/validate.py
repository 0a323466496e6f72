"""validate: check every split of data/pcam and write reports/validate.json.

Fatal problems make the stage exit non-zero with one line per problem naming the file, split,
index (where one applies) and fix; warnings are logged. The checks, and the `check` name each
problem carries in the report, are in `data/checks.py` (run by `data/validation.py`); the one
threaded pass over the pixels they share (per-patch minimum, maximum, non-finite flag and hash)
is in `data/scan.py`.
"""

from __future__ import annotations

import logging

from pcam_pipeline.data.facts import Problem
from pcam_pipeline.data.validation import validate_dir
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import Params
from pcam_pipeline.paths import PCAM_DIR, VALIDATE_REPORT
from pcam_pipeline.repro import write_json

log = logging.getLogger(__name__)


class ValidationFailed(PipelineError):
    """The dataset has fatal problems; the message has one line per problem."""


def main(params: Params) -> None:
    report = validate_dir(PCAM_DIR, params.validate_)
    write_json(VALIDATE_REPORT, report)
    problems = [Problem(**p) for p in report["problems"]]
    for problem in problems:
        log.log(logging.ERROR if problem.severity == "error" else logging.WARNING, problem.line())
    if not report["ok"]:
        fatal = [problem.line() for problem in problems if problem.severity == "error"]
        raise ValidationFailed(
            f"{len(fatal)} fatal problem(s) in {PCAM_DIR} (details in {VALIDATE_REPORT}):\n"
            + "\n".join(fatal)
        )
    log.info("validate: %s ok (%d warnings)", PCAM_DIR, report["warnings"])
