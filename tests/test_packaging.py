"""The package as a worker gets it: Beam's --setup_file builds an sdist and installs it
on a fresh machine. Build one, install it into a new venv, and run from there."""
import os
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_sdist_installs_into_a_fresh_venv_and_runs(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                   cwd=REPO, check=True, capture_output=True)
    (sdist,) = (tmp_path / "dist").iterdir()
    members = tarfile.open(sdist).getnames()
    for module in ("pipeline/build.py", "storage/state.py", "transforms/kernel.py",
                   "transforms/dofns.py", "schemas/contract.py", "schemas/validation.py"):
        assert f"seqcarry-0.1.0/{module}" in members

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{sdist}[cpu]"], check=True,
                   capture_output=True, timeout=900)
    # Outside the repository, so nothing can come from the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = subprocess.run([str(venv / "bin" / "seqcarry"), "run", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--chunks" in helped.stdout
    location = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import transforms.kernel as k; print(k.__file__)"],
                              cwd=tmp_path, capture_output=True, text=True, env=env)
    assert location.stdout.startswith(str(venv))
    demo = subprocess.run([str(venv / "bin" / "seqcarry"), "demo", "--sequences", "6",
                           "--workdir", str(tmp_path / "demo")], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "max abs diff vs whole sequence" in demo.stdout
