"""The `promptkd` command sets the passive OpenMP wait policy before torch loads (promptkd.cpu), and
keeps a policy the user chose."""

import json
import os
import subprocess
import sys

from promptkd.cpu import USER_CHOICE_ENV, use_passive_openmp


def _run(code: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_CHOICE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(out) -> str:
    """Import the command, then run `toy domain` (it draws its images with torch: a command that
    really loads it) and report when torch was loaded and the policy it found."""
    argv = ["toy", "domain", "--out", str(out), "--n-train", "0", "--n-val", "0", "--n-test", "1", "-q"]
    return (
        "import json, os, sys\n"
        "import promptkd.cli as cli\n"
        "loaded = 'torch' in sys.modules\n"
        f"assert cli.main({argv!r}) == 0\n"
        "print(json.dumps({'torch_at_import': loaded, 'torch_after': 'torch' in sys.modules,\n"
        "                  'policy': os.environ.get('OMP_WAIT_POLICY')}))\n"
    )


def test_the_command_sets_the_policy_before_torch_is_loaded(tmp_path):
    seen = _run(_probe(tmp_path / "a"))
    # importing the command must not load torch, or libgomp would read its settings too early
    assert seen == {"torch_at_import": False, "torch_after": True, "policy": "PASSIVE"}
    assert _run(_probe(tmp_path / "b"), OMP_WAIT_POLICY="ACTIVE")["policy"] == "ACTIVE"  # the user's choice wins
    assert _run(_probe(tmp_path / "c"), GOMP_SPINCOUNT="1000")["policy"] is None


def test_use_passive_openmp_on_an_environment():
    env = {}
    use_passive_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    chosen = {"KMP_BLOCKTIME": "200"}
    assert use_passive_openmp(chosen) is False and chosen == {"KMP_BLOCKTIME": "200"}
