"""`--dtype auto`: bf16 only where the hardware computes in it."""

import pytest
import torch

from llmaas.engine import dtype_choice
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import InvalidRequestError


def _flags(monkeypatch, flags):
    monkeypatch.setattr(dtype_choice, "cpu_flags", lambda: frozenset(flags))


def test_cpu_without_native_bf16_gets_float32(monkeypatch):
    _flags(monkeypatch, {"avx", "avx2", "fma"})
    assert dtype_choice.auto_dtype(torch.device("cpu")) == torch.float32
    assert EngineConfig(dtype="auto", device="cpu").torch_dtype() == torch.float32


def test_cpu_with_avx512_bf16_or_amx_gets_bfloat16(monkeypatch):
    for flag in ("avx512_bf16", "amx_bf16"):
        _flags(monkeypatch, {"avx2", flag})
        assert dtype_choice.auto_dtype(torch.device("cpu")) == torch.bfloat16
        assert dtype_choice.resolve_dtype_name("auto") == "bfloat16"


def test_explicit_dtype_wins_and_unknown_is_refused(monkeypatch):
    _flags(monkeypatch, set())
    assert EngineConfig(dtype="bfloat16", device="cpu").torch_dtype() == torch.bfloat16
    assert dtype_choice.resolve_dtype_name("float16") == "float16"
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig(dtype="int4", device="cpu").torch_dtype()
    assert info.value.param == "dtype" and "auto" in str(info.value)


def test_this_machine_flags_are_read():
    # Linux lists its flags; the parse must find at least the baseline x86-64 or arm ones.
    flags = dtype_choice.cpu_flags()
    assert not flags or "fpu" in flags or "fp" in flags or "sse2" in flags
