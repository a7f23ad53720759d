"""Evaluation: exact pose-binned verification and its report.

Public names::

    run_verify(emb_uri, out_dir, fars, yaw_edges, block_size, use_ray) -> report dict (+ files)
    verify_source(source, fars, yaw_edges, options, use_ray)           -> report dict
    verify_arrays(emb, subject_ids, yaw, enrollment, fars, yaw_edges)  -> report dict, in-process
    write_report(report, out_dir)
    tar_at_far(genuine, impostor, fars) -> [FarPoint]   (in-memory exact reference)
"""

from posefr_dist.eval.embeddings import EmbeddingSet, EmbeddingsError, from_arrays, load_embeddings
from posefr_dist.eval.exact import FarPoint, far_key, far_rank, tar_at_far
from posefr_dist.eval.report import render_markdown, write_report
from posefr_dist.eval.verify import (ALL, DEFAULT_FARS, DEFAULT_YAW_EDGES, UNKNOWN_POSE, VerifyError,
                                     VerifyOptions, VerifyResult, build_report, pair_scores,
                                     run_verify, verify_arrays, verify_embeddings, verify_source,
                                     yaw_bin_names)

__all__ = [
    "ALL", "DEFAULT_FARS", "DEFAULT_YAW_EDGES", "UNKNOWN_POSE",
    "EmbeddingSet", "EmbeddingsError", "FarPoint", "VerifyError", "VerifyOptions", "VerifyResult",
    "build_report", "far_key", "far_rank", "from_arrays", "load_embeddings", "pair_scores",
    "render_markdown", "run_verify", "tar_at_far", "verify_arrays", "verify_embeddings",
    "verify_source", "write_report", "yaw_bin_names",
]
