# Sourced by test.sh and train.sh: install the build tools, then cnet in place
# (compiling its kernels; a no-op rebuild when nothing changed).
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q "setuptools>=77" wheel "Cython>=3.0" "numpy>=2.0"
python -m pip install -q --no-build-isolation -e ".[test]"
