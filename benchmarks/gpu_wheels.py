"""The wheels a CUDA machine without a package registry needs for benchmarks/gpu.sh, and the
checks on them. Standard library only: it runs under the GPU machine's bare python3.

    python benchmarks/gpu_wheels.py names gpu-a         # distributions of one folder
    python benchmarks/gpu_wheels.py check wheels/gpu-a wheels/gpu-b [--limit-mib 60]
    python benchmarks/gpu_wheels.py pending SITE wheels/gpu-a ...   # not yet installed in SITE
    python benchmarks/gpu_wheels.py modules             # import names of every distribution
    python benchmarks/gpu_wheels.py unpack SITE WHEEL...  # install without pip (no scripts)

`check` fails (exit 1, one line per problem) when a folder is missing or empty, a wheel is
not for CPython 3.12 on manylinux x86-64 (or pure Python), a distribution is missing, comes
twice or in two versions, torch or numpy is among them, or a folder exceeds the size limit.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Two folders, carried in two calls (each call may send 64 MiB with the working tree).
GROUPS = {
    "gpu-a": [
        "av", "zarr", "numcodecs", "donfig", "google-crc32c", "PyYAML",  # memenc's runtime
        "pytest", "pluggy", "iniconfig",  # the tests
        "sam2", "hydra-core", "omegaconf", "antlr4-python3-runtime", "iopath", "tqdm",
        "portalocker",  # the reference oracle
    ],
    "gpu-b": ["decord2"],
}  # fmt: skip
# Pure-Python distributions the registry has only as sdists: built here into py3 wheels
SDIST_ONLY = ["sam2", "antlr4-python3-runtime", "iopath"]
# The import name of each distribution, for gpu.sh's import check
MODULES = {"decord2": "decord", "google-crc32c": "google_crc32c", "PyYAML": "yaml",
           "hydra-core": "hydra", "antlr4-python3-runtime": "antlr4"}  # fmt: skip
NEVER = {"torch", "numpy"}  # the GPU machine's own, never carried
PLATFORM = re.compile(r"^(any|manylinux(1|2010|2014|_2_\d+)_x86_64)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(wheel: Path) -> tuple[str, str, list[str], list[str], list[str]]:
    """name-version[-build]-python-abi-platform.whl -> (name, version, pythons, abis, platforms)."""
    parts = wheel.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{wheel.name}: not a wheel file name")
    name, version, py, abi, plat = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    return canonical(name), version, py.split("."), abi.split("."), plat.split(".")


def fits(pythons: list[str], abis: list[str], platforms: list[str]) -> bool:
    """Installable on CPython 3.12, manylinux x86-64 (glibc >= 2.28)."""
    stable_abi = (
        "abi3" in abis
        and any(  # abi3 of CPython 3.x serves 3.x and later
            re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12 for p in pythons
        )
    )
    py_ok = stable_abi or any(p in ("cp312", "py3", "py312") for p in pythons)
    abi_ok = any(a in ("cp312", "abi3", "none") for a in abis)
    plat_ok = any(PLATFORM.match(p) for p in platforms)
    return py_ok and abi_ok and plat_ok


def wheels(folders: list[Path]) -> list[Path]:
    return sorted(w for f in folders if f.is_dir() for w in f.glob("*.whl"))


def check(folders: list[Path], limit_mib: float) -> list[str]:
    problems, seen = [], {}
    total = sum(w.stat().st_size for w in wheels(folders)) / 2**20
    print(f"{len(wheels(folders))} wheels, {total:.1f} MiB in all, one call carries one folder")
    for folder in folders:
        found = list(folder.glob("*.whl")) if folder.is_dir() else []
        if not found:
            problems.append(f"{folder}: no wheels (run benchmarks/gpu_wheels.sh)")
            continue
        mib = sum(w.stat().st_size for w in found) / 2**20
        print(f"{folder}: {len(found)} wheels, {mib:.1f} MiB (limit {limit_mib:g} MiB)")
        if mib > limit_mib:
            problems.append(f"{folder}: {mib:.1f} MiB exceeds the {limit_mib:g} MiB limit")
        expected = {canonical(n) for n in GROUPS.get(folder.name, [])}
        names = set()
        for w in sorted(found):
            try:
                name, version, pys, abis, plats = parse(w)
            except ValueError as e:
                problems.append(f"{folder}: {e}")
                continue
            names.add(name)
            if name in NEVER:
                problems.append(f"{w}: {name} is the GPU machine's own; do not carry it")
            if not fits(pys, abis, plats):
                problems.append(f"{w}: not for CPython 3.12 manylinux x86-64")
            if name in seen:
                problems.append(f"{w}: {name} also as {seen[name]}")
            seen[name] = w.name
        for name in sorted(expected - names):
            problems.append(f"{folder}: {name} is missing (run benchmarks/gpu_wheels.sh)")
    return problems


def unpack(site: Path, found: list[Path]) -> None:
    """What `pip install --no-deps --target SITE` does for these wheels, for a python without
    pip: the wheel's files into SITE, its .data/purelib and .data/platlib too (scripts and
    headers are left out; gpu.sh runs everything as `python -m`)."""
    import zipfile

    for w in found:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                parts = info.filename.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                target = site.joinpath(*parts)
                if info.is_dir():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(info))
                mode = info.external_attr >> 16
                if mode:
                    target.chmod(mode & 0o777)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("names").add_argument("group", choices=sorted(GROUPS))
    sub.add_parser("sdist-only")
    sub.add_parser("modules")
    c = sub.add_parser("check")
    c.add_argument("folders", nargs="+", type=Path)
    c.add_argument("--limit-mib", type=float, default=60.0)
    u = sub.add_parser("unpack")
    u.add_argument("site", type=Path)
    u.add_argument("wheels", nargs="+", type=Path)
    p = sub.add_parser("pending")
    p.add_argument("site", type=Path)
    p.add_argument("folders", nargs="*", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "names":
        print(" ".join(GROUPS[args.group]))
    elif args.cmd == "sdist-only":
        print(" ".join(SDIST_ONLY))
    elif args.cmd == "modules":
        print(" ".join(MODULES.get(n, n) for g in GROUPS.values() for n in g))
    elif args.cmd == "check":
        problems = check(args.folders, args.limit_mib)
        for line in problems:
            print(f"gpu_wheels: {line}", file=sys.stderr)
        return 1 if problems else 0
    elif args.cmd == "unpack":
        unpack(args.site, args.wheels)
    elif args.cmd == "pending":  # wheels with no marker in SITE/.memenc-installed yet
        done = args.site / ".memenc-installed"
        for w in wheels(args.folders):
            if not (done / w.name).exists():
                print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
