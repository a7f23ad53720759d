"""Entry point for ``ray job submit``: embed a split with an exported model and verify it.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --model s3://bucket/models/m1 --data s3://bucket/shards --out s3://bucket/eval/m1

Exits non-zero with the error on stderr when it fails, so the job status is right.
"""

import sys

from posefr_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
