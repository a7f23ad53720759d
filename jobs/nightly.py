"""Entry point for ``ray job submit``: the nightly re-evaluation of the newest exported model.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/nightly.py --models s3://bucket/models --data s3://bucket/shards \
            --history s3://bucket/nightly --pushgateway pushgateway.monitoring.svc:9091

Exit codes: 0 no regression, 1 error, 2 usage, 3 a TAR dropped by more than --max-drop (the Ray
job ends FAILED on any non-zero code; the regression lines are in the job's logs).
"""

import sys

from posefr_dist.eval.nightly import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
