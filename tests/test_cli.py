"""The command line itself: every subcommand has --help, and the top-level help stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from capdec.cli import COMMANDS, main


def test_top_level_help_lists_commands_without_importing_torch():
    code = ("import sys\nfrom capdec.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert all(name in out for name in COMMANDS)
    assert out.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_imports_no_torch(name):
    # building a command's parser (its flags come from capdec.configs) must stay torch-free: a 2 s+
    # import of torch (15 s on a cold disk) for `capdec train --help` is a regression
    code = (f"import sys\nfrom capdec.cli import main\ntry:\n    main([{name!r}, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert f"usage: capdec {name}" in out
    assert out.strip().endswith("NO-TORCH"), f"capdec {name} --help imported torch"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: capdec {name}") and "options:" in out
