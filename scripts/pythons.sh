# Sourced by build_wheels.sh and smoke_test.sh: `interpreter X.Y` prints the
# python for version X.Y: $MGCL_PYTHON_X_Y, else pyenv's X.Y.*, else pythonX.Y
# on PATH.
interpreter() {
  local var="MGCL_PYTHON_${1//./_}" p
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  if command -v pyenv >/dev/null; then
    for p in "$(pyenv root)"/versions/"$1".*/bin/python; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  fi
  if command -v "python$1" >/dev/null && "python$1" -c 'pass' 2>/dev/null; then command -v "python$1"; return; fi
  echo "no Python $1 found (set MGCL_PYTHON_${1//./_})" >&2
  return 1
}
