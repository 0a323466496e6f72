"""The error the CLI reports as one clear message (anything else keeps its traceback)."""


class PipelineError(RuntimeError):
    """Bad input or state the user can fix; the message names the file, the field and the fix."""
