"""Layering: the cl layer (trainer, strategies, generators) depends on no
benchmark package. mgcl.mgtil builds on mgcl.cl, never the other way: the
procedural generator of mgtil-synth is registered from mgcl.mgtil."""
import ast
import subprocess
import sys
from pathlib import Path

import mgcl

CL = Path(mgcl.__file__).parent / "cl"
# the results file format's name (SPEC.md section 7), a data identifier kept for the files already written
FORMAT_NAME = '"mgcl.mgtil.results"'


def _mgtil_imports(source: str, depth: int) -> list:
    """The imports of mgtil in ``source``, a module ``depth`` packages below mgcl (cl/x.py: 1)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("mgcl.mgtil")]
        elif isinstance(node, ast.ImportFrom):
            mod, up = node.module or "", node.level
            if (up == 0 and mod.startswith("mgcl.mgtil")) or (up == depth + 1 and (
                    mod == "mgtil" or mod.startswith("mgtil.") or (not mod and any(a.name == "mgtil"
                                                                                  for a in node.names)))):
                found.append("." * up + mod)
    return found


def _depth(path: Path) -> int:
    return len(path.relative_to(CL.parent).parts) - 1


def test_no_mgtil_name_or_import_under_cl():
    files = sorted(CL.rglob("*.py"))
    assert len(files) > 10
    named = [f"{p.relative_to(CL)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if "mgcl.mgtil" in line.replace(FORMAT_NAME, "")]
    assert not named, f"the cl layer names mgcl.mgtil: {named}"
    imports = {str(p.relative_to(CL)): got for p in files if (got := _mgtil_imports(p.read_text(), _depth(p)))}
    assert not imports, f"the cl layer imports mgtil: {imports}"


def test_the_import_check_catches_each_form():
    assert _depth(CL / "strategies" / "gift.py") == 2 and _depth(CL / "generators.py") == 1
    assert _mgtil_imports("from ...mgtil import synth\n", 2) == ["...mgtil"]
    assert _mgtil_imports("from .. import mgtil\n", 1) == [".."]
    assert _mgtil_imports("from ..mgtil.generator import SynthGenerator\n", 1) == ["..mgtil.generator"]
    assert _mgtil_imports("import mgcl.mgtil.synth as s\n", 1) == ["mgcl.mgtil.synth"]
    assert _mgtil_imports("from ..retrieval import pool\nfrom . import mgtil_like\n", 1) == []


def test_cl_loads_without_mgtil_and_mgtil_registers_its_generator():
    code = ("import sys\n"
            "from mgcl.cl import generators as G\n"
            "import mgcl.cl.strategies.gift, mgcl.cl.trainer\n"
            "assert not [m for m in sys.modules if m.startswith('mgcl.mgtil')], 'cl imported mgtil'\n"
            "assert 'mgtil-synth' not in G.REGISTRY\n"
            "import mgcl.mgtil\n"
            "g = G.resolve('mgtil-synth')\n"
            "assert type(g).__module__ == 'mgcl.mgtil.generator' and g.name == 'mgtil-synth'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_vlm_names_only_the_rerank_model():
    """``vlm`` is the frozen rerank model of retrieval; the model being trained (the
    trainer's, the one model surgery adapts) is never called that in cl/ or models/."""
    import io
    import tokenize

    named = []
    for room in ("cl", "models"):
        for p in sorted((CL.parent / room).rglob("*.py")):
            for tok in tokenize.generate_tokens(io.StringIO(p.read_text()).readline):
                if tok.type == tokenize.NAME and tok.string == "vlm":
                    named.append(f"{room}/{p.relative_to(CL.parent / room)}:{tok.start[0]}")
    assert not named, f"an identifier 'vlm' outside retrieval: {named}"
