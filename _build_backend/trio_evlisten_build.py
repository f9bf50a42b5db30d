"""trio_evlisten's build backend: setuptools', with an editable install that
type checkers can follow.

The sdist, the wheel and the metadata are ``setuptools.build_meta``'s,
unchanged. Only ``pip install -e .`` differs.

Why: for a package at the top of its repository (no ``src/``), setuptools
makes an editable install an import hook (a meta path finder that a ``.pth``
file installs), because a plain ``.pth`` path entry would be the repository
root and would put ``tests``, ``benchmarks``, ``examples`` and ``docs`` on
the user's ``sys.path`` too. Type checkers never run that hook, so after
``pip install -e .`` mypy cannot find ``trio_evlisten`` ("Cannot find
implementation or library stub").

What this backend installs instead: setuptools' own editable wheel in its
"compat" mode (a ``.pth`` path entry), with that path entry pointed at
``build/editable-path/`` in the checkout, a directory whose only entry is a
symlink ``trio_evlisten -> ../../trio_evlisten``. So the editable install
adds exactly one directory to ``sys.path``, and the only name it makes
importable is ``trio_evlisten``; edits and modules added to the package
later are seen at once, by Python and by type checkers. Deleting ``build/``
breaks the install until the next ``pip install -e .`` (as with setuptools'
"strict" mode).

An explicit ``--config-settings editable_mode=...`` is passed to setuptools
untouched.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (
    build_sdist,
    build_wheel,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

PACKAGE = "trio_evlisten"
#: The directory the editable install puts on sys.path, relative to the
#: checkout (build/ is git-ignored).
LINK_DIR = Path("build", "editable-path")


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    """PEP 660's hook: setuptools' compat-mode editable wheel, re-pointed.

    Returns:
        The wheel's file name in ``wheel_directory``.

    Raises:
        RuntimeError: setuptools' wheel does not hold the one ``.pth`` path
            entry expected of its compat mode.
    """
    if config_settings and "editable_mode" in config_settings:
        return str(
            _setuptools.build_editable(
                wheel_directory, config_settings, metadata_directory
            )
        )
    settings = {**(config_settings or {}), "editable_mode": "compat"}
    name = str(
        _setuptools.build_editable(wheel_directory, settings, metadata_directory)
    )
    # PEP 517 runs the hooks in the source tree's root.
    root = Path.cwd().resolve()
    link_dir = make_link_dir(root)
    repoint_pth(Path(wheel_directory, name), root, link_dir)
    return name


def make_link_dir(root: Path) -> Path:
    """``root/LINK_DIR`` holding only the symlink ``trio_evlisten``."""
    link_dir = root / LINK_DIR
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / PACKAGE
    target = os.path.relpath(root / PACKAGE, link_dir)
    if link.is_symlink() and os.readlink(link) == target:
        return link_dir
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link_dir


def repoint_pth(wheel: Path, root: Path, link_dir: Path) -> None:
    """Rewrite the wheel's ``.pth`` entry ``root`` as ``link_dir``, and RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    pth = [
        info.filename
        for info, data in members
        if "/" not in info.filename
        and info.filename.endswith(".pth")
        and data.decode().strip() == str(root)
    ]
    if len(pth) != 1:
        found = [info.filename for info, _ in members]
        raise RuntimeError(
            f"expected one .pth file holding {str(root)!r} in {wheel.name}; "
            f"setuptools' compat mode may have changed: {found}"
        )
    record_name = next(
        info.filename
        for info, _ in members
        if info.filename.endswith(".dist-info/RECORD")
    )
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            if info.filename == record_name:
                continue
            if info.filename == pth[0]:
                data = f"{link_dir}\n".encode()
            zf.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
            rows.append(
                f"{info.filename},sha256={digest.decode().rstrip('=')},{len(data)}"
            )
        rows.append(f"{record_name},,")
        zf.writestr(record_name, "\n".join(rows) + "\n")
