#!/usr/bin/env bash
# Installs what is missing, and nothing else: the pinned Python packages of pyproject.toml (with the test
# extras) and, where apt-get exists, Debian's dataset-fashion-mnist (the embedded default data), g++ and the Python
# headers (the C++ the fast CPU layers and torch.compile build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

missing=$("$PYTHON" - <<'PY'
import importlib.metadata as md, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, _, version = re.split(r"(==)", req)
    try:
        if md.version(re.sub(r"\[.*\]", "", name)) != version:  # ray[client]: the package ray
            print(req)
    except md.PackageNotFoundError:
        print(req)
PY
)
if [ -n "$missing" ]; then
    echo "install.sh: installing $(echo $missing | tr '\n' ' ')"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check $missing
fi

debs=""
[ -d /usr/share/datasets/fashion-mnist ] || debs="$debs dataset-fashion-mnist"
# the fast CPU layers and torch.compile on CPU build C++ at first use (without it: slower eager stages, and the
# tests of those paths fail)
command -v g++ >/dev/null || debs="$debs g++"
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"],
"Python.h")))' || debs="$debs python3-dev"
if [ -n "$debs" ] && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    echo "install.sh: installing Debian's$debs"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs
fi
