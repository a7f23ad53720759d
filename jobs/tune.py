"""Entry point for ``ray job submit``: a Ray Tune search of the entropy-loss weights.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/tune.py --config jobs/configs/tune-paper-gpu.yaml --num-samples 32 \
           data.uri=s3://bucket/shards tune.storage_path=s3://bucket/tune

Rerun with ``--resume`` to continue an interrupted experiment. Exits non-zero with the error on
stderr when the experiment fails or ends before its last trial, so the job status is right.
"""

import sys

from posefr_dist.tune.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
