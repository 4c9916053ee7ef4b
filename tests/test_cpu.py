"""The CPU class an int8 backbone is measured on, read from the kernel's flags, and the rule both servers apply."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from tl_models.core.cpu import check_int8_machine, has_vnni, int8_machine_problem, isa_class, ort_minor
from tl_models.core.errors import Refused

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (f"{BASE} avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16", "amx"),
        (f"{BASE} avx2 avx512f avx512bw avx512_vnni avx_vnni", "avx512_vnni"),
        (f"{BASE} avx2 avx_vnni", "avx_vnni"),
        (f"{BASE} avx2 avx512f avx512bw", "avx512"),
        (f"{BASE} avx2 fma", "avx2"),
        (BASE, "x86"),
    ],
)
def test_the_isa_class_is_the_best_int8_instruction_set_the_flags_name(tmp_path: Path, flags: str, expected: str):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\nbogomips\t: 4000\n\n"
        f"processor\t: 1\nflags\t\t: {flags}\n"
    )
    assert isa_class(cpuinfo) == expected
    assert has_vnni(expected) == (expected in ("amx", "avx512_vnni", "avx_vnni"))


def test_without_cpu_flags_the_class_says_it_is_unknown(tmp_path: Path):
    assert isa_class(tmp_path / "missing").startswith("unknown-")
    (tmp_path / "empty").write_text("processor\t: 0\n")
    assert isa_class(tmp_path / "empty").startswith("unknown-")


def test_int8_serves_only_where_class_and_onnxruntime_minor_match():
    here = {"isa": isa_class(), "onnxruntime": ort.__version__}
    assert int8_machine_problem(here) is None
    major, minor = ort_minor().split(".")
    assert int8_machine_problem({**here, "onnxruntime": f"{major}.{minor}.99"}) is None  # a patch release is fine
    assert "ONNX Runtime 1.0.0" in int8_machine_problem({**here, "onnxruntime": "1.0.0"})
    assert "CPU class other-cpu" in int8_machine_problem({**here, "isa": "other-cpu"})
    assert "no record" in int8_machine_problem(None)
    with pytest.raises(Refused, match=r"`tl-models quantize /b --verify`$"):
        check_int8_machine({**here, "isa": "other-cpu"}, "build:/b")
    with pytest.raises(Refused, match=r"`tl-models quantize BUILD_DIR --verify`, then package it again$"):
        check_int8_machine(None, "bentoml:build-backbone:abc")
    check_int8_machine(here, "build:/b")
