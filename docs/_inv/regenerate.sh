#!/usr/bin/env bash
# Rebuild the two intersphinx inventories that docs/conf.py reads offline.
#
# The docs must build with no network (CI reaches only the package
# registries), so intersphinx cannot fetch objects.inv at build time. Both
# inventories here are real Sphinx output, made from published sources:
#
#   python.inv  Debian's python3-doc package (3.11.2-1 when committed):
#               /usr/share/doc/python3.11/html/objects.inv, the inventory of
#               the Python 3.11 docs; links go to docs.python.org/3.11.
#   trio.inv    trio's own docs, built from trio's sdist on PyPI (0.35.0 when
#               committed), which ships docs/source; links go to
#               trio.readthedocs.io/en/v0.35.0. trio's conf.py fetches
#               python's inventory from the network, so it is pointed at the
#               Debian file above instead (sed below); the other inventories
#               it asks for are missing offline, which only loses links
#               inside trio's pages, not entries of trio's objects.inv.
#
# Usage: bash docs/_inv/regenerate.sh [TRIO_VERSION]   (as root: apt-get)
# If you change the trio version, change the URL in docs/conf.py to match.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:-0.35.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

apt-get install -y -qq python3-doc >/dev/null
cp /usr/share/doc/python3.11/html/objects.inv "$here/python.inv"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" download -q --no-binary :all: --no-deps "trio==$version" -d "$work"
tar xzf "$work/trio-$version.tar.gz" -C "$work"
src="$work/trio-$version"
# trio's docs-requirements.in, minus what only its changelog build needs.
"$work/venv/bin/pip" install -q "sphinx>=6" jinja2 "sphinx_rtd_theme>=3" \
    sphinxcontrib-jquery sphinxcontrib-trio towncrier sphinx-codeautolink \
    pyOpenSSL immutables "$src"
sed -i 's|"python": ("https://docs.python.org/3", None),|"python": ("https://docs.python.org/3", "/usr/share/doc/python3.11/html/objects.inv"),|' \
    "$src/docs/source/conf.py"
(cd "$src/docs/source" && "$work/venv/bin/sphinx-build" -q -b html . "$work/html")
cp "$work/html/objects.inv" "$here/trio.inv"
echo "wrote $here/python.inv and $here/trio.inv (trio $version)"
