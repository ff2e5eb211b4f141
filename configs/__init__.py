"""Experiment configs: one module per experiment, each with get_config() -> ConfigDict.

The same files are read from a checkout and from an installed package:
`configs/text8.py` is also `md4.configs.text8` (md4/configs links to this folder).
"""
