"""Tests of pcam_pipeline.dvc. Named dvc_, not dvc: where tests/ is on sys.path (`cd tests &&
python -m pytest`), a tests/dvc package would be what `import dvc` finds instead of DVC."""
