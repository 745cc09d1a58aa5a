"""bench/scaling.py's TreeMemory: the peak of a real process tree, and at that peak the PSS of
each level of the tree (a SuperNode, its SuperExec, the tasks forked from it)."""

import subprocess
import sys
import time

from bench.scaling import TreeMemory

TREE = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    block = bytearray(os.urandom(1)) * (80 * 2**20)  # 80 MB the child writes: private to it
    os.write(w, b"x")
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    os._exit(0)
os.read(r, 1)
print("ready", flush=True)
os.wait()
"""


def test_tree_memory_records_the_peak_and_each_levels_share_of_it(tmp_path):
    done = tmp_path / "done"
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(done)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # the child holds its 80 MB
        with TreeMemory({"tree": proc.pid}, interval=0.05) as mem:
            deadline = time.monotonic() + 30
            while len(mem.peak_pss_parts["tree"]) < 2:  # until a sample has seen both levels
                assert time.monotonic() < deadline, "no sample of the tree"
                time.sleep(0.05)
    finally:
        done.touch()
        proc.wait(timeout=30)
    parent, child = mem.peak_pss_parts["tree"]
    assert len(parent) == 1 and len(child) == 1
    assert child[0] > 75 * 2**20 > parent[0]  # the child's private 80 MB, charged to the child
    assert mem.peak_pss["tree"] == parent[0] + child[0] and mem.peak["tree"] >= mem.peak_pss["tree"]
