# The package's version, in one place: pyproject.toml reads it (statically, without
# importing the package or torch) and neptune_ext.__version__ re-exports it.
__version__ = "0.1.0"
