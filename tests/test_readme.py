"""The README's promises that can drift: its quick start runs exactly CI's test command, every measured figure it
quotes is in docs/benchmarks.md (with a date, machine and command), and every document it links exists."""
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_the_quick_start_is_setup_then_exactly_the_ci_test_command():
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", README, re.S)
    assert block, "README.md lost its quick start"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    tests = [line for line in ci if "pytest" in line]
    assert len(tests) == 1 and commands == ["bash setup.sh", tests[0]]
    assert "bash setup.sh --no-demo" in ci  # CI installs the same way, without the demo
    assert shlex.split(tests[0])[-1] == "tests" and "-m" not in shlex.split(tests[0])[3:]  # every tier


def figures(text: str) -> list[str]:
    """Measured numbers in prose and tables: decimals (not versions like 2.13.0 or Python 3.11) and durations."""
    text = re.sub(r"Python \d+\.\d+", "", prose(text))
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text) + re.findall(r"(?<![\w.])\d+ s\b", text)


def test_every_figure_the_readme_quotes_is_in_the_benchmarks_page():
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    quoted = figures(README)
    assert len(quoted) >= 17  # the demo's table (16 values) and its wall time
    missing = sorted({f for f in quoted if f not in bench})
    assert not missing, f"README.md quotes figures that docs/benchmarks.md does not hold: {missing}"
    # each row of the README's demo table is one measured row of the benchmarks page, in the same order
    for row in re.findall(r"^\|[^|\n]*\|((?: [\d.]+ \|){4})$", README, re.M):
        assert " / ".join(row.replace("|", " ").split()) in bench, row


def test_every_linked_document_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert {"docs/architecture.md", "docs/own_data.md", "docs/errors.md", "docs/benchmarks.md"} <= set(links)
    assert [link for link in links if not (ROOT / link).exists()] == []
