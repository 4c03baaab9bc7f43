"""One rank of a 2-rank gloo group (RANK/WORLD_SIZE/MASTER_* in the environment) that checks
``sys.argv[1]`` (or, with a second argument, rank 1 checks ``sys.argv[2]``: a folder that is not
rank 0's) with ``dist.check_shared_folder``, and agrees on a flag with ``all_ranks``/``any_rank``.
Prints one JSON line with what it saw."""
import json
import os
import sys

import torch.distributed as tdist

from toolkit.engine import dist
from toolkit.errors import SharedFolderError

tdist.init_process_group("gloo")
rank = tdist.get_rank()
folder = sys.argv[2] if len(sys.argv) > 2 and rank == 1 else sys.argv[1]
out = {"rank": rank, "all": dist.all_ranks(rank == 0), "any": dist.any_rank(rank == 1),
       "all_true": dist.all_ranks(True)}
try:
    dist.check_shared_folder(folder, wait_s=1.0)
    out["error"] = None
except SharedFolderError as e:
    out["error"] = str(e)
out["leftover"] = sorted(os.listdir(sys.argv[1]))
print(json.dumps(out), flush=True)
tdist.destroy_process_group()
