"""The command line, run as a user runs it: a real subprocess."""

import json
import subprocess
import sys


def nanoseek(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def test_demo_trains_saves_reloads_and_continues_the_sequence(tmp_path):
    out = nanoseek("demo", "--out", str(tmp_path / "demo"))
    assert "(correct)" in out.stdout
    info = json.loads(nanoseek("info", str(tmp_path / "demo")).stdout)
    assert info["mtp_modules"] == 1 and info["kv_cache_bytes_per_token"] == (32 + 8) * 3 * 4
    assert info["active_parameters"] < info["parameters"]


def test_errors_are_one_clear_line(tmp_path):
    out = nanoseek("info", str(tmp_path / "missing"), check=False)
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"nanoseek info: error: checkpoint directory {tmp_path / 'missing'} does not exist"
    )


def test_help_lists_the_commands():
    out = nanoseek("--help")
    assert "demo" in out.stdout and "info" in out.stdout


def test_library_code_imports_no_cli_code_and_terminal_chat_no_server():
    code = """
import importlib, pathlib, sys
import nanoseek
import nanoseek.terminal_chat
assert "fastapi" not in sys.modules, "the terminal chat imports the server"
root = pathlib.Path(nanoseek.__file__).parent
for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root.parent).with_suffix("").parts
    if parts[1] != "cli" and parts[-1] != "__main__":
        importlib.import_module(".".join(parts).removesuffix(".__init__"))
print(sorted(name for name in sys.modules if name.split(".")[:2] == ["nanoseek", "cli"]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    assert out.stdout.strip() == "[]"
