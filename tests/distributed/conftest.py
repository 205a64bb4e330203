import os
import sys

# dist_harness.py (spawns process groups) and dist_cases.py (what each rank runs) are imported by name, in the
# test process and in the spawned ranks.
sys.path.insert(0, os.path.dirname(__file__))
