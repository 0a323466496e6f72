"""Performance measurements beside the pipeline, which no stage runs: `python -m
pcam_pipeline.perf full|layout|noop|repro-full` (full_size.py, chunking.py, noop.py,
repro_full.py; children.py runs each measured job in its own interpreter), the GPU loop benchmark
(`python -m pcam_pipeline.perf.gpu_loop`, baseline_epoch.py for its "before" column), the Slurm
benchmarks' table per partition (partitions.py), the serving load test (serve_load.py,
locustfile.py) and `pcam slides` on a generated whole slide (slide_scoring.py).

They import `bench/` and the pipeline's modules, never a stage; nothing in the pipeline imports
them.
"""
