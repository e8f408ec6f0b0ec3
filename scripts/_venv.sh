# Sourced by scripts/serve and scripts/test: make ./.venv with this checkout
# installed (editable) plus the extras named in $EXTRAS, from pyproject.toml.
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || { echo "$0: python3 -m venv failed (on Debian: apt install python3-venv)" >&2; exit 1; }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
