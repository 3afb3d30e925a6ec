"""What one plausibility check says, and the refusal that carries a refusing one to the user."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmct.conventions.errors import HeadCheckError


@dataclass
class Check:
    """One named check of the CT: measured value against its limit, and whether it passed.

    refuses: a failed check of this kind stops the analysis (exit 2) before any model runs; a failed
    check that does not refuse is a flag: the findings are computed but marked unreliable.
    """

    name: str
    passed: bool
    value: Any
    limit: Any
    message: str
    refuses: bool = True

    @property
    def refused(self) -> bool:
        return self.refuses and not self.passed

    @property
    def flagged(self) -> bool:
        return not self.refuses and not self.passed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": bool(self.passed), "value": self.value, "limit": self.limit,
                "message": self.message, "refuses": bool(self.refuses)}

    def line(self) -> str:
        """One line for the CLI, report.png and the Slicer panel."""
        verdict = "ok" if self.passed else ("REFUSED" if self.refuses else "FLAGGED")
        return f"{self.name}: {verdict} ({self.message})"


def refusal(checks: list[Check], source: str) -> HeadCheckError:
    """The error for the first refusing check (the message names it and says what to do); all checks ride along."""
    first = next(c for c in checks if c.refused)
    error = HeadCheckError(f"{source}: {first.name} check failed: {first.message}")
    error.checks = [c.to_dict() for c in checks]
    return error
