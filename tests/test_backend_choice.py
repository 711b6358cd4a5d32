"""``auto`` by measurement (resnet_fast.backends.measured): the choice logic on the CPU, with the
GPU timing replaced by a table (tests/gpu times real kernels)."""

import json

import pytest
import torch

from resnet_fast import backends
from resnet_fast.backends import measured
from resnet_fast.backends.base import Backend

CALL = measured.ConvCall((8, 64, 14, 14), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1, torch.bfloat16,
                         True, True, False)


class Fake(Backend):
    def __init__(self, name):
        self.name = name

    def available(self, device, dtype):
        return True, ""


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(measured.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(measured, "_choices", {})
    monkeypatch.setattr(measured, "_disk", None)
    calls = []

    def table(us):
        def timer(be, call, device):
            calls.append(be.name)
            if us[be.name] is None:
                raise RuntimeError("launch failed")
            return us[be.name]
        monkeypatch.setattr(measured, "timer", timer)

    return tmp_path, calls, table


def test_picks_the_faster_and_remembers_it(fresh):
    tmp, calls, table = fresh
    a, b = Fake("triton"), Fake("cuda")
    table({"triton": 120.0, "cuda": 95.0})
    assert measured.choose([a, b], CALL, torch.device("cpu"), machine="H200 test") is b
    assert calls == ["triton", "cuda"]
    assert measured.choose([a, b], CALL, torch.device("cpu"), machine="H200 test") is b
    assert calls == ["triton", "cuda"]  # measured once
    saved = json.loads((tmp / "choices.json").read_text())
    (key, entry), = saved.items()
    assert "H200 test" in key and CALL.key() in key
    assert entry == {"backend": "cuda", "us": {"triton": 120.0, "cuda": 95.0}}


def test_a_later_process_reads_the_disk(fresh, monkeypatch):
    tmp, calls, table = fresh
    a, b = Fake("triton"), Fake("cuda")
    table({"triton": 80.0, "cuda": 95.0})
    assert measured.choose([a, b], CALL, torch.device("cpu"), machine="m") is a
    monkeypatch.setattr(measured, "_choices", {})  # as a new process
    monkeypatch.setattr(measured, "_disk", None)
    calls.clear()
    assert measured.choose([a, b], CALL, torch.device("cpu"), machine="m") is a
    assert calls == []
    # another GPU, another shape or another candidate set: measured again
    table({"triton": 80.0, "cuda": 60.0})
    assert measured.choose([a, b], CALL, torch.device("cpu"), machine="other GPU") is b
    assert measured.choose([a, b], CALL._replace(residual=False), torch.device("cpu"), machine="m") is b
    assert len(calls) == 4


def test_ties_keep_the_fixed_order_and_failures_lose(fresh):
    _, calls, table = fresh
    a, b = Fake("triton"), Fake("cuda")
    table({"triton": 50.0, "cuda": 50.0})
    assert measured.choose([a, b], CALL, torch.device("cpu"), machine="m") is a
    table({"triton": None, "cuda": 70.0})
    assert measured.choose([a, b], CALL._replace(relu=False), torch.device("cpu"), machine="m") is b


def test_unreadable_cache_is_ignored(fresh):
    tmp, _, table = fresh
    (tmp / "choices.json").write_text("{not json")
    table({"triton": 1.0, "cuda": 2.0})
    assert measured.choose([Fake("triton"), Fake("cuda")], CALL, torch.device("cpu"), machine="m").name == "triton"
    assert json.loads((tmp / "choices.json").read_text())  # rewritten whole


def test_mode_switch(monkeypatch):
    monkeypatch.setenv(measured.ENV_VAR, "order")
    assert not measured.enabled()
    monkeypatch.setenv(measured.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="RESNET_FAST_AUTO"):
        measured.enabled()
    monkeypatch.delenv(measured.ENV_VAR)
    assert measured.enabled()


def test_no_measuring_on_the_cpu_or_while_compiling():
    assert not measured.can_measure(torch.zeros(1))


def test_resolve_measures_only_with_two_kernel_takers(fresh, monkeypatch):
    _, calls, table = fresh
    fa, fb = Fake("fa"), Fake("fb")
    monkeypatch.setitem(backends._REGISTRY, "fa", "x:y")
    monkeypatch.setitem(backends._REGISTRY, "fb", "x:y")
    monkeypatch.setitem(backends._instances, "fa", fa)
    monkeypatch.setitem(backends._instances, "fb", fb)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("fa", "fb", "torch"))
    monkeypatch.setattr(measured, "can_measure", lambda x: True)
    monkeypatch.setattr(measured, "_machine", lambda device: "m")
    table({"fa": 9.0, "fb": 3.0})
    x = torch.zeros(2, 8, 5, 5)
    w = torch.zeros(4, 8, 3, 3)
    call = ((1, 1), (1, 1), (1, 1), False, True)
    assert backends.resolve("auto", x, weight=w, call=call) is fb
    assert backends.resolve("auto", x, weight=w) is fa  # no call described: the fixed order
    assert backends.resolve("fa", x, weight=w, call=call) is fa  # a named backend is not second-guessed
    monkeypatch.setattr(fb, "supports", lambda *a, **k: (False, "not this shape"))
    calls.clear()
    assert backends.resolve("auto", x, weight=w, call=((2, 2), (1, 1), (1, 1), False, True)) is fa
    assert calls == []  # one kernel taker: nothing to measure
