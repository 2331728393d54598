"""Evaluation: QA records, the harness (accuracy, FLOPs, time per method), tables and plots, the report."""
from vrc_dist.eval.flops import layer_flops, prefill_flops
from vrc_dist.eval.harness import add_intervals, evaluate
from vrc_dist.eval.records import QARecord, records_from_samples
from vrc_dist.eval.tables import write_plot, write_table
