"""The test suite. Imported before any test module, so that the stages the tests run in-process
compute with the CPU numerics `pcam` pins (`cpu.numerics`), set before torch and NumPy load."""

from pcam_pipeline import numerics

numerics.pin("portable")
