"""The benchmark stage's measurements, and exactly those: the tables `pcam benchmark` writes
(loaders.py, throughput.py, timing.py; tables.py writes them), the export_bench stage's
(exported.py), and what both record and share (environment.py, measure.py). The measurements
beside the pipeline are in `perf/`.

They time the pipeline's own code (the loader, `train.loop.TrainStep` and `train.loop.Loop`,
`inference.predict_batches`), never a copy of it.
"""
