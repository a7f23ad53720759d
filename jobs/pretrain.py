"""Entry point for ``ray job submit``: pretrain the 2D encoder (synth -> train 2d-only -> export).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pretrain.py --config jobs/configs/pretrain-cpu.yaml --out s3://bucket/pretrain

Prints the exported encoder's URI (the value for ``model.pretrained_2d``); a resubmission reuses
what is done. Exits non-zero with the error on stderr when it fails, so the job status is right.
"""

import sys

from posefr_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
