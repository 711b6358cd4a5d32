"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under resnet_fast/ is found, so a new subpackage cannot be left out of the wheel;
kernels/ and csrc/ stay top-level folders of the repository and install as resnet_fast.kernels and
resnet_fast.csrc (tests/test_wheel.py checks the wheel against the folders on disk).
"""

from setuptools import find_packages, setup

# folder in the repository -> the package it installs as
MAPPED = {"kernels": "resnet_fast.kernels", "csrc": "resnet_fast.csrc"}

packages = find_packages(include=["resnet_fast", "resnet_fast.*"])
package_dir = {"resnet_fast": "resnet_fast"}
for folder, name in MAPPED.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=package_dir)
