"""The CPU an int8 backbone runs on: its int8 instruction class, and whether a graph measured on one CPU may serve
on this one.

int8 accuracy and speed in ONNX Runtime depend on the kernels it picks, and those depend on the CPU's instructions
(u8s8 saturates without VNNI; s8s8 runs slower than fp32 on VNNI/AMX) and on the ONNX Runtime release. So the
gate's figures hold for the ISA class and ONNX Runtime minor version they were measured on; both servers refuse an
int8 backbone elsewhere (:func:`check_int8_machine`). Torch-free: the servers import this.
"""

from __future__ import annotations

import platform
from pathlib import Path

import onnxruntime as ort

from .errors import Refused

# best first: the first class whose flags the CPU has is its class
ISA_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("amx", ("amx_int8", "amx_tile")),
    ("avx512_vnni", ("avx512_vnni",)),
    ("avx_vnni", ("avx_vnni",)),
    ("avx512", ("avx512f",)),
    ("avx2", ("avx2",)),
)
VNNI_CLASSES = frozenset({"amx", "avx512_vnni", "avx_vnni"})  # uint8 x int8 multiply-add without saturation


def isa_class(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """This CPU's int8 class: amx, avx512_vnni, avx_vnni, avx512, avx2 (x86 Linux, from the kernel's flags), else
    ``x86`` for an older x86 CPU or ``unknown-<system>-<machine>`` where there are no flags to read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return f"unknown-{platform.system().lower()}-{platform.machine().lower()}"
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    if not flags:
        return f"unknown-{platform.system().lower()}-{platform.machine().lower()}"
    return next((name for name, needs in ISA_CLASSES if flags.issuperset(needs)), "x86")


def has_vnni(isa: str) -> bool:
    """Whether ``isa`` multiplies uint8 activations by int8 weights natively (no int16 saturation)."""
    return isa in VNNI_CLASSES


def ort_minor(version: str | None = None) -> str:
    """ONNX Runtime's major.minor (this one's when ``version`` is None)."""
    return ".".join((version or ort.__version__).split(".")[:2])


def this_machine() -> dict:
    """The fields an int8 record's ``machine`` compares: ISA class and ONNX Runtime version."""
    return {"isa": isa_class(), "onnxruntime": ort.__version__}


def int8_machine_problem(machine: dict | None) -> str | None:
    """Why an int8 backbone measured on ``machine`` (its record's ``machine``) may not serve here, or None when
    it may: another ISA class or another ONNX Runtime major.minor. A record without it (quantized before the
    CPU was recorded) may not serve either: nothing says it is correct, or faster, here."""
    here = this_machine()
    if not machine:
        return (
            f"the int8 backbone has no record of the CPU its gate measured (quantized by an older tl-models); "
            f"this CPU is {here['isa']} with ONNX Runtime {here['onnxruntime']}"
        )
    if machine.get("isa") != here["isa"] or ort_minor(machine.get("onnxruntime", "?")) != ort_minor():
        return (
            f"the int8 backbone was measured on CPU class {machine.get('isa')} with ONNX Runtime "
            f"{machine.get('onnxruntime')}; this CPU is {here['isa']} with ONNX Runtime {here['onnxruntime']}"
        )
    return None


def check_int8_machine(machine: dict | None, origin: str) -> None:
    """Refused (one line) when the int8 backbone's ``machine`` record does not match this CPU. ``origin`` is where
    the backbone came from (``build:<dir>``, or a store's tag), for the command that re-measures it here."""
    problem = int8_machine_problem(machine)
    if problem:
        build = origin.removeprefix("build:") if origin.startswith("build:") else "BUILD_DIR"
        again = "" if origin.startswith("build:") else ", then package it again"
        raise Refused(f"int8 refused: {problem}: re-measure it here with `tl-models quantize {build} --verify`{again}")
