"""Entry point for ``ray job submit``: distributed training.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/train.py --config jobs/configs/paper-gpu.yaml data.uri=s3://bucket/shards

Exits non-zero with the error on stderr when the run fails, so the job status is right.
"""

import sys

from posefr_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
