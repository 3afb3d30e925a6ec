"""`--compile` reaches the path users run: Analyzer.analyze and the batch go through the compiled callable.

A counting stand-in for torch.compile records what it wrapped and how often the wrapped callable ran;
the real compiler is not needed to prove the wiring (and takes minutes on a CPU).
"""
import torch

from fmct.inference.analyze import Analyzer
from fmct_testing import ball_ct, tiny_bundle


def test_analyze_runs_through_the_compiled_callable(tmp_path, monkeypatch):
    calls = {"compiled": 0, "ran": 0}

    def counting_compile(fn, *args, **kwargs):
        calls["compiled"] += 1

        def wrapped(*a, **k):
            calls["ran"] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(torch, "compile", counting_compile)
    path, _, _ = tiny_bundle(tmp_path / "bundle")
    analyzer = Analyzer(path, device="cpu", compile=True)
    assert calls == {"compiled": 1, "ran": 0}
    ct, _ = ball_ct()
    result = analyzer.analyze(ct, explain_method=None)
    assert calls["ran"] >= 1, "analyze bypassed the compiled forward"
    plain = Analyzer(path, device="cpu").analyze(ct, explain_method=None)
    assert [f.probability for f in result.findings] == [f.probability for f in plain.findings]
