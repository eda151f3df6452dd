"""`import adaptkit` is silent: no warning printed at import, with every optional extra installed."""

import subprocess
import sys


def test_import_prints_nothing():
    # torchao (the quant extra) used to print "Failed to load ..._C_mxfp8..." and a torch enum warning
    # on every import on a CPU machine: see adaptkit/core/quiet.py.
    done = subprocess.run([sys.executable, "-c", "import adaptkit"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr


def test_nf4_on_cpu_prints_nothing():
    # bitsandbytes warns at import about a CPU kernel package adaptkit never uses (core/quiet.py)
    code = ("import sys; sys.path.insert(0, 'tests'); import adaptkit as ak; from tiny import tiny_model; "
            "ak.AdaptedModel(tiny_model('llama'), quantize='nf4')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr
