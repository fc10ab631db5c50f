from setuptools import setup

setup(
    name="din_fast",
    version="0.1.0",
    description="Fused Triton kernels and faithful PyTorch modules for the Deep Interest Network (DIN)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["din_fast", "din_fast.data", "din_fast.integrations", "din_fast.triton_ops", "din_fast.kernels",
              "din_fast.benchmarks"],
    # kernels/ and benchmarks/ are top-level folders of the source tree, installed as
    # din_fast.kernels and din_fast.benchmarks: top-level import names `kernels` and
    # `benchmarks` would collide with other packages.
    package_dir={"din_fast.kernels": "kernels", "din_fast.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "tqdm",
        "matplotlib",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        # deepctr-torch for the drop-in tests; it imports requests without declaring it.
        "deepctr": ["deepctr-torch>=0.3.0", "requests"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "deepctr-torch>=0.3.0", "requests"],
    },
    entry_points={"console_scripts": ["din-fast = din_fast.cli:main"]},
)
