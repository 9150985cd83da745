"""Run peft's own generic tuner tests against BiasEdit (see docs/peft_peer_tests.md).

    python scripts/run_peft_peer_tests.py [--cache-dir DIR] [--sdist FILE] [-- extra pytest args]

Fetches the source distribution of the *installed* peft version with pip (cached outside the repository), extracts
its ``tests/`` and runs ``test_custom_models.py``, ``test_config.py`` and ``test_decoder_models.py`` with the glue
plugin ``tests_peer/peft_peer_glue.py``, which feeds them BiasEdit cases and tiny local models (no Hub access).
Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GLUE_DIR = REPO_ROOT / "tests_peer"
TESTS_DIR = REPO_ROOT / "tests"
PEER_TEST_FILES = ("tests/test_custom_models.py", "tests/test_config.py", "tests/test_decoder_models.py")
DEFAULT_CACHE_DIR = Path(os.environ.get("PEFT_PEER_CACHE", Path.home() / ".cache" / "peft-peer-tests"))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, pytest_args = argv, []
    if "--" in argv:
        split = argv.index("--")
        own, pytest_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"where the peft sdist is downloaded and extracted (default {DEFAULT_CACHE_DIR}, or "
                        "$PEFT_PEER_CACHE)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help="use this peft-<version>.tar.gz instead of downloading one")
    return parser.parse_args(own), pytest_args


def download_sdist(version: str, target_dir: Path) -> Path:
    """``pip download`` the sdist of ``peft==version`` into ``target_dir`` (kept there as a cache)."""
    cached = sorted(target_dir.glob(f"peft-{version}.tar.gz"))
    if cached:
        return cached[0]
    target_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}",
               "--dest", str(target_dir), "--quiet", "--disable-pip-version-check"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    found = sorted(target_dir.glob(f"peft-{version}.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download left no peft-{version}.tar.gz in {target_dir}")
    return found[0]


def extract_tests(sdist: Path, version: str, cache_dir: Path) -> Path:
    """Extract ``sdist`` once into ``cache_dir/peft-<version>`` and return that folder (the pytest rootdir).

    peft's sdist ships ``tests/`` without ``__init__.py``, but its modules import each other relatively
    (``from .testing_common import ...``): an empty ``tests/__init__.py`` makes the folder the package they expect.
    """
    source_root = cache_dir / f"peft-{version}"
    if not all((source_root / name).is_file() for name in PEER_TEST_FILES):
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(f"peft-{version}/tests/")]
            if not members:
                raise FileNotFoundError(f"{sdist} has no peft-{version}/tests/ folder")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.10.12 has no filters
            archive.extractall(cache_dir, members=members, **safe)
    (source_root / "tests" / "__init__.py").touch()
    return source_root


def run_peer_tests(source_root: Path, pytest_args: list[str]) -> int:
    env = dict(os.environ)
    # the glue, and tests/ for the model factory the glue's tiny decoders come from
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GLUE_DIR), str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add overhead
    command = [sys.executable, "-m", "pytest", "-c", str(GLUE_DIR / "pytest.ini"), "--rootdir", str(source_root),
               "-p", "peft_peer_glue", "-q", "-rfEs", *PEER_TEST_FILES, *pytest_args]
    print("$ cd", source_root, "&&", " ".join(command), flush=True)
    return subprocess.run(command, cwd=source_root, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    version = importlib.metadata.version("peft")
    cache_dir = args.cache_dir.expanduser().resolve()
    sdist = args.sdist.resolve() if args.sdist else download_sdist(version, cache_dir / "sdist")
    source_root = extract_tests(sdist, version, cache_dir)
    started = time.perf_counter()
    status = run_peer_tests(source_root, pytest_args)
    print(f"peft {version} peer tests: exit status {status}, {time.perf_counter() - started:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
