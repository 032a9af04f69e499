"""The pack's own socket types, declared once: every node imports its types from here."""
from comfy_api.latest import io

Adapter = io.Custom("IQA_ADAPTER")  # adapter/iqa_adapter.IQAAdapter, from Load Quality Adapter
QualityTokens = io.Custom("QUALITY_TOKENS")  # adapter/projection.QualityTokens: one row per target
Metric = io.Custom("IQA_METRIC")  # adapter/iqa_models.LoadedMetric, from Load Quality Metric
Scores = io.Custom("IQA_SCORES")  # adapter/iqa_models.IQAScores, from Quality Score
Targets = io.Custom("IQA_TARGETS")  # adapter/sweep.SweepTargets, from Quality Target Sweep
