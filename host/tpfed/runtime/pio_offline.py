"""Prepare PlatformIO's ``tool-scons`` core package from the ``scons`` installed from PyPI.

PlatformIO runs every build through SCons, which it normally downloads from its registry as the
``platformio/tool-scons`` package. Where the registry cannot be reached, this script builds
that package locally: it copies the installed ``SCons`` Python package into
``<packages_dir>/tool-scons`` together with the ``scons.py`` launcher PlatformIO calls, a
``package.json`` and the ``.piopm`` metadata PlatformIO's package manager matches packages by
(spec owner ``platformio``). The packages folder is PlatformIO's own setting, so
``PLATFORMIO_CORE_DIR`` / ``PLATFORMIO_PACKAGES_DIR`` and ``firmware/platformio.ini`` are
respected. Running it again is a no-op when the package is already in place.

The emulated boards run this themselves before building (:func:`ensure`), from a source
checkout or an installed package alike; ``tools/pio_offline.py`` runs it by hand.

Usage: python -m tpfed.runtime.pio_offline [--packages-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_NAME = "tool-scons"

LAUNCHER = '''\
# Launcher PlatformIO runs as `python scons.py ...`: SCons from this folder, not site-packages.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from SCons.Script.Main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
'''


class OfflineSetupError(Exception):
    """The tool-scons package cannot be prepared; the message says why."""


def pio_version_of(scons_version: str) -> str:
    """PlatformIO's encoding of a SCons release: 4.11.1 -> 4.41101.0 (4.4.0 -> 4.40400.0)."""
    parts = scons_version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:3]):
        raise OfflineSetupError(f"cannot read the installed SCons version {scons_version!r}")
    major, minor = int(parts[0]), int(parts[1])
    patch = int(parts[2]) if len(parts) > 2 else 0
    return f"{major}.{major}{minor:02d}{patch:02d}.0"


def project_ini() -> Path | None:
    """The firmware's platformio.ini (checkout or installed package), if there is one."""
    try:
        from tpfed.runtime.emulator import firmware_dir

        return firmware_dir() / "platformio.ini"
    except Exception:  # noqa: BLE001 - no firmware: PlatformIO's global settings apply
        return None


def default_packages_dir(ini: Path | None = None) -> Path:
    from platformio.project.config import ProjectConfig

    ini = ini or project_ini()
    config = ProjectConfig.get_instance(str(ini) if ini is not None and ini.is_file() else None)
    return Path(config.get("platformio", "packages_dir"))


def required_spec() -> str:
    from platformio.dependencies import get_core_dependencies

    return get_core_dependencies()[PACKAGE_NAME]


def _metadata_json(version: str) -> str:
    from platformio.package.meta import PackageMetadata, PackageSpec, PackageType

    meta = PackageMetadata(
        type=PackageType.TOOL,
        name=PACKAGE_NAME,
        version=version,
        spec=PackageSpec(owner="platformio", name=PACKAGE_NAME, requirements=required_spec()),
    )
    return json.dumps(meta.as_dict())


def _is_current(pkg_dir: Path, version: str) -> bool:
    try:
        meta = json.loads((pkg_dir / ".piopm").read_text())
        manifest = json.loads((pkg_dir / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("version") == version
        and (meta.get("spec") or {}).get("owner") == "platformio"
        and manifest.get("version") == version
        and (pkg_dir / "scons.py").is_file()
        and (pkg_dir / "SCons" / "Script" / "Main.py").is_file()
    )


def prepare(packages_dir: Path, force: bool = False) -> tuple[Path, bool]:
    """Install tool-scons into ``packages_dir``. Returns (package folder, whether it changed)."""
    import SCons
    import semantic_version

    scons_src = Path(SCons.__file__).resolve().parent
    version = pio_version_of(SCons.__version__)
    if semantic_version.Version(version) not in semantic_version.SimpleSpec(required_spec()):
        raise OfflineSetupError(
            f"installed SCons {SCons.__version__} is tool-scons {version}, but this PlatformIO "
            f"needs tool-scons {required_spec()}; install the matching `scons` from PyPI"
        )
    pkg_dir = packages_dir / PACKAGE_NAME
    if not force and _is_current(pkg_dir, version):
        return pkg_dir, False

    packages_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{PACKAGE_NAME}-", dir=packages_dir))
    try:
        staging.chmod(0o755)
        shutil.copytree(
            scons_src,
            staging / "SCons",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*Tests.py"),
        )
        (staging / "scons.py").write_text(LAUNCHER)
        manifest = {
            "name": PACKAGE_NAME,
            "version": version,
            "description": f"SCons {SCons.__version__} (from PyPI), prepared offline for PlatformIO",
            "keywords": ["build tool"],
            "homepage": "https://scons.org",
            "license": "MIT",
        }
        (staging / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / ".piopm").write_text(_metadata_json(version))
        if pkg_dir.exists() or pkg_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{PACKAGE_NAME}-old-", dir=packages_dir))
            os.replace(pkg_dir, old / PACKAGE_NAME)
            os.replace(staging, pkg_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, pkg_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return pkg_dir, True


def ensure(ini: Path | None = None) -> Path:
    """Make sure PlatformIO's packages hold ``tool-scons`` (prepared from the ``scons`` Python
    package when missing); returns its folder. Raises :class:`OfflineSetupError` saying what to
    install."""
    try:
        import SCons  # noqa: F401
    except ImportError:
        raise OfflineSetupError("PlatformIO builds need SCons: pip install scons "
                                "(a dependency of tpfed: reinstall with `pip install tpfed`)") from None
    try:
        return prepare(default_packages_dir(ini).resolve())[0]
    except ImportError as exc:
        raise OfflineSetupError(f"PlatformIO is not installed ({exc}): pip install platformio") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages-dir", type=Path, help="default: PlatformIO's packages_dir")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        packages_dir = (args.packages_dir or default_packages_dir()).resolve()
        pkg_dir, changed = prepare(packages_dir, force=args.force)
    except (OfflineSetupError, ImportError, OSError) as exc:
        print(f"pio_offline: error: {exc}", file=sys.stderr)
        return 2
    print(f"pio_offline: {PACKAGE_NAME} {'installed in' if changed else 'up to date in'} {pkg_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
