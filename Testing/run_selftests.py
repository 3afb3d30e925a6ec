"""Run both Slicer modules' self-tests headless, with one command, and exit 0 only when both pass.

    python Testing/run_selftests.py                                        # slicer-core (pip, the test extra)
    Slicer --testing --no-main-window --python-script Testing/run_selftests.py   # the Slicer application

Inside Slicer it runs the modules' own self-tests (FMCTTest, FMCTTrainingTest: what the module
panel's "Reload and Test" runs, the panel included). Outside Slicer it runs the same checks
(FMCTLib/selftest.py, FMCTTrainingLib/selftest.py: `runAll`) on a real MRML scene of slicer-core,
set up as the application sets it up (Testing/slicer_testing.py). In a Slicer build tree of the
extension, `ctest -R py_FMCT` runs the first form for both modules.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _in_slicer_application() -> bool:
    try:
        import slicer

        return hasattr(slicer, "app") and slicer.app is not None
    except ImportError:
        return False


def run_in_application() -> list[str]:
    """The modules' Test classes, as Slicer's self-test runs them."""
    failed = []
    for module, test in (("FMCT", "FMCTTest"), ("FMCTTraining", "FMCTTrainingTest")):
        try:
            reason = __import__("FMCT").FMCTTest.skipReason()  # a skipped self-test is no pass
            if reason:
                raise RuntimeError(f"{module} self-test skipped: {reason}")
            getattr(__import__(module), test)().runTest()
            print(f"{module} self-test passed", flush=True)
        except Exception:  # report every module, then fail
            traceback.print_exc()
            failed.append(module)
    return failed


def run_headless() -> list[str]:
    """The same checks on a slicer-core scene (no application)."""
    sys.path[:0] = [str(REPO), str(REPO / "Testing")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # the workers
    from slicer_testing import headless_slicer  # puts FMCT/ and FMCTTraining/ on sys.path

    failed = []
    for module in ("FMCT", "FMCTTraining"):
        start = time.perf_counter()
        try:
            if module == "FMCT":
                from FMCTLib import selftest

                with headless_slicer() as app:
                    selftest.runAll(app.scene, log=lambda m: print(f"  {m}", flush=True))
            else:
                from FMCTTrainingLib import selftest as training_selftest

                training_selftest.runAll(log=lambda m: print(f"  {m}", flush=True))
            print(f"{module} self-test passed ({time.perf_counter() - start:.0f} s)", flush=True)
        except Exception:
            traceback.print_exc()
            failed.append(module)
    return failed


def main() -> int:
    in_app = _in_slicer_application()
    failed = run_in_application() if in_app else run_headless()
    print("self-tests: " + ("all passed" if not failed else f"FAILED: {', '.join(failed)}"), flush=True)
    code = 1 if failed else 0
    if in_app:
        import slicer

        slicer.util.exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
