"""MGTIL: the benchmark definitions (HieraMedTransfer, MedXtreme), loaders for a
user's data root, and the SYNTHETIC benchmark ``mgtil-synth`` (``mgcl.mgtil.synth``).

Submodules imported on use: ``demo`` (``mgcl demo``), ``run`` (``mgcl run``:
config-driven runs), ``report`` (tables and plots, ``mgcl report``)."""
from .benchmarks import BENCHMARKS, BenchmarkDef, DatasetDef, benchmark_names, get_benchmark
from .data import CheckReport, ImageDataset, check, load_benchmark, load_task
from ..cl.generators import register as _register


def _synth_generator():
    from .generator import SynthGenerator  # noqa: PLC0415

    return SynthGenerator()


# gift's generator="mgtil-synth": the procedural renderer of the SYNTHETIC benchmark, registered here so that
# the cl layer names no benchmark (mgcl.cl.generators.register)
_register("mgtil-synth", _synth_generator)

__all__ = ["BENCHMARKS", "BenchmarkDef", "DatasetDef", "benchmark_names", "get_benchmark", "CheckReport",
           "ImageDataset", "check", "load_benchmark", "load_task"]
