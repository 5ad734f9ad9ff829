"""The kernels compile for Hopper (sm_90). Triton's interpreter, which runs every other CPU
test, accepts programs its compiler rejects; scripts/compile_sm90.py compiles the real
launchers' kernels with the installed Triton's ptxas, no GPU needed (on a GPU machine the
GPU tests compile them for real)."""

import os
import subprocess
import sys

import pytest

from conftest import HAS_CUDA

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "compile_sm90.py")


def _own_cache(tmp_path) -> dict:
    """The environment with a Triton cache of the test's own: the two scripts compile the
    same Gluon kernels, and in parallel test workers sharing ~/.triton/cache one read a
    kernel's files while something else replaced them (FileNotFoundError on its .source)."""
    return dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile the kernels on the GPU itself")
def test_kernels_compile_for_sm90(tmp_path):
    # One head dim with dropout (the forward and both backward kernels), plus the decode,
    # append and S_dmask kernels: about a minute on two cores. The decode call at d=72 (a
    # head stride that is not a multiple of 16) must hold no single 2-byte global accesses
    # (the report's G16 column; its strides in units of 8, ``problem.strides_unit``).
    result = subprocess.run([sys.executable, SCRIPT, "--headdims", "64", "--causal", "causal", "--dropout", "on",
                             "--decode-headdim", "72"],
                            capture_output=True, text=True, timeout=900, env=_own_cache(tmp_path))
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-3000:]
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_decode_kernel", "_append_kernel",
                   "_dropout_mask_kernel", "_fwd_sm90_kernel", "_bwd_dkdv_sm90_kernel", "_bwd_dq_sm90_kernel", "_dropout_keys_kernel"):
        assert kernel in result.stdout, (kernel, report[-3000:])
    decode_g16 = [int(line.split("|")[-2]) for line in result.stdout.splitlines() if "| _decode_kernel " in line]
    assert decode_g16 == [0], report[-3000:]


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile the kernels on the GPU itself")
def test_unaligned_head_dims_compile_to_vector_accesses(tmp_path):
    """d=72 (a head stride of 72 elements, not a multiple of 16): with the strides in units
    of 8 (``problem.stride_unit``) the portable kernels hold no single 2-byte global loads or
    stores (the report's G16 column); without them the forward had 192 and 64 (run 51)."""
    result = subprocess.run([sys.executable, SCRIPT, "--headdims", "72", "--causal", "full", "--dropout", "off",
                             "--no-extras"], capture_output=True, text=True, timeout=600, env=_own_cache(tmp_path))
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-3000:]
    rows = {cells[2].strip(): int(cells[-2]) for line in result.stdout.splitlines()
            if line.startswith("| d=72") for cells in [line.split("|")]}
    assert set(rows) == {"_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}, report
    assert all(g16 == 0 for g16 in rows.values()), report


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile the kernels on the GPU itself")
def test_dropout_sass_reports_each_kernels_loops(tmp_path):
    """scripts/dropout_sass.py finds the Gluon kernels' inner loops, with and without dropout,
    and reports what the mask adds per entry (docs/benchmarks.md's dropout analysis)."""
    from ringflash.kernels import sm90

    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper module")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "dropout_sass.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900,
                            env=_own_cache(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| _")]
    for kernel in ("_fwd_sm90_kernel", "_bwd_dkdv_sm90_kernel", "_bwd_dq_sm90_kernel"):
        added = [float(row[4]) for row in rows if row[1].strip() == kernel]
        assert added and max(added) > 2, (kernel, result.stdout)  # the mask's mix alone is 3 per entry
