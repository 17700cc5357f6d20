"""Workflows: definitions (parse + validate), runs (progress, dispatch, retries), the scheduler (timers)."""
