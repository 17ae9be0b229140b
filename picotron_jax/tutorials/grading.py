"""The result types of a check: `ExerciseFailed` (an AssertionError naming the failed property) and `Passed`."""

from __future__ import annotations

from dataclasses import dataclass, field


class ExerciseFailed(AssertionError):
    """One property of the learner's answer does not hold; `prop` names it, `detail` shows the difference."""

    def __init__(self, lesson: str, prop: str, detail: str):
        self.lesson, self.prop, self.detail = lesson, prop, detail
        super().__init__(f"[{lesson}] not yet: property '{prop}' failed: {detail}")


@dataclass
class Passed:
    """Every property held; prints (and renders in Jupyter) as a one-line list of them."""

    lesson: str
    properties: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        shown = self.properties[:6]
        more = f"; ... and {len(self.properties) - 6} more" if len(self.properties) > 6 else ""
        return f"[{self.lesson}] passed all {len(self.properties)} properties: " + "; ".join(shown) + more

    __repr__ = __str__


class Checker:
    """Collects the properties of one check: `expect(ok, prop, detail)` raises on the first failure."""

    def __init__(self, lesson: str):
        self.result = Passed(lesson)

    def expect(self, ok: bool, prop: str, detail: str = "") -> None:
        if not ok:
            raise ExerciseFailed(self.result.lesson, prop, detail)
        if prop not in self.result.properties:
            self.result.properties.append(prop)

    def call(self, prop: str, fn, *args):
        """Run the learner's function; an exception it raises fails `prop` with the exception's text."""
        try:
            return fn(*args)
        except ExerciseFailed:
            raise
        except Exception as e:  # noqa: BLE001 - any error in the learner's code is a failed property
            raise ExerciseFailed(self.result.lesson, prop, f"your code raised {type(e).__name__}: {e}") from e
