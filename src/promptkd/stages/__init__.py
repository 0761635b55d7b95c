"""Stages: functions from inputs to artifacts (teacher, class vectors, distillation, evaluation)."""
