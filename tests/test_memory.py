"""The services' malloc policy (fededge/memory.py): freed large blocks are reused, not unmapped."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A burst of 4 MiB packets, as an inbox full of 1M-parameter updates, freed and received again.
_BURST = textwrap.dedent(
    """
    import json, resource, sys
    from fededge.memory import keep_freed_memory
    policy = sys.argv[1] == "1" and keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = []
    for _ in range(3):
        f0 = faults()
        bufs = [bytearray(4 << 20) for _ in range(24)]
        out.append((faults() - f0) / 24)
        del bufs
    print(json.dumps({"policy": policy, "faults": out}))
    """
)


def _thp_always() -> bool:
    # Transparent huge pages on every mapping: a 4 MiB buffer is then a couple of faults, not
    # 1,024, and these counts say nothing.
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in text


needs_glibc_4k = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or _thp_always(),
    reason="counts 4 KiB page faults of glibc's heap (not under THP 'always')",
)


def _faults_per_buffer(policy: bool) -> tuple[bool, list[float]]:
    import json

    r = subprocess.run([sys.executable, "-c", _BURST, "1" if policy else "0"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    data = json.loads(r.stdout)
    return data["policy"], data["faults"]


@needs_glibc_4k
def test_a_second_burst_of_large_packets_reuses_the_pages_of_the_first() -> None:
    applied, faults = _faults_per_buffer(True)
    assert applied
    pages = (4 << 20) // 4096
    assert faults[0] > pages / 2  # the first burst maps its pages
    assert max(faults[1:]) < pages * 0.05  # later ones reuse them: no fault, no zeroing


@needs_glibc_4k
def test_without_the_policy_every_burst_is_faulted_in_again() -> None:
    # The quirk the policy exists for (glibc's defaults trim the freed burst): if a future
    # glibc stops doing it, this fails and fededge/memory.py can go.
    applied, faults = _faults_per_buffer(False)
    assert not applied
    assert min(faults) > (4 << 20) // 4096 / 2


def test_the_policy_is_idempotent() -> None:
    from fededge.memory import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first


def test_page_aligned_arrays_start_on_a_page_and_equal_their_source() -> None:
    # Accumulators are written to disk with direct I/O from their own memory: page-aligned.
    import numpy as np

    from fededge.memory import PAGE, is_page_aligned, page_aligned_copy, page_aligned_zeros

    for n in (1, 511, 100_003):
        z = page_aligned_zeros(n)
        assert z.dtype == np.float64 and z.shape == (n,) and not z.any()
        assert z.ctypes.data % PAGE == 0 and is_page_aligned(z) and z.flags.writeable
        src = np.arange(n, dtype=np.float32)
        c = page_aligned_copy(src)
        assert c.dtype == np.float32 and c.ctypes.data % PAGE == 0 and np.array_equal(c, src)
    assert not is_page_aligned(page_aligned_zeros(16)[1:])
    two_d = page_aligned_copy(np.ones((3, 4)))
    assert two_d.shape == (3, 4) and is_page_aligned(two_d) and two_d.sum() == 12


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    from pathlib import Path

    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_aligned_arrays_are_on_huge_pages_where_linux_has_them() -> None:
    # An 8 MB accumulator (1M parameters) is written with direct I/O at every group commit:
    # its own 2 MiB-aligned mapping, advised MADV_HUGEPAGE (4 pages to pin instead of 2,048).
    import mmap
    import platform
    from pathlib import Path

    import numpy as np

    from fededge.memory import HUGE_PAGE, is_page_aligned, page_aligned_copy, page_aligned_zeros

    z = page_aligned_zeros(1_000_000)
    assert z.shape == (1_000_000,) and z.dtype == np.float64 and not z.any() and z.flags.writeable
    assert is_page_aligned(z)
    z[:] = 1.5  # written through, and read back
    c = page_aligned_copy(z.reshape(1000, 1000))
    assert c.shape == (1000, 1000) and np.array_equal(c.reshape(-1), z)
    if platform.system() == "Linux" and hasattr(mmap, "MADV_HUGEPAGE"):
        for a in (z, c):
            assert a.ctypes.data % HUGE_PAGE == 0
            # The advice is recorded whatever THP's mode, on kernels built with THP at all
            # (elsewhere madvise refuses it and the arrays stay on 4 KiB pages).
            if Path("/sys/kernel/mm/transparent_hugepage").is_dir():
                assert "hg" in _vm_flags(a.ctypes.data)
    small = page_aligned_zeros(HUGE_PAGE // 8 - 1)  # below the threshold: numpy's heap
    assert is_page_aligned(small) and not small.any()
