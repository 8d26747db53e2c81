#!/usr/bin/env bash
# Installs what is missing, and nothing else: the pinned Python packages of pyproject.toml (with the test
# extras) and, where apt-get exists, Debian's dataset-fashion-mnist (the embedded default data).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

missing=$("$PYTHON" - <<'PY'
import importlib.metadata as md, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, _, version = re.split(r"(==)", req)
    try:
        if md.version(name) != version:
            print(req)
    except md.PackageNotFoundError:
        print(req)
PY
)
if [ -n "$missing" ]; then
    echo "install.sh: installing $(echo $missing | tr '\n' ' ')"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check $missing
fi

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    echo "install.sh: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
