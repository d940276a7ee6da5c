"""`hera doctor`: the self-test after install. A native crash or a wrong answer is one line naming
the fix, never a bare segfault.

Checks, cheapest first:
- versions: the installed llama-cpp-python is the one this package pins (the engine uses its
  private `_internals` and raw C structs, so another release may break it silently);
- native: hera_core._native loads and matches this source tree;
- llama.cpp build: no AMX instructions in ggml's CPU library (objdump), and every instruction set
  it was compiled for is one this CPU has;
- sandbox: model-written code can run isolated (a warning, not a failure, where it cannot);
- decode: in a child process (a crash there cannot take the caller down), SmolLM2 loads and
  decodes a few greedy tokens, which must be the expected ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hera_core.errors import SelfTestFailed
from hera_core.install import llama_build

# SmolLM2-135M-Instruct, greedy, no chat template: the top-1 token leads the runner-up by at least
# 2.7 nats (log-prob) at each of the 15 tokens, so a correct build on any instruction set writes
# exactly this; a broken kernel does not.
SELF_TEST_PROMPT = "1, 2, 3, 4, 5,"
SELF_TEST_EXPECTED = " 6, 7, 8, 9, 10"
SELF_TEST_MODEL = "smollm2-135m"

REBUILD = "make rebuild-llama"  # in a checkout; the pip form is in llama_build_hint()
ALLOW_AMX_ENV = "HERA_ALLOW_AMX"  # "1": the user built AMX in on purpose (HERA_LLAMA_CMAKE_ARGS)

# AMX mnemonics as objdump prints them (tile config, loads/stores, the dot-product instructions).
AMX_MNEMONICS = ("ldtilecfg", "sttilecfg", "tileloadd", "tileloaddt1", "tilestored", "tilezero", "tilerelease",
                 "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud", "tdpbf16ps", "tdpfp16ps")
_AMX_RE = re.compile(r"\t(" + "|".join(AMX_MNEMONICS) + r")\b")

# llama_print_system_info() names -> the /proc/cpuinfo flags that instruction set needs.
_SYSINFO_NEEDS = {
    "AVX": ("avx",), "AVX2": ("avx2",), "AVX_VNNI": ("avx_vnni",), "F16C": ("f16c",), "FMA": ("fma",),
    "BMI2": ("bmi2",), "AVX512": ("avx512f",), "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",), "AMX_INT8": ("amx_int8",),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the command or setting that repairs a failure
    warning: bool = False  # ok to run, but a part of HERA is off (shown as WARN, not a failure)


def rebuild_hint() -> str:
    return (f"rebuild llama.cpp for this CPU: `{REBUILD}` in the checkout (flags: "
            f"{llama_build.OVERRIDE_ENV}, see docs/cpu-build.md), or `CMAKE_ARGS=\"$(python -m hera_core.install.llama_build)\" "
            f"pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python=={pinned_llama_version()}`")


def pinned_llama_version() -> str:
    """The exact llama-cpp-python version hera-core requires (pyproject's `==` pin)."""
    for req in importlib.metadata.requires("hera-core") or []:
        m = re.match(r"llama[-_]cpp[-_]python\s*==\s*([\w.]+)", req)
        if m:
            return m.group(1)
    raise SelfTestFailed("hera-core's metadata pins no llama-cpp-python version; reinstall hera-core")


def check_versions() -> Check:
    want = pinned_llama_version()
    try:
        have = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return Check("versions", False, "llama-cpp-python is not installed", "make install")
    if have != want:
        return Check("versions", False, f"llama-cpp-python {have} is installed, hera-core is tested with {want}",
                     f"`{REBUILD}` (installs the pinned {want})")
    return Check("versions", True, f"llama-cpp-python {have} (pinned)")


def check_native() -> Check:
    from hera_core.native.loader import load

    try:
        mod = load()
    except ImportError as exc:
        return Check("native", False, str(exc), "make build")
    return Check("native", True, f"hera_core._native {mod.__version__}, source hash {mod.__source_hash__[:12]}")


def llama_lib_dir() -> Path | None:
    """llama_cpp's bundled shared libraries, found without importing (and so loading) them."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if lib.is_dir() else None


def ggml_cpu_libraries(lib_dir: Path) -> list[Path]:
    """The libraries that hold ggml's CPU kernels (one, or one per variant in a GGML_BACKEND_DL build)."""
    # A wheel stores libggml-cpu.so, .so.0 and .so.0.x.y as three copies of one file: scan each once.
    unique: dict[str, Path] = {}
    for p in sorted(lib_dir.glob("libggml-cpu*.so*"), key=lambda p: len(p.name)):
        if p.is_file():
            unique.setdefault(hashlib.sha1(p.read_bytes()).hexdigest(), p)
    return sorted(unique.values())


def amx_instructions(library: Path) -> list[str]:
    """The distinct AMX mnemonics in a shared library's code, from `objdump -d`."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise FileNotFoundError("objdump not found (Debian: binutils)")
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True)
    return sorted({m.group(1) for m in _AMX_RE.finditer(proc.stdout)})


def check_no_amx() -> Check:
    lib_dir = llama_lib_dir()
    libs = ggml_cpu_libraries(lib_dir) if lib_dir else []
    if not libs:
        return Check("llama.cpp build", False, "ggml's CPU library not found in llama_cpp/lib", REBUILD)
    if shutil.which("objdump") is None:
        return Check("llama.cpp build", True, "objdump not found: AMX scan skipped (install binutils to run it)")
    found = {lib.name: amx_instructions(lib) for lib in libs}
    bad = {name: mn for name, mn in found.items() if mn}
    if bad and os.environ.get(ALLOW_AMX_ENV) != "1":
        name, mn = next(iter(bad.items()))
        return Check("llama.cpp build", False, f"{name} contains AMX instructions ({', '.join(mn[:4])}), whose "
                     f"kernels crash on some Intel CPUs", rebuild_hint())
    return Check("llama.cpp build", True, f"no AMX instructions in {', '.join(found)}"
                 + (f" (AMX allowed by {ALLOW_AMX_ENV}=1)" if bad else ""))


def missing_instruction_sets(system_info: str, flags: set[str]) -> list[str]:
    """Instruction sets the llama.cpp build uses (`NAME = 1` in its system info) that the CPU lacks."""
    used = [name for name, on in re.findall(r"\b([A-Z0-9_]+) = (\d)", system_info) if on == "1"]
    return [name for name in used if name in _SYSINFO_NEEDS and not all(f in flags for f in _SYSINFO_NEEDS[name])]


# The child's whole program: it imports llama_cpp and nothing of hera_core, so what it tests is the
# llama.cpp build alone. System info first, so it survives a crash in the decode.
CHILD_CODE = f"""
import json, sys
import llama_cpp
print(json.dumps({{"system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}}), flush=True)
try:
    llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_threads=1, n_threads_batch=1, verbose=False)
except (ValueError, OSError) as exc:  # not a crash: the file is not a model this build can read
    print(json.dumps({{"load_error": f"{{type(exc).__name__}}: {{exc}}"}}), flush=True)
    sys.exit(1)
n_tokens = len(llm.tokenize({SELF_TEST_EXPECTED!r}.encode(), add_bos=False))
out = llm.create_completion({SELF_TEST_PROMPT!r}, max_tokens=n_tokens, temperature=0.0)
print(json.dumps({{"text": out["choices"][0]["text"]}}), flush=True)
"""


def child_command(model_path: Path, python: str = sys.executable) -> list[str]:
    return [python, "-c", CHILD_CODE, str(model_path)]


def decode_self_test(model_path: Path, timeout_s: float = 120, *, child: list[str] | None = None) -> Check:
    """Load and decode in a child process; its crash, hang or wrong answer becomes a Check.

    `child` replaces the child's command (tests run one that crashes or answers wrongly)."""
    name = "decode"
    cmd = child or child_command(model_path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Check(name, False, f"llama.cpp did not finish {SELF_TEST_EXPECTED!r} in {timeout_s:.0f} s",
                     rebuild_hint())
    lines = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            lines.update(json.loads(line))
    info = lines.get("system_info", "")
    missing = missing_instruction_sets(info, llama_build.cpu_flags()) if info else []
    if "load_error" in lines:
        return Check(name, False, f"llama.cpp could not load {model_path}: {lines['load_error']}",
                     f"`hera models ensure {SELF_TEST_MODEL}` (assembles and verifies the model again)")
    if proc.returncode != 0:
        if proc.returncode < 0:
            how = f"crashed with {signal.Signals(-proc.returncode).name}"
        else:
            how = f"exited with status {proc.returncode}"
        last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        why = f"; the build uses {', '.join(missing)}, which this CPU lacks" if missing else ""
        if re.search(r"\bAMX_INT8 = 1", info):
            why += "; the build has ggml's AMX kernels, which crashed on Intel Xeons with AMX"
        return Check(name, False, f"llama.cpp {how} loading or decoding {model_path.name}{why}"
                     + (f" ({last})" if last else ""), rebuild_hint())
    text = lines.get("text")
    if text != SELF_TEST_EXPECTED:
        return Check(name, False, f"llama.cpp decoded {text!r} for {SELF_TEST_PROMPT!r}, expected "
                     f"{SELF_TEST_EXPECTED!r}: its kernels compute wrong results on this CPU", rebuild_hint())
    isa = re.search(r"CPU : (.*)", info)
    return Check(name, True, f"{model_path.name}: {text.strip()!r} as expected on {platform.machine()}"
                 + (f" [{' '.join(n for n, on in re.findall(r'([A-Z0-9_]+) = (1)', isa.group(1)))}]" if isa else ""))


def check_sandbox() -> Check:
    """Model-written code (draft checks, the harness's tool) runs only in the kernel sandbox. Where
    none can be had HERA still serves, but escalates the steps whose check would run code: a
    warning naming the fix, not a failed install."""
    from hera_core.checks.sandbox import UNSAFE_ENV, default_sandbox

    status = default_sandbox().status
    if status.mechanism == "bubblewrap":
        return Check("sandbox", True, f"model-written code runs isolated ({status.detail})")
    if status.available:
        return Check("sandbox", True, f"UNSAFE: {status.detail}", f"unset {UNSAFE_ENV}", warning=True)
    return Check("sandbox", True, f"model-written code will not run, draft checks escalate: {status.detail}",
                 "install Debian's bubblewrap or enable user namespaces", warning=True)


def run_checks(model_path: Path | None) -> list[Check]:
    checks = [check_versions(), check_native(), check_no_amx(), check_sandbox()]
    if model_path is None:
        from hera_core.install import models

        try:
            model_path = models.model_path(SELF_TEST_MODEL)
        except Exception as exc:  # noqa: BLE001 - ModelNotFoundError's message is the hint
            checks.append(Check("decode", False, str(exc), f"hera models ensure {SELF_TEST_MODEL}"))
            return checks
    checks.append(decode_self_test(model_path))
    return checks
