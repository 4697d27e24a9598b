"""Reports of the generated-input test at the end of a run."""


def pytest_terminal_summary(terminalreporter):
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is None or not fuzz.OUTCOMES:
        return
    outcomes = fuzz.OUTCOMES
    parts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    terminalreporter.write_line(f"generated inputs: {sum(outcomes.values())} cases tried: {parts}")
