"""Every Python example of README.md runs, as written, against a real server
reached through LIVELOCK_HOST (as a user's configuration would)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from conftest import Server

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_examples() -> None:
    assert len(examples()) >= 5


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs(index: int, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVELOCK_HOST", server.address)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(examples()[index], f"README.md example {index + 1}", "exec"), {"__name__": "__main__"})
    assert out.getvalue(), "every example prints something"
