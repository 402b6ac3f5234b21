"""Experiments that train several models and write a report (``python -m loopmoe.experiments.compare``)."""
