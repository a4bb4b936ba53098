"""Print the releases of a `pip freeze` file that differ from requirements/lock.txt (the lock's lines whose
environment marker holds here), one line each: `  NAME: lock LOCKED -> now INSTALLED`.

    python .ci/lock_diff.py FREEZE_FILE

Used by .ci/drift and .ci/lmms_eval; run it with the python of the venv the freeze file describes (the markers are
evaluated for it). Needs `packaging`.
"""

import re
import sys
from pathlib import Path

from packaging.markers import Marker, default_environment

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"

if len(sys.argv) != 2:
    sys.exit(f"usage: python {sys.argv[0]} FREEZE_FILE")
env = default_environment()
locked = {}
for line in open(LOCK):
    m = re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;]+)(?: ; (.*))?$", line.strip())
    if m and (m[3] is None or Marker(m[3]).evaluate(env)):
        locked[m[1].lower().replace("_", "-")] = m[2]
for line in open(sys.argv[1]):
    name, _, version = line.strip().partition("==")
    key = name.lower().replace("_", "-")
    if key in locked and locked[key] != version:
        print(f"  {name}: lock {locked[key]} -> now {version}")
