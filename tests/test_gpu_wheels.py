"""benchmarks/gpu_wheels.py: the checks gpu.sh and gpu_wheels.sh run on the wheels carried
to a GPU machine without a registry, on wheel files made here."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_wheels  # noqa: E402

GOOD = {
    "gpu-a": [
        "av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl",  # stable ABI from 3.11: fits 3.12
        "zarr-3.1.6-py3-none-any.whl",
        "numcodecs-0.16.6-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "donfig-0.8.1.post1-py3-none-any.whl",
        "google_crc32c-1.9.0-cp312-cp312-manylinux2014_x86_64.whl",
        "pyyaml-6.0.4-cp312-cp312-manylinux_2_28_x86_64.whl",
        "pytest-9.2.0-py3-none-any.whl",
        "pluggy-1.7.0-py3-none-any.whl",
        "iniconfig-2.3.1-py3-none-any.whl",
        "sam2-1.1.0-py3-none-any.whl",
        "hydra_core-1.3.8-py3-none-any.whl",
        "omegaconf-2.3.1-py3-none-any.whl",
        "antlr4_python3_runtime-4.9.3-py3-none-any.whl",
        "iopath-0.1.10-py3-none-any.whl",
        "tqdm-4.70.1-py3-none-any.whl",
        "portalocker-4.4.2-py3-none-any.whl",
    ],
    "gpu-b": ["decord2-3.4.0-cp312-cp312-manylinux_2_28_x86_64.whl"],
}


def make(root: Path, files: dict[str, list[str]], size: int = 1000) -> list[Path]:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"\0" * size)
    return [root / f for f in files]


def test_the_lists_cover_every_folder_and_module():
    assert set(GOOD) == set(gpu_wheels.GROUPS)
    for folder, names in GOOD.items():
        got = {gpu_wheels.parse(Path(n))[0] for n in names}
        assert got == {gpu_wheels.canonical(n) for n in gpu_wheels.GROUPS[folder]}
    assert gpu_wheels.MODULES["decord2"] == "decord"


def test_a_complete_set_passes(tmp_path, capsys):
    folders = make(tmp_path, GOOD)
    assert gpu_wheels.check(folders, limit_mib=1) == []
    assert "gpu-a: 16 wheels" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("foo-1.0-cp312-cp312-macosx_11_0_arm64.whl", "not for CPython 3.12"),
        ("foo-1.0-cp311-cp311-manylinux_2_28_x86_64.whl", "not for CPython 3.12"),
        ("foo-1.0-cp312-cp312-manylinux_2_28_aarch64.whl", "not for CPython 3.12"),
        ("foo-1.0-cp313-abi3-manylinux_2_28_x86_64.whl", "not for CPython 3.12"),
        ("zarr-3.1.5-py3-none-any.whl", "zarr also as"),
        ("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", "GPU machine's own"),
        ("numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl", "GPU machine's own"),
    ],
)
def test_a_wrong_wheel_is_named(tmp_path, extra, problem):
    files = {k: list(v) for k, v in GOOD.items()}
    files["gpu-a"].append(extra)
    problems = gpu_wheels.check(make(tmp_path, files), limit_mib=1)
    assert len(problems) == 1 and problem in problems[0] and extra in problems[0]


def test_missing_wheels_oversize_and_empty_folders_fail(tmp_path):
    files = {"gpu-a": GOOD["gpu-a"][1:], "gpu-b": GOOD["gpu-b"]}
    folders = make(tmp_path, files, size=2**20)
    problems = gpu_wheels.check([*folders, tmp_path / "absent"], limit_mib=10)
    assert problems == [
        f"{folders[0]}: 15.0 MiB exceeds the 10 MiB limit",
        f"{folders[0]}: av is missing (run benchmarks/gpu_wheels.sh)",
        f"{tmp_path / 'absent'}: no wheels (run benchmarks/gpu_wheels.sh)",
    ]
    assert gpu_wheels.main(["check", "--limit-mib", "10", str(folders[0])]) == 1


def test_pending_skips_what_an_earlier_call_installed(tmp_path, capsys):
    folders = make(tmp_path, GOOD)
    site = tmp_path / "site"
    (site / ".memenc-installed").mkdir(parents=True)
    (site / ".memenc-installed" / GOOD["gpu-b"][0]).touch()
    gpu_wheels.main(["pending", str(site), *map(str, folders)])
    pending = capsys.readouterr().out.split()
    assert len(pending) == 16 and not any("decord2" in p for p in pending)


def test_unpack_installs_a_wheel_as_pip_would(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/__init__.py", "VALUE = 7\n")
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo\nVersion: 1.0\n")
        z.writestr("demo-1.0.data/purelib/demo_extra.py", "X = 1\n")
        z.writestr("demo-1.0.data/scripts/demo", "#!python\n")
    site = tmp_path / "site"
    gpu_wheels.main(["unpack", str(site), str(wheel)])
    files = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert files == ["demo-1.0.dist-info/METADATA", "demo/__init__.py", "demo_extra.py"]
