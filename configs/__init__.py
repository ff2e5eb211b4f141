"""Experiment configs: one module per experiment, each with get_config() -> ConfigDict.

The same files are `configs/<name>.py` in a checkout and `md4.configs.<name>` in an
installed package (md4/configs links to this folder).
"""
