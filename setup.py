"""Which packages install: the library, ``date_core``, and its app, the stage CLIs in
``pipelines/`` as ``date_pipelines`` (``pipelines/`` keeps its name: ``ray job submit -- python
pipelines/pgda.py`` is how a cluster runs a stage). Everything else is in ``pyproject.toml``."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["date_core", "date_core.*"]), "date_pipelines"],
      package_dir={"date_pipelines": "pipelines"})
