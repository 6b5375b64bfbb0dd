"""sdlm_jax: sparse diffusion language models in JAX/Flax NNX, TPU-first."""

from setuptools import find_packages, setup

# Pinned together: jax/jaxlib must match libtpu (see requirements-tpu.txt).
JAX_VERSION = "0.10.2"

setup(
    name="sdlm_jax",
    version="0.1.0",
    description="Sparse (MoE) diffusion language models in JAX/Flax NNX, TPU-native.",
    packages=find_packages(include=["sdlm_jax", "sdlm_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    python_requires=">=3.11",  # jax 0.10.2, flax 0.12, grain and orbax need it
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax==0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "array-record>=0.8",
        "sentencepiece>=0.2",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "clu==0.0.12",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # sdlm-sweep, sdlm-plot and sdlm-scaling fit draw PNGs
        "numpy>=1.26",
        "jaxtyping>=0.3.11",
        "safetensors>=0.4.3",
        "flatbuffers>=24.3",  # jax.export serialisation (sdlm-export's forward.jax_export)
        "etils[epath,epath-gcs]>=1.15",  # every path, local or gs:// (gcsfs); orbax uses epath too
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "beartype>=0.23",
                 "gcp-storage-emulator>=2024.8"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "gpu": [f"jax[cuda12]=={JAX_VERSION}"],
        "tfds": ["tensorflow-datasets>=4.9"],
    },
    entry_points={
        "console_scripts": [
            "sdlm-train=sdlm_jax.cli.train:run",
            "sdlm-generate=sdlm_jax.cli.generate:run",
            "sdlm-eval=sdlm_jax.cli.evaluate:run",
            "sdlm-aot=sdlm_jax.cli.aot:run",
            "sdlm-scaling=sdlm_jax.cli.scaling:run",
            "sdlm-sweep=sdlm_jax.cli.sweep:run",
            "sdlm-plot=sdlm_jax.cli.plot:run",
            "sdlm-upcycle=sdlm_jax.cli.upcycle:run",
            "sdlm-export=sdlm_jax.cli.export:run",
            "sdlm-prepare=sdlm_jax.cli.prepare:run",
        ]
    },
)
