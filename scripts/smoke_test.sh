#!/usr/bin/env bash
# Smoke test of one built wheel, installed as a user installs it: a fresh venv,
# `pip install WHEEL` (torch first when --torch is given), no compiler on PATH
# from the install on. Then `mgcl --version`, `mgcl info`, the three ops'
# native CPU backends against the reference (scripts/smoke_ops.py), a shipped
# config by name (`mgcl run NAME --check`, which stops at its absent paths) and `mgcl demo --quick` on a fresh
# cache. Exit status 1 on any failure.
#
#   bash scripts/smoke_test.sh WHEEL [--python PY] [--torch SPEC] [--deps-from VENV]
#                                    [--same-as OPS.json] [--no-demo] [--out DIR]
#   bash scripts/smoke_test.sh --installed [--same-as OPS.json] [--no-demo] [--out DIR]
#
#   --installed       the wheel that `python` on PATH has installed (read from its
#                     direct_url.json), with --python python --deps-from its venv:
#                     how cibuildwheel's test-command calls it
#   --python PY       the interpreter of the venv (default: the one for the wheel's
#                     cpXY tag: pyenv's, else pythonX.Y on PATH)
#   --torch SPEC      pip install SPEC first (e.g. torch==2.13.0); default: pip
#                     resolves torch as a dependency of the wheel
#   --deps-from VENV  install the wheel alone (--no-deps) and let the venv see
#                     VENV's packages: a second torch for --same-as, at no cost
#   --same-as FILE    the ops' native results must equal those of FILE (the
#                     OPS.json of another run): one wheel, two torch versions
#   --no-demo         skip `mgcl demo --quick`
#   --out DIR         where the venv, ops.json, info.json and the demo go
#                     (default: a new folder under ${TMPDIR:-/tmp})
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/pythons.sh"

[ $# -ge 1 ] || { sed -n '2,26p' "$0"; exit 2; }
py="" torch_spec="" deps_from="" same_as="" demo=1 out=""
if [ "$1" = --installed ]; then
  py=$(command -v python)
  wheel=$("$py" -c 'import importlib.metadata as m, json, urllib.parse as u; print(u.unquote(u.urlparse(json.loads(m.distribution("mgcl").read_text("direct_url.json"))["url"]).path))')
  deps_from=$("$py" -c 'import sys; print(sys.prefix)')
else
  wheel=$(realpath "$1")
fi
shift
while [ $# -gt 0 ]; do
  case $1 in
    --python) py=$2; shift 2 ;;
    --torch) torch_spec=$2; shift 2 ;;
    --deps-from) deps_from=$(realpath "$2"); shift 2 ;;
    --same-as) same_as=$(realpath "$2"); shift 2 ;;
    --no-demo) demo=0; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "smoke_test: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -f "$wheel" ] || { echo "smoke_test: no wheel $wheel" >&2; exit 2; }
if [ -z "$py" ]; then
  tag=$(basename "$wheel" | sed -nE 's/.*-cp([0-9])([0-9]+)-.*/\1.\2/p')
  py=$(interpreter "$tag")
fi
out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/mgcl-smoke.XXXXXX")}
mkdir -p "$out"
out=$(realpath "$out")
t0=$(date +%s)
log() { echo "smoke_test [$(( $(date +%s) - t0 )) s]: $*"; }

# No compiler from here on: the PATH holds the venv and every program of the
# system folders but compilers, assemblers and linkers.
venv=$out/venv
rm -rf "$venv" "$out/bin"
"$py" -m venv "$venv"
mkdir -p "$out/bin"
for d in /usr/local/bin /usr/bin /bin /usr/sbin /sbin; do
  for t in "$d"/*; do
    n=${t##*/}
    case $n in
      cc|c++|cpp|gcc*|g++*|c89*|c99*|clang*|nvcc*|ld|ld.*|as|gfortran*|tcc|zig|*-gcc*|*-g++*|*-ld|*-ld.*|*-as) continue ;;
    esac
    [ -x "$t" ] && [ ! -e "$out/bin/$n" ] && ln -s "$t" "$out/bin/$n"
  done
done
export PATH=$venv/bin:$out/bin
unset CC CXX CUDACXX CUDA_HOME CUDA_PATH PYTHONPATH
for c in cc gcc g++ c++ clang clang++ nvcc ld; do
  if command -v "$c" >/dev/null; then echo "smoke_test: a compiler is on PATH: $(command -v "$c")" >&2; exit 1; fi
done

pipq() { "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
if [ -n "$deps_from" ]; then
  site=$("$deps_from/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_smoke_deps.pth"
  pipq install -q --no-deps "$wheel"
else
  [ -z "$torch_spec" ] || pipq install -q "$torch_spec"
  pipq install -q "$wheel"
fi
# The wheel's dependencies must keep the torch asked for (a pin elsewhere, e.g.
# torchvision's, would replace it silently).
case $torch_spec in
  torch==*)
    have=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    [ "$have" = "${torch_spec#torch==}" ] || { echo "smoke_test: asked for $torch_spec, the install left torch $have" >&2; exit 1; } ;;
esac
log "installed ${wheel##*/} with $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)') on Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')"

cd "$out"   # away from any checkout: mgcl must come from the venv
located=$("$venv/bin/python" -c 'import mgcl, os; print(os.path.dirname(mgcl.__file__))')
case $located in "$venv"/*) ;; *) echo "smoke_test: mgcl imported from $located, not from the venv" >&2; exit 1 ;; esac

want=$("$venv/bin/python" -c 'import sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).read("mgcl/_version.py").decode().split("\"")[1])' "$wheel")
got=$(mgcl --version)
echo "$got"
[ "$got" = "mgcl $want" ] || { echo "smoke_test: mgcl --version says '$got', the wheel is $want" >&2; exit 1; }
mgcl info
mgcl info --json > "$out/info.json"

cuda_flag=()
if "$venv/bin/python" -c 'import sys, zipfile; sys.exit(not any(n.startswith("mgcl/_C_cuda.") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$wheel"; then
  cuda_flag=(--cuda-module)
fi
"$venv/bin/python" "$here/smoke_ops.py" --info "$out/info.json" --out "$out/ops.json" \
  ${same_as:+--same-as "$same_as"} "${cuda_flag[@]}"
log "ops checked"

# A shipped config by name: the name resolves and every key and value checks.
# Its paths (data, checkpoints, bank) do not exist on a fresh machine, so
# --check must stop there, exit 2, naming them: not at the name or a key.
config=$("$venv/bin/python" -c 'from mgcl.mgtil.configs import shipped; print(next(iter(shipped())))')
rc=0; msg=$(mgcl run "$config" --check 2>&1) || rc=$?
echo "$msg"
if [ $rc -ne 0 ] && { [ $rc -ne 2 ] || ! grep -q "does not exist" <<<"$msg" || grep -q "no such config" <<<"$msg"; }; then
  echo "smoke_test: mgcl run $config --check failed (exit $rc) before checking paths" >&2; exit 1
fi

if [ $demo = 1 ]; then
  MGCL_CACHE=$out/cache mgcl demo --quick --out "$out/demo" --no-progress
  [ -s "$out/demo/results.json" ] || { echo "smoke_test: mgcl demo --quick wrote no results.json" >&2; exit 1; }
  log "mgcl demo --quick done"
fi
log "passed ($out)"
