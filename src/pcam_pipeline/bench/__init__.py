"""Everything that measures: the benchmark stage's figures and the measurements beside the
pipeline (`python -m pcam_pipeline.bench.perf`, `python -m pcam_pipeline.bench.gpucheck`).

They time the pipeline's own code (the loader, `training.TrainStep` and `training.Loop`,
`inference.predict_batches`, the validate and preprocess work of `data/`), never a copy of it.
"""
