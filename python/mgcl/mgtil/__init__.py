"""MGTIL: the benchmark definitions (HieraMedTransfer, MedXtreme), loaders for a
user's data root, and the SYNTHETIC benchmark ``mgtil-synth`` (``mgcl.mgtil.synth``).

Submodules imported on use: ``demo`` (``mgcl demo``), ``run`` (``mgcl run``:
config-driven runs), ``report`` (tables and plots, ``mgcl report``)."""
from .benchmarks import BENCHMARKS, BenchmarkDef, DatasetDef, benchmark_names, get_benchmark
from .data import CheckReport, ImageDataset, check, load_benchmark, load_task

__all__ = ["BENCHMARKS", "BenchmarkDef", "DatasetDef", "benchmark_names", "get_benchmark", "CheckReport",
           "ImageDataset", "check", "load_benchmark", "load_task"]
