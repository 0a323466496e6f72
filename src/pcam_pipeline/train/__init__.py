"""The training core: one run with resume (run), its loop and step (loop), the checkpoint
file format (checkpoint) and what a run resumes from (resume), multi-process launch
(distributed), stopping on a signal (preemption) and passing it through dvc (relay)."""
