"""keep_heap_padding(): glibc keeps freed grain buffers instead of faulting them in again.

Each case runs in a fresh interpreter (malloc settings are process-wide) that frees
and allocates grain-sized buffers on a second thread, as the decoder's inflate
threads do, and reports its minor page faults.
"""
from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = """
import json, resource, sys, threading
from hypersdk.service.allocator import keep_heap_padding
padded = keep_heap_padding() if sys.argv[1] == "padded" else None

def grains():
    for _ in range(400):
        batch = [bytes(65536) for _ in range(16)]  # one batch of 64 KiB grains
        del batch

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=grains)
worker.start()
worker.join()
print(json.dumps({"padded": padded,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_padding_stops_the_page_faults_of_grain_sized_buffers():
    default, padded = _faults("default"), _faults("padded")
    assert padded["padded"] is True  # glibc (Debian) has mallopt
    # 400 batches of 1 MiB: with glibc's defaults each batch faults its 256 pages in again
    assert default["faults"] > 400 * 200
    assert padded["faults"] < default["faults"] // 10
